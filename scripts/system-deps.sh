#!/usr/bin/env bash
# System packages the test suite needs, installed when missing (as root, or through sudo):
#   redis-server — the Redis store's contract tests start their own instance from it.
#   openssl — the edge tests make a throwaway certificate for `edge.tls.mode: files`.
#   chromium — the web page's tests drive it with Playwright (never `playwright install`: it downloads).
#   npm — only where Node.js is missing: bootstrap.sh installs the web page's htmx with it.
#   docker-compose — the compose.yaml test, where the engine has no `docker compose` plugin.
#   a Docker Engine — the docker runtime's tests (scripts/docker-engine.sh installs and starts it).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(npm)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -eq 0 ]; then
  exec "$(dirname "$0")/docker-engine.sh"
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "system-deps: installing ${need[*]}"
$sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
exec "$(dirname "$0")/docker-engine.sh"
