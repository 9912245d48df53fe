#!/bin/sh
# Prints fresh secrets for docker-compose.yml: ./compose-env.sh > .env
# Passwords start with a letter: nats-server parses the variables of accounts.conf as values.
set -eu
secret() { printf 'p%s\n' "$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')"; }
for name in SERVICE NODE PUBLISHER ADMIN SYS POSTGRES; do
    echo "INVALBUS_${name}_PASSWORD=$(secret)"
done
echo "INVALBUS_OPS_TOKEN=$(secret)"
