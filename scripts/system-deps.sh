#!/usr/bin/env bash
# System packages the test suite needs, installed when missing (as root, or through sudo):
#   redis-server — the Redis store's contract tests start their own instance from it.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing ${need[*]}"
$sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
