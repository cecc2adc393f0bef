#!/usr/bin/env bash
# Install Debian's Postfix for the integration tests and benchmarks, and make sure the system's
# default Postfix instance does not listen on any non-loopback address.
#
# The tests never use the default instance: sendkit.testing.postfix.PostfixInstance starts a
# private one (own main.cf, master.cf and queue under the test's temp dir, 127.0.0.1 only).
# All this script needs to provide is the binaries (postfix, postconf, postqueue, smtp-sink,
# smtp-source) and the postfix/postdrop users and groups the package creates.
#
# Idempotent and quiet: prints nothing on success, the apt log on failure. Needs root only when
# something has to be installed or stopped.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PATH="$PATH:/usr/sbin:/sbin"

say() { echo "install-postfix.sh: $*" >&2; }

as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    say "must run as root to $1"
    exit 1
  fi
}

# Run a command with its output captured; show the output only when it fails.
quietly() {
  local log rc=0
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    say "failed ($rc): $*"
    cat "$log" >&2
  fi
  rm -f "$log"
  return "$rc"
}

install_postfix() {
  as_root "install postfix"
  # "No configuration": the package writes no /etc/postfix/main.cf, so the default instance has
  # nothing to start with; the tests bring their own configuration.
  debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF
  # Keep the maintainer scripts from starting any service while installing (the usual
  # policy-rc.d trick); leave an existing policy-rc.d alone.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  local rc=0
  {
    if ! apt-cache policy postfix 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      quietly apt-get update -q
    fi
    quietly apt-get install -y -q --no-install-recommends postfix
  } || rc=$?
  if [ "$made_policy" -eq 1 ]; then
    rm -f "$policy"
  fi
  return "$rc"
}

# True when the default instance only listens on loopback addresses.
default_instance_is_loopback_only() {
  local interfaces item
  interfaces="$(postconf -h inet_interfaces 2>/dev/null)" || return 1
  for item in ${interfaces//,/ }; do
    case "$item" in
      loopback-only | localhost | 127.0.0.1 | ::1 | '[::1]') ;;
      *) return 1 ;;
    esac
  done
  # master.cf services may name an address of their own ("192.0.2.1:smtp inet ...").
  local service
  while read -r service _; do
    case "$service" in
      *:*)
        case "${service%:*}" in
          localhost | 127.0.0.1 | '[::1]') ;;
          *) return 1 ;;
        esac
        ;;
    esac
  done < <(postconf -M 2>/dev/null | awk '$2 == "inet"')
  return 0
}

stop_default_instance() {
  # With "No configuration" there is no main.cf and nothing can be running.
  [ -f /etc/postfix/main.cf ] || return 0
  postfix status >/dev/null 2>&1 || return 0
  if default_instance_is_loopback_only; then
    return 0
  fi
  as_root "stop the default Postfix instance (it listens on non-loopback addresses)"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    quietly systemctl stop postfix.service || true
  fi
  if postfix status >/dev/null 2>&1; then
    quietly postfix stop || quietly service postfix stop || true
  fi
  if postfix status >/dev/null 2>&1; then
    say "the default Postfix instance is still running and listens beyond loopback"
    exit 1
  fi
}

if ! command -v postfix >/dev/null 2>&1 || ! command -v postconf >/dev/null 2>&1; then
  install_postfix
fi
stop_default_instance
