#!/usr/bin/env bash
# Build the Istio Wasm OCI image (envoy/istio/Dockerfile) from the release module.
#
#   build-oci.sh preflight                 is a Docker engine usable? (says what is missing)
#   build-oci.sh build <module.wasm> <image>
#
# `make oci` runs both. DOCKER overrides the client binary (default: docker).
set -euo pipefail

DOCKER=${DOCKER:-docker}
HERE=$(cd "$(dirname "$0")" && pwd)

preflight() {
  if ! command -v "$DOCKER" >/dev/null 2>&1; then
    echo "make oci: the Docker client ('$DOCKER') is not installed." >&2
    echo "          Install Docker (client and engine), or build the image elsewhere from envoy/istio/Dockerfile." >&2
    return 3
  fi
  local err
  if ! err=$("$DOCKER" info --format '{{.ServerVersion}}' 2>&1 >/dev/null); then
    echo "make oci: the Docker client is installed, but no Docker engine is reachable." >&2
    echo "          Start the engine (or set DOCKER_HOST). The client said:" >&2
    printf '%s\n' "$err" | sed 's/^/            /' >&2
    return 4
  fi
}

build() {
  local wasm=$1 image=$2
  if [[ ! -f $wasm ]]; then
    echo "make oci: $wasm is missing (run \`make build\`)" >&2
    return 2
  fi
  # The build context holds the module alone: nothing else of the repository
  # is sent to the engine or can end up in the image.
  local context
  context=$(mktemp -d)
  trap 'rm -rf "$context"' RETURN
  cp "$wasm" "$context/plugin.wasm"
  "$DOCKER" build --file "$HERE/Dockerfile" --tag "$image" "$context"
  echo "make oci: built $image ($(sha256sum "$wasm" | cut -d' ' -f1) as plugin.wasm)"
  echo "          push it (docker push $image), then set url: oci://$image in envoy/istio/wasmplugin.yaml"
}

case ${1:-} in
  preflight) preflight ;;
  build) shift; build "$@" ;;
  *) echo "usage: $0 preflight | build <module.wasm> <image>" >&2; exit 2 ;;
esac
