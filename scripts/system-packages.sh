#!/usr/bin/env bash
# The system (Debian) packages the test suite needs beyond Python: Chromium and its WebDriver,
# which open `astronn-dist report`'s page headless (tests/test_report.py). Called by `make test`;
# idempotent: apt is skipped when both are already installed. Needs root (CI runs as root).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/system-packages.sh: Chromium is missing; as root run:" >&2
  echo "  apt-get update && apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium chromium-driver
