#!/usr/bin/env bash
# Build the Istio Wasm OCI image (envoy/istio/Dockerfile) from the release module.
#
#   build-oci.sh preflight                 can an image be built here? (says what is missing)
#   build-oci.sh build <module.wasm> <image>
#
# `make oci` runs both. The image is built with docker when a Docker engine
# answers, else with podman (no daemon needed); OCI_CLIENT names the client
# to use instead (docker, podman, or a path).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)

client() {
  if [[ -n ${OCI_CLIENT:-} ]]; then
    echo "$OCI_CLIENT"
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null 2>&1; then
    echo podman
  else
    echo docker  # for preflight's message: the client most people expect
  fi
}

preflight() {
  local client err
  client=$(client)
  if ! command -v "$client" >/dev/null 2>&1; then
    echo "make oci: the container client ('$client') is not installed." >&2
    echo "          Install Docker (client and engine) or podman, or build the image elsewhere from envoy/istio/Dockerfile." >&2
    return 3
  fi
  if ! err=$("$client" info 2>&1 >/dev/null); then
    echo "make oci: the container client ('$client') is installed, but no engine is reachable." >&2
    echo "          Start the Docker engine (or set DOCKER_HOST), or use podman (OCI_CLIENT=podman). The client said:" >&2
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
  local client
  client=$(client)
  "$client" build --file "$HERE/Dockerfile" --tag "$image" "$context"
  echo "make oci: built $image with $client ($(sha256sum "$wasm" | cut -d' ' -f1) as plugin.wasm)"
  echo "          push it ($(basename "$client") push $image), then set url: oci://$image in envoy/istio/wasmplugin.yaml"
}

case ${1:-} in
  preflight) preflight ;;
  build) shift; build "$@" ;;
  *) echo "usage: $0 preflight | build <module.wasm> <image>" >&2; exit 2 ;;
esac
