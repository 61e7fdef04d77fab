#!/usr/bin/env bash
# The compiled kernels on aarch64 (a Jetson's CPU), checked on an x86 machine under emulation.
#
#   sudo bash scripts/check_aarch64.sh [PARAMETERS...]
#
# Cross-compiles agent/recommenders/_native.c for aarch64, runs Debian's aarch64 Python 3.11
# under qemu-user (as a Jetson Nano's Cortex-A57) with PyPI's aarch64 wheels of the agent's
# dependencies (the versions in .venv), then:
#   * the kernel tests of tests/test_native.py that need no trained models (TensorFlow is x86 here);
#   * scripts/aarch64_answers.py on each PARAMETERS directory (default: a small store trained
#     here by .venv's retrain-server, and bench/data/params-50000-member if the benchmarks made
#     it): every guest and member answer with the kernels equals the numpy code's.
# Needs root (apt), network (Debian's arm64 packages, PyPI) and `scripts/bootstrap.sh` done.
# Not part of the test suite: it downloads ~60 MB and emulation is ~50x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=${AARCH64_WORKDIR:-/tmp/smart-basket-aarch64}
say() { printf '[check_aarch64] %s\n' "$*"; }
[ -x .venv/bin/python ] || { say "run scripts/bootstrap.sh first"; exit 2; }
[ "$(id -u)" = 0 ] || { say "needs root (apt-get)"; exit 2; }
mkdir -p "$W"

# 1. the cross compiler, qemu, Debian's aarch64 Python
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] && [ -e /usr/aarch64-linux-gnu/include/stdlib.h ] \
  || need+=(libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -x "$W/root/usr/bin/python3.11" ]; then
  say "Debian's aarch64 Python 3.11"
  dpkg --add-architecture arm64
  apt-get update -q >/dev/null
  mkdir -p "$W/debs" && chmod 777 "$W/debs"
  (cd "$W/debs" && apt-get download -q python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
     libpython3.11-stdlib:arm64 libpython3.11-dev:arm64 libexpat1:arm64 zlib1g:arm64 libffi8:arm64 \
     libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 libncursesw6:arm64 \
     libtinfo6:arm64 libreadline8:arm64 libstdc++6:arm64 libgcc-s1:arm64 libcrypt1:arm64 >/dev/null)
  mkdir -p "$W/root"
  for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$W/root"; done
fi

# 2. the agent's dependencies as aarch64 wheels, at the versions the x86 venv has
pins=$(.venv/bin/python -m pip freeze 2>/dev/null \
       | grep -iE '^(numpy|onnxruntime|paho-mqtt|pyyaml|orjson|prometheus-client|prometheus_client|cryptography)==' || true)
if [ ! -f "$W/site/.pins" ] || [ "$(cat "$W/site/.pins")" != "$pins" ]; then
  say "aarch64 wheels: $(echo $pins)"
  rm -rf "$W/site"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q --target "$W/site" --implementation cp --python-version 3.11 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --only-binary=:all: $pins pytest
  echo "$pins" > "$W/site/.pins"
fi

# 3. the kernels, cross-compiled with the flags setup.py gives them
rm -rf "$W/work" && mkdir -p "$W/work"
cp -a agent tests scripts pyproject.toml "$W/work/"
find "$W/work/agent" -name '*.so' -delete
aarch64-linux-gnu-gcc -shared -fPIC -O2 -ffp-contract=off -Wall -Wno-unused-parameter \
  -I"$W/root/usr/include/python3.11" -I"$W/root/usr/include" -I"$W/site/numpy/_core/include" \
  agent/recommenders/_native.c -o "$W/work/agent/recommenders/_native.cpython-311-aarch64-linux-gnu.so"

# 4. qemu's view of the machine: the aarch64 C library, and a Jetson Nano's /proc/cpuinfo (onnxruntime
#    reads it at import and crashes on the x86 host's)
mkdir -p "$W/prefix/proc"
ln -sfn /usr/aarch64-linux-gnu/lib "$W/prefix/lib"
for cpu in 0 1 2 3; do
  printf 'processor\t: %s\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n' "$cpu"
  printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd07\nCPU revision\t: 1\n\n'
done > "$W/prefix/proc/cpuinfo"
arm_python() {
  (cd "$W/work" && qemu-aarch64 -cpu cortex-a57 -L "$W/prefix" \
     -E LD_LIBRARY_PATH="$W/root/usr/lib/aarch64-linux-gnu:$W/root/lib/aarch64-linux-gnu" \
     -E PYTHONPATH="$W/site" -E OPENBLAS_NUM_THREADS=1 -E PYTHONDONTWRITEBYTECODE=1 \
     "$W/root/usr/bin/python3.11" "$@")
}
say "$(arm_python -c 'import platform; from agent.recommenders import native; print(platform.machine(), "Python", platform.python_version(), "-", native.status())')"

# 5. the kernel tests that need no trained models
arm_python -m pytest -q -p no:cacheprovider tests/test_native.py \
  -k "built_where or basket_votes or top_k_equals_numpy or scratch_and_outputs or nan_scores or id_index"

# 6. whole answers, kernels against numpy code
params=("$@")
if [ ${#params[@]} -eq 0 ]; then
  if [ ! -f "$W/small/parameters/manifest.json" ]; then
    say "training a small store on this machine (x86: TensorFlow)"
    rm -rf "$W/small" && mkdir -p "$W/small"
    .venv/bin/python -m retrain_server.cli synth --out "$W/small/data" >/dev/null
    .venv/bin/python -m retrain_server.cli --log-level WARNING train --products "$W/small/data/products.csv" \
      --purchases "$W/small/data/purchase_history.jsonl" --out "$W/small/parameters" --allow-unsigned
  fi
  params=("$W/small/parameters")
  [ -f bench/data/params-50000-member/manifest.json ] && params+=("$ROOT/bench/data/params-50000-member")
fi
for p in "${params[@]}"; do
  arm_python "$W/work/scripts/aarch64_answers.py" "$(cd "$p" && pwd)" 200
done
say "done: the kernels give the numpy code's answers on aarch64"
