#!/usr/bin/env bash
# Install the Debian packages the tests use and make sure PostgreSQL and Redis answer.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
command -v curl >/dev/null || need+=(curl)
command -v pg_isready >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q "${need[@]}"
fi

# Postfix (receiving MTA for delivery tests and the benchmark peer) and Chromium (browser
# tests) have install scripts of their own.
bash "$(dirname "$0")/install-postfix.sh"
[ -f "$(dirname "$0")/install-chromium.sh" ] && bash "$(dirname "$0")/install-chromium.sh"

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 30); do redis-cli ping >/dev/null 2>&1 && break; sleep 1; done
fi
