#!/usr/bin/env bash
# Set up everything the demo and the tests need, idempotently:
#   - system packages (Mosquitto, PostgreSQL server binaries, systemd for
#     `systemd-analyze verify`, python3-venv, a C compiler and Python's headers for the optional compiled
#     kernels; for the tests also Chromium and the Noto CJK fonts, which the
#     browser tests of the display and console pages drive headless) when missing and we are root;
#   - a virtualenv in .venv with the project installed (agent + server + test extras).
# Re-running is cheap: apt-get runs only when something is missing, pip only when pyproject.toml, setup.py
# or the compiled kernels' source changed.
# Tests and the demo start private Mosquitto/PostgreSQL instances; nothing here starts a system service.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }

# --demo: Mosquitto, PostgreSQL and systemd are optional (the demo falls back to the embedded
# amqtt broker and skips the nightly retrain from PostgreSQL).
for_demo=false
[ "${1:-}" = "--demo" ] && for_demo=true

need_pkgs=()
have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
pg_ctl_path() {  # PATH first, else the newest Debian install (/usr/lib/postgresql/VERSION/bin)
  command -v pg_ctl 2>/dev/null && return 0
  ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1 | grep .
}
have_postgres() { [ -n "$(pg_ctl_path)" ]; }
have_mosquitto || need_pkgs+=(mosquitto)
# TEST_DATABASE_DSN points the tests at an existing server: then no local binaries are needed.
[ -n "${TEST_DATABASE_DSN:-}" ] || have_postgres || need_pkgs+=(postgresql)
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
# The browser tests (tests/test_display.py, tests/test_console.py) use Debian's Chromium through Playwright;
# the fonts make Hangul render. The demo itself needs neither: its pages are opened in the user's own browser.
have_cjk_fonts() {
  dpkg-query -W -f='${Status}' fonts-noto-cjk 2>/dev/null | grep -q 'ok installed' ||
    (command -v fc-list >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi 'Noto Sans CJK')
}
if ! $for_demo; then
  [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
  have_cjk_fonts || need_pkgs+=(fonts-noto-cjk)
fi
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then need_pkgs+=(python3 python3-venv python3-dev); fi
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_pkgs+=(python3-venv)
fi
# The recommenders' optional compiled kernels (setup.py, agent/recommenders/native.py) need a C compiler and
# Python's headers; without them pip still installs and the recommenders run their numpy code.
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
if command -v "$PY" >/dev/null 2>&1 && ! "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1; then
  need_pkgs+=(python3-dev)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting services (mosquitto on 1883, PostgreSQL's main cluster on
    # 5432): the usual Docker policy-rc.d, only for this install and only when there is none already.
    made_policy=false
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      made_policy=true
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    if $made_policy; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  elif $for_demo && [ -z "$(printf '%s\n' "${need_pkgs[@]}" | grep -vxE 'mosquitto|postgresql|systemd|gcc|python3-dev')" ]; then
    demo_pkgs=()  # systemd is only for the tests' `systemd-analyze verify`
    for pkg in "${need_pkgs[@]}"; do
      case $pkg in
        mosquitto) say "mosquitto is not installed and we are not root: the demo will use the embedded amqtt broker"
                   demo_pkgs+=(mosquitto) ;;
        postgresql) say "PostgreSQL is not installed and we are not root:" \
                        "the demo will skip the nightly retrain from PostgreSQL"
                    demo_pkgs+=(postgresql) ;;
        gcc|python3-dev) say "$pkg is not installed and we are not root:" \
                             "the recommenders will run their numpy code (slower, same answers)"
                         demo_pkgs+=("$pkg") ;;
      esac
    done
    if [ ${#demo_pkgs[@]} -gt 0 ]; then say "(for the full demo:  sudo apt-get install ${demo_pkgs[*]})"; fi
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
stamp=.venv/.installed-$(cat pyproject.toml setup.py agent/recommenders/_native.c | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  say "installing Python packages into .venv (first time: a few minutes, TensorFlow is large)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[server,demo,test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
kernels=$(.venv/bin/python -c 'from agent.recommenders import native; print(native.status())' 2>&1 | tail -1)
say "recommenders' hot path: $kernels"
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
pg_ctl=$(pg_ctl_path || true)
say "ready: $(.venv/bin/python --version), $( ("$mosq" -h 2>/dev/null || echo 'no mosquitto') | head -1)," \
    "$( ("${pg_ctl:-pg_ctl}" --version 2>/dev/null || echo 'no PostgreSQL server') | head -1)"
