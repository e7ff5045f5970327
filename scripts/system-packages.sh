#!/usr/bin/env bash
# The system (Debian) packages the test suite needs beyond Python and the services:
#   chromium, chromium-driver  open `astronn-dist report`'s page headless (tests/test_report.py)
#   openssl                    makes the self-signed certificate of the TLS Sentinel test
#   iproute2                   `ip netns`, veth and bridges for the hosts tests (tests/test_hosts.py)
# Called by `make test`; idempotent: apt is skipped when every program is already there.
# Needs root to install (CI runs as root).
set -euo pipefail
declare -A program=([chromium]=/usr/bin/chromium [chromium-driver]=/usr/bin/chromedriver
                    [openssl]=openssl [iproute2]=ip)
missing=()
for package in "${!program[@]}"; do
  command -v "${program[$package]}" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/system-packages.sh: missing ${missing[*]}; as root run:" >&2
  echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "${missing[@]}"
