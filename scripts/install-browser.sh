#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the console's browser tests (tests/test_console_browser.py).
# The browser comes from the distribution's packages, never from a download of its own.
# Does nothing when both are already installed; needs root (CI runs as root) otherwise.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-browser: not root or no apt-get: install Debian's chromium and chromium-driver" \
         "yourself; the browser tests are skipped without them" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "install-browser: chromium and chromium-driver installed"
