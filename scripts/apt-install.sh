# Sourced by scripts/test and scripts/test-python: apt_install PACKAGE... installs Debian packages
# with apt-get, through sudo unless running as root.
apt_install() {
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}
