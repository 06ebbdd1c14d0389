#!/usr/bin/env bash
# Installs the Debian packages resilua needs to build and test, when they
# are missing (apt-get update once, then apt-get install -y).  A no-op when
# everything is there.  Extra package names may be given (make bench: wrk).
set -euo pipefail
PACKAGES=(gcc make pkg-config liblua5.4-dev lua5.4 libcurl4-openssl-dev
          lua-cjson lua-busted libhttp-parser-dev libnghttp2-dev curl
          python3-grpcio nghttp2-client "$@")
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "resilua: installing missing Debian packages: ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
