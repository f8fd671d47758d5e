#!/usr/bin/env bash
# The browser test (tests/test_rupa_browser.py) drives Debian's headless Chromium through Debian's
# chromedriver (selenium, the system browser, never a browser download). This makes sure both
# are installed: Debian's packages, installed with apt-get when missing (as root or with sudo).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
echo "labsync: installing headless Chromium (Debian packages 'chromium' and 'chromium-driver') for the browser test"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
