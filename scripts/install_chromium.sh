#!/usr/bin/env bash
# Debian's chromium for the end-to-end browser test (Playwright drives it; no browser download).
# Best effort: where apt is not usable, the browser test is skipped and says why.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
if ! $SUDO apt-get install -y -q chromium >/dev/null 2>&1; then
  $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1
fi
command -v chromium >/dev/null 2>&1 || echo "chromium could not be installed with apt: tests/app/test_web_page.py will be skipped"
exit 0
