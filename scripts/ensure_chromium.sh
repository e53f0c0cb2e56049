#!/usr/bin/env bash
# The browser test (tests/test_browser.py) drives JupyterLab with Debian's headless Chromium, not a
# browser Playwright downloads: this machine's network reaches Debian's mirror, not Playwright's CDN.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "$(/usr/bin/chromium --version 2>/dev/null || echo chromium) found"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (the JupyterLab browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    exit 0
fi
echo "error: the browser test needs /usr/bin/chromium; install it, e.g. 'sudo apt-get install chromium chromium-driver'" >&2
exit 1
