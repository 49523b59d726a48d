#!/usr/bin/env bash
# A Docker Engine for the docker tests: installs Debian's docker.io when dockerd is missing and starts it when
# nothing answers (root only; vfs storage works everywhere, including inside containers). Its log is
# /tmp/llamacontroller-dockerd.log. Leaves a running engine alone.
set -euo pipefail
if docker version >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker-engine: installing docker.io"
  $sudo apt-get install -y --no-install-recommends docker.io >/dev/null 2>&1 \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends docker.io >/dev/null; }
fi
echo "docker-engine: starting dockerd"
$sudo sh -c 'nohup dockerd --storage-driver=vfs >/tmp/llamacontroller-dockerd.log 2>&1 &'
for _ in $(seq 1 120); do
  docker version >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "docker-engine: dockerd did not answer within 60 s; see /tmp/llamacontroller-dockerd.log" >&2
exit 1
