#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on a lent GPU machine that has torch but not these (its image lacks
# bitsandbytes, trl and datasets, and holds older transformers/peft), at the versions installed here, into .whl/
# (git-ignored) for the device tool's `carry`:
#
#   bash bench/gpu_wheels.sh [DIR]      # default .whl; then on the device: bash bench/gpu_check.sh --wheels .whl
#
# Pure-Python wheels, and bitsandbytes' manylinux x86-64 one (CUDA kernels included), for CPython 3.12. The device
# carries at most 64 MiB a call with the working tree: the total is printed, and the script fails above 60 MiB.
set -euo pipefail

DIR=${1:-.whl}
cd "$(dirname "$0")/.."
PACKAGES=(bitsandbytes transformers peft trl datasets dill multiprocess)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$(python3 -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$version" ] || { echo "gpu_wheels: $name is not installed here; run pip install -e \".[test,bench]\" first" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p "$DIR"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DIR" "${pins[@]}"
# One version of each package: an older wheel left in DIR would stop the install there.
for name in "${PACKAGES[@]}"; do
  keep="$name-$(python3 -m pip show "$name" | awk '/^Version:/{print $2}')-"
  for f in "$DIR"/"$name"-*.whl; do
    case $(basename "$f") in "$keep"*) ;; *) echo "removing $(basename "$f") (not the version installed here)"; rm -f "$f" ;; esac
  done
done
ls -la "$DIR"/*.whl | awk '{printf "%8.1f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
awk -v b="$total" 'BEGIN { printf "total %.1f MiB (the device carries 64 MiB a call, the working tree included)\n", b / 1048576 }'
[ "$total" -le $((60 * 1048576)) ] || { echo "gpu_wheels: over 60 MiB; carry fewer packages" >&2; exit 1; }
