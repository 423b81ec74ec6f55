#!/usr/bin/env bash
# Creates .venv (Python 3.11+) with the CPU build of torch and this package, once; later calls return at once.
# The web-page test drives Debian's Chromium (/usr/bin/chromium): when it is missing and this runs as root, it is
# installed with apt-get (otherwise: `sudo apt-get install -y chromium`). Playwright never downloads a browser here.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the web-page test" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
      || echo "setup: apt-get could not install chromium; the web-page test will fail until it is installed" >&2
  else
    echo "setup: chromium is missing; the web-page test needs it: sudo apt-get install -y chromium" >&2
  fi
fi
PY=${PYTHON:-python3}
stamp_key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp_key" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned to the CPU wheel, so nothing later resolves torch to a CUDA build.
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# lmms-eval's model API, for the plugin test against the real thing; --no-deps because its dependencies pull
# torchvision and with it a CUDA build of torch.
.venv/bin/python -m pip install -q --no-deps "lmms-eval==0.7.3" pytz loguru
echo "$stamp_key" > .venv/.setup-stamp
