#!/bin/sh
# Entry point of the pam gateway image: assemble PAM_HOME from what the platform
# mounts, then run the daemon in the foreground with JSON logs.
#
#   /etc/pam/gateway.json     the settings (a ConfigMap, or a bind mount;
#                             PAM_CONFIG_DIR overrides /etc/pam)
#   /run/secrets/pam/*        (PAM_SECRETS_DIR) master.key (and master-key-N.key for each
#                             later version of a rotated key) and the gateway CA and server identity
#                             (gateway-ca.crt, gateway-ca.key.sealed,
#                             gateway-server.crt, gateway-server.key.sealed), made
#                             once by `pam gateway init` (docs/operations.md)
#
# Each container gets its own gateway_id (PAM_GATEWAY_ID, else the host name: the
# pod's name), so that gateways sharing a store hold leases of their own.
# A PAM_HOME that already holds gateway.json (a persistent volume, or a state
# directory made by `pam gateway init` in it) is used as it is.
set -eu
home="${PAM_HOME:?PAM_HOME is not set}"
config="${PAM_CONFIG_DIR:-/etc/pam}"
secrets="${PAM_SECRETS_DIR:-/run/secrets/pam}"
umask 077

if [ ! -f "$home/gateway.json" ] && [ -f "$config/gateway.json" ]; then
    PAM_GATEWAY_ID="${PAM_GATEWAY_ID:-$(hostname)}" python - "$config/gateway.json" "$home/gateway.json" <<'PY'
import json, os, sys
with open(sys.argv[1]) as given:
    settings = json.load(given)
settings["gateway_id"] = os.environ["PAM_GATEWAY_ID"]
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "w") as out:
    json.dump(settings, out)
PY
fi
for name in master.key gateway-ca.crt gateway-ca.key.sealed gateway-server.crt gateway-server.key.sealed; do
    if [ ! -f "$home/$name" ] && [ -f "$secrets/$name" ]; then
        cat "$secrets/$name" > "$home/$name"
    fi
done
# Later master key versions (a rotation, docs/operations.md): a Secret's keys
# are flat names, so version N is master-key-N.key there and master.keys/N.key here.
for file in "$secrets"/master-key-*.key; do
    [ -f "$file" ] || continue
    version="${file##*/master-key-}"
    version="${version%.key}"
    case "$version" in *[!0-9]* | "") continue ;; esac
    mkdir -p "$home/master.keys"
    if [ ! -f "$home/master.keys/$version.key" ]; then
        cat "$file" > "$home/master.keys/$version.key"
    fi
done

exec pam gateway run --log-format json "$@"
