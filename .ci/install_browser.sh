#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/test_browser.py drives /usr/bin/chromium through Playwright;
# Playwright's own browser downloads are not used). No-op when it is already there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    /usr/bin/chromium --version 2>/dev/null || true
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium
/usr/bin/chromium --version
