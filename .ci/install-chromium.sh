#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/e2e) when it is missing.
# Playwright drives /usr/bin/chromium; it never downloads a browser of its own.
# Idempotent and quiet: prints nothing when Chromium is already there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-chromium.sh: must run as root to install chromium" >&2
  exit 1
fi
log="$(mktemp)"
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; } >"$log" 2>&1; then
  echo "install-chromium.sh: apt-get failed" >&2
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
