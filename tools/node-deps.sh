#!/usr/bin/env bash
# Installs the Node packages the specs use as real clients (the official
# OpenAI SDK) into .cache/node (gitignored), once.  Needs node and npm
# (Debian: nodejs, npm).  Prints the node_modules path.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.cache/node
OPENAI_VERSION=4.104.0
if [ ! -f "$DIR/node_modules/openai/package.json" ] ||
   ! grep -q "\"version\": \"$OPENAI_VERSION\"" "$DIR/node_modules/openai/package.json"; then
  command -v npm >/dev/null || "$(dirname "$0")/deps.sh" nodejs npm >&2
  mkdir -p "$DIR"
  npm install --silent --no-audit --no-fund --prefix "$DIR" "openai@$OPENAI_VERSION" >&2
fi
echo "$PWD/$DIR/node_modules"
