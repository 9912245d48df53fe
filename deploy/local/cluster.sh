#!/usr/bin/env bash
# A local invalbus cluster as plain processes, for machines without a container engine: three
# nats-server processes routed into one cluster with JetStream (file store, the accounts and
# least-privilege users of deploy/nats/accounts.conf), and three `invalbus-node serve` nodes of
# namespace `blog` that log in as the `node` user.
#
# Usage: deploy/local/cluster.sh up|status|down
#   up      start everything, wait until every server and node is healthy, print how to reach it
#   status  show each process and node health; exits non-zero unless all are up and serving
#   down    stop the nodes (SIGTERM: they drain), then the servers; nothing is left running
#
# Settings (environment):
#   INVALBUS_LOCAL_DIR        state: configs, logs, JetStream stores, pids (/tmp/invalbus-local)
#   INVALBUS_LOCAL_BASE_PORT  ports used: NATS clients BASE+1..3, routes BASE+11..13, NATS
#                             monitoring BASE+21..23, node gRPC BASE+31..33, node metrics
#                             BASE+41..43 (default 14200)
#   INVALBUS_NODE_BIN         the node binary (default: target/release/invalbus-node of this
#                             repository, built with cargo if missing; else `invalbus-node` on PATH)
#   NATS_SERVER_BIN           nats-server (default: on PATH, else /usr/sbin/nats-server)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="${INVALBUS_LOCAL_DIR:-/tmp/invalbus-local}"
base="${INVALBUS_LOCAL_BASE_PORT:-14200}"
ns=blog
servers=(1 2 3)

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

nats_client_port() { echo $((base + $1)); }
nats_route_port() { echo $((base + 10 + $1)); }
nats_http_port() { echo $((base + 20 + $1)); }
node_port() { echo $((base + 30 + $1)); }
node_metrics_port() { echo $((base + 40 + $1)); }

nats_bin() {
    if [[ -n "${NATS_SERVER_BIN:-}" ]]; then echo "$NATS_SERVER_BIN"; return; fi
    if command -v nats-server >/dev/null 2>&1; then command -v nats-server; return; fi
    [[ -x /usr/sbin/nats-server ]] || die "nats-server not found: apt-get install nats-server, or set NATS_SERVER_BIN"
    echo /usr/sbin/nats-server
}

node_bin() {
    if [[ -n "${INVALBUS_NODE_BIN:-}" ]]; then echo "$INVALBUS_NODE_BIN"; return; fi
    if [[ -x "$repo/target/release/invalbus-node" ]]; then echo "$repo/target/release/invalbus-node"; return; fi
    if command -v invalbus-node >/dev/null 2>&1; then command -v invalbus-node; return; fi
    [[ -f "$repo/Cargo.toml" ]] || die "invalbus-node not found: set INVALBUS_NODE_BIN"
    say "building invalbus-node (cargo build --release -p invalbus-node)"
    (cd "$repo" && cargo build --release -p invalbus-node >&2)
    echo "$repo/target/release/invalbus-node"
}

# Whether something accepts connections on 127.0.0.1:$1.
listening() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# The body of GET $2 on 127.0.0.1:$1 (HTTP/1.0, so the server closes the connection).
http_get() {
    timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; printf 'GET $2 HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3; cat <&3" 2>/dev/null || true
}

# Whether process $1 runs. One that exited but was not reaped yet (a zombie: where nothing reaps
# orphans, as in many containers) does not, though `kill -0` still succeeds on it.
pid_alive() {
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# Whether the process of pid file $1 runs.
alive() { [[ -f "$1" ]] && pid_alive "$(cat "$1")"; }

random_secret() { printf s; od -An -tx1 -N20 /dev/urandom | tr -d ' \n'; }

# Waits until "$@" succeeds, up to $1 seconds; the command is "${@:2}".
wait_for() {
    local seconds="$1"
    shift
    local until=$((SECONDS + seconds))
    while ! "$@"; do
        ((SECONDS < until)) || return 1
        sleep 0.2
    done
}

nats_ready() {
    local i="$1" port
    port="$(nats_http_port "$i")"
    alive "$dir/nats-$i.pid" || die "nats-$i exited; log: $dir/nats-$i.log
$(tail -n 20 "$dir/nats-$i.log" 2>/dev/null)"
    # Both routes up, and JetStream healthy (its meta group has a leader this server follows).
    http_get "$port" /routez | grep -q '"num_routes": 2' &&
        http_get "$port" /healthz | grep -q '"status": *"ok"'
}

node_ready() {
    local i="$1"
    alive "$dir/node-$i.pid" || die "node-$i exited; log: $dir/node-$i.log
$(tail -n 20 "$dir/node-$i.log" 2>/dev/null)"
    "$nodebin" health --addr "http://127.0.0.1:$(node_port "$i")" --timeout-ms 2000 >/dev/null 2>&1 || return 1
    # Every node has heard the heartbeats of the other two.
    local n
    n="$(INVALBUS_TOKEN="$ops_token" "$nodebin" nodes --json --addr "http://127.0.0.1:$(node_port "$i")" 2>/dev/null |
        grep -c '"node_id"' || true)"
    [[ "$n" -ge 3 ]]
}

# Starts "$@" detached from this shell (own session, output to $log), records its pid in $pidfile.
spawn() {
    local pidfile="$1" log="$2"
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$pidfile"
}

any_running() {
    local f
    for f in "$dir"/*.pid; do
        [[ -e "$f" ]] || continue
        alive "$f" && return 0
    done
    return 1
}

write_configs() {
    cp "$repo/deploy/nats/accounts.conf" "$dir/accounts.conf"
    local i routes=""
    for i in "${servers[@]}"; do
        routes+="    nats-route://127.0.0.1:$(nats_route_port "$i")"$'\n'
    done
    for i in "${servers[@]}"; do
        mkdir -p "$dir/nats-$i"
        cat >"$dir/nats-$i.conf" <<EOF
# Generated by deploy/local/cluster.sh: deploy/nats/nats-$i.conf on loopback ports.
server_name: local-nats-$i
listen: 127.0.0.1:$(nats_client_port "$i")
http: 127.0.0.1:$(nats_http_port "$i")
jetstream {
  store_dir: "$dir/nats-$i"
  max_memory_store: 64MB
  max_file_store: 2GB
}
cluster {
  name: invalbus-local
  listen: 127.0.0.1:$(nats_route_port "$i")
  routes: [
$routes  ]
}
include ./accounts.conf
EOF
    done
    local urls=""
    for i in "${servers[@]}"; do
        urls+="${urls:+,}nats://127.0.0.1:$(nats_client_port "$i")"
    done
    # Signing keys: one per node, one for publishers (Python); the namespace trusts these only.
    local trust=$'[trust]\nmode = "keys"\n'
    for i in "${servers[@]}"; do
        trust+=$'\n[[trust.keys]]\n'"key = \"$("$nodebin" key --file "$dir/node-$i.nk")\""$'\n'"origins = [\"node-$i\"]"$'\n'
    done
    trust+=$'\n[[trust.keys]]                     # publish.py --key-file publisher.nk: keys and purges, no receipts\n'
    trust+="key = \"$("$nodebin" key --file "$dir/publisher.nk")\""$'\nscopes = ["keys", "purge"]\n'
    for i in "${servers[@]}"; do
        cat >"$dir/node-$i.toml" <<EOF
# Generated by deploy/local/cluster.sh.
node_id = "node-$i"
namespace = "$ns"
listen = "127.0.0.1:$(node_port "$i")"
metrics_listen = "127.0.0.1:$(node_metrics_port "$i")"

[nats]
# Its own server; the client learns the other two from the server's INFO and fails over to
# them. (A comma-separated list would be the explicit way, but the bus does not split it yet.)
url = "nats://127.0.0.1:$(nats_client_port "$i")"
user = "node"
password = "$INVALBUS_NODE_PASSWORD"

[identity]
key_file = "$dir/node-$i.nk"

$trust
[jetstream]
replicas = 3
max_age_secs = 86400
max_bytes = 134217728

[[tokens]]
name = "ops"
token = "$ops_token"
roles = ["read", "purge"]

[[tokens]]
name = "app"
token = "$app_token"
roles = ["cache"]

[[caches]]
name = "articles"
max_entries = 100000
ttl_secs = 300
EOF
    done
    chmod 600 "$dir"/node-*.toml
    cat >"$dir/env.sh" <<EOF
# Source this file to talk to the local cluster: . $dir/env.sh
export INVALBUS_ADDR=http://127.0.0.1:$(node_port 1)
export INVALBUS_TOKEN=$ops_token
export INVALBUS_APP_TOKEN=$app_token
export INVALBUS_NATS_URLS=$urls
export INVALBUS_NATS_SERVICE_URL=nats://$ns:$INVALBUS_SERVICE_PASSWORD@127.0.0.1:$(nats_client_port 1)
export INVALBUS_NATS_PUBLISHER_URL=nats://publisher:$INVALBUS_PUBLISHER_PASSWORD@127.0.0.1:$(nats_client_port 1)
export INVALBUS_NATS_ADMIN_URL=nats://admin:$INVALBUS_ADMIN_PASSWORD@127.0.0.1:$(nats_client_port 1)
export INVALBUS_PUBLISHER_KEY_FILE=$dir/publisher.nk
EOF
    chmod 600 "$dir/env.sh"
}

up() {
    if [[ -d "$dir" ]] && any_running; then
        die "a cluster is already running in $dir (deploy/local/cluster.sh down first)"
    fi
    local i p
    for i in "${servers[@]}"; do
        for p in "$(nats_client_port "$i")" "$(nats_route_port "$i")" "$(nats_http_port "$i")" \
            "$(node_port "$i")" "$(node_metrics_port "$i")"; do
            listening "$p" && die "port $p is taken; choose other ports with INVALBUS_LOCAL_BASE_PORT"
        done
    done
    local natsbin
    natsbin="$(nats_bin)"
    # Whatever makes `up` fail from here on, stop what it started.
    trap 'if [[ $? -ne 0 ]]; then say "up failed: stopping what was started"; down >&2 || true; fi' EXIT
    nodebin="$(node_bin)"
    rm -rf "$dir"
    mkdir -p "$dir"
    chmod 700 "$dir"

    # Fresh secrets for this cluster, read by nats-server from its environment.
    export INVALBUS_SERVICE_PASSWORD INVALBUS_NODE_PASSWORD INVALBUS_PUBLISHER_PASSWORD \
        INVALBUS_ADMIN_PASSWORD INVALBUS_SYS_PASSWORD
    INVALBUS_SERVICE_PASSWORD="$(random_secret)"
    INVALBUS_NODE_PASSWORD="$(random_secret)"
    INVALBUS_PUBLISHER_PASSWORD="$(random_secret)"
    INVALBUS_ADMIN_PASSWORD="$(random_secret)"
    INVALBUS_SYS_PASSWORD="$(random_secret)"
    ops_token="$(random_secret)"
    app_token="$(random_secret)"
    write_configs

    for i in "${servers[@]}"; do
        spawn "$dir/nats-$i.pid" "$dir/nats-$i.log" "$natsbin" -c "$dir/nats-$i.conf"
    done
    for i in "${servers[@]}"; do
        wait_for 60 nats_ready "$i" || die "nats-$i did not become healthy in 60 s; see $dir/nats-$i.log"
    done
    say "nats-server cluster up (JetStream healthy on all three)"

    for i in "${servers[@]}"; do
        spawn "$dir/node-$i.pid" "$dir/node-$i.log" env NO_COLOR=1 "$nodebin" serve --config "$dir/node-$i.toml"
    done
    for i in "${servers[@]}"; do
        wait_for 90 node_ready "$i" || die "node-$i did not become healthy in 90 s; see $dir/node-$i.log"
    done
    trap - EXIT
    cat <<EOF
invalbus local cluster is up (state in $dir)
  NATS (namespace $ns): $(for i in "${servers[@]}"; do printf 'nats://127.0.0.1:%s ' "$(nats_client_port "$i")"; done)
  NATS monitoring:      $(for i in "${servers[@]}"; do printf 'http://127.0.0.1:%s ' "$(nats_http_port "$i")"; done)
  nodes (gRPC):         $(for i in "${servers[@]}"; do printf 'node-%s=http://127.0.0.1:%s ' "$i" "$(node_port "$i")"; done)
  node metrics:         $(for i in "${servers[@]}"; do printf 'http://127.0.0.1:%s/metrics ' "$(node_metrics_port "$i")"; done)
Try:
  . $dir/env.sh
  $nodebin nodes
  $nodebin purge --tag author:42 --reason "try it" --wait
  $nodebin audit
Stop with: $0 down
EOF
}

status() {
    [[ -d "$dir" ]] || die "no cluster in $dir"
    nodebin="$(node_bin)"
    local ok=0 i state
    for i in "${servers[@]}"; do
        if alive "$dir/nats-$i.pid"; then
            if http_get "$(nats_http_port "$i")" /healthz | grep -q '"status": *"ok"'; then state=healthy; else state=unhealthy; ok=1; fi
            echo "nats-$i  pid $(cat "$dir/nats-$i.pid")  nats://127.0.0.1:$(nats_client_port "$i")  $state"
        else
            echo "nats-$i  not running"
            ok=1
        fi
    done
    for i in "${servers[@]}"; do
        if alive "$dir/node-$i.pid"; then
            state="$("$nodebin" health --addr "http://127.0.0.1:$(node_port "$i")" 2>&1 | tail -n 1)" || ok=1
            echo "node-$i  pid $(cat "$dir/node-$i.pid")  http://127.0.0.1:$(node_port "$i")  $state"
        else
            echo "node-$i  not running"
            ok=1
        fi
    done
    return "$ok"
}

# Sends $1 to the processes of the pid files "${@:2}", waits up to 20 s for them to exit, then
# kills what is left with SIGKILL.
stop() {
    local sig="$1" f pid
    shift
    for f in "$@"; do
        [[ -f "$f" ]] && alive "$f" && kill "-$sig" "$(cat "$f")" 2>/dev/null || true
    done
    local until=$((SECONDS + 20))
    for f in "$@"; do
        [[ -f "$f" ]] || continue
        pid="$(cat "$f")"
        while pid_alive "$pid" && ((SECONDS < until)); do sleep 0.1; done
        if pid_alive "$pid"; then
            say "$(basename "$f" .pid) did not stop in 20 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while pid_alive "$pid"; do sleep 0.1; done
        fi
        rm -f "$f"
    done
}

down() {
    [[ -d "$dir" ]] || { say "no cluster in $dir"; return 0; }
    # Nodes first, so they publish what is queued and write their receipts while NATS is up.
    stop TERM "$dir"/node-*.pid
    stop TERM "$dir"/nats-*.pid
    if any_running; then die "processes still running in $dir"; fi
    say "stopped; logs and stores are left in $dir"
}

case "${1:-}" in
    up) up ;;
    status) status ;;
    down) down ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
