#!/usr/bin/env bash
# Set up everything the demo and the tests need, idempotently:
#   - system packages (Mosquitto, python3-venv) when missing and we are root;
#   - a virtualenv in .venv with the project installed (agent + server + test extras).
# Re-running is cheap: pip runs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }

# --demo: Mosquitto is optional (the demo falls back to the embedded amqtt broker).
for_demo=false
[ "${1:-}" = "--demo" ] && for_demo=true

need_pkgs=()
have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
have_mosquitto || need_pkgs+=(mosquitto)
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then need_pkgs+=(python3 python3-venv); fi
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_pkgs+=(python3-venv)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  elif $for_demo && [ "${need_pkgs[*]}" = "mosquitto" ]; then
    say "mosquitto is not installed and we are not root: the demo will use the embedded amqtt broker"
    say "(for the real broker:  sudo apt-get install mosquitto)"
  else
    say "missing system packages: ${need_pkgs[*]}"
    say "run as root, or install them first:  sudo apt-get install ${need_pkgs[*]}"
    exit 1
  fi
fi

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  say "Python >= 3.10 is required ($("$PY" --version 2>&1) found); set PYTHON=/path/to/python3.x"
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating virtualenv .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  say "installing Python packages into .venv (first time: a few minutes, TensorFlow is large)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[server,demo,test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
say "ready: $(.venv/bin/python --version), $( ("$mosq" -h 2>/dev/null || echo 'no mosquitto') | head -1)"
