#!/bin/sh
# STAND-IN for the entrypoint of the official envoyproxy/envoy image (see
# stand-in-images.sh). Started as root, it runs the command as the envoy user
# (uid 101) as the official one does, so a module or configuration that user
# cannot read fails here as it would there. ENVOY_UID=0 keeps root, as there.
set -e
# Bare flags are Envoy's.
if [ "${1#-}" != "$1" ]; then set -- envoy "$@"; fi
if [ "$(id -u)" = 0 ] && [ "${ENVOY_UID:-}" != 0 ]; then
    # Envoy may open them by path (an access log to /dev/stdout).
    chown envoy:envoy /dev/stdout /dev/stderr 2>/dev/null || true
    exec setpriv --reuid=envoy --regid=envoy --init-groups "$@"
fi
exec "$@"
