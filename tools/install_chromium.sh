#!/usr/bin/env bash
# Chromium for the website's browser test (tests/test_site.py), from Debian's packages, when it
# is missing and apt-get can run as root (CI, containers). Elsewhere it says what to do and exits
# 0: the browser test then skips (and fails where PRUNELIB_SITE_REQUIRED=1, as in .ci/run).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  /usr/bin/chromium --version
else
  echo "install_chromium: install Chromium at /usr/bin/chromium for tests/test_site.py" >&2
fi
