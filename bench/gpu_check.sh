#!/usr/bin/env bash
# The GPU check: three benchmark parts in under 9 minutes on one H100/H200, each under its own timeout, each
# writing <out>/<n>-<name>.json and <n>-<name>.log the moment it ends, so a run cut off later still reports the
# parts that finished; a failed or timed-out part does not stop the next ones.
#
#   bash bench/gpu_check.sh [--out DIR] [--wheels DIR] [--timeouts 250,130,120] [--dry-run]
#
#   --out DIR       output folder (default $OUT, else ./gpu-check-out)
#   --wheels DIR    pip-install DIR/*.whl into a temp folder put first on PYTHONPATH (the device: --wheels .whl,
#                   made here by `bash bench/gpu_wheels.sh`: bitsandbytes, transformers, peft, trl, datasets)
#   --timeouts      seconds for parts 1,2,3 (a part gets TERM then, KILL 5 s later)
#   --dry-run       the same parts on CPU with tiny sizes, side by side (~40 s on 2 cores; tests/bench runs it)
#
# Expected on one H100/H200 (about 6 minutes; the limits add up to 8 min 20 s, plus the header and the install):
# header  nvidia-smi, versions, bf16 matmul 8192^3 (the hardware limit)                           ~10 s
# part 1  qlora_vs_hf.py --preset 7b --shapes 4x1024 --steps 6 --warmup 2 --stacks
#         anchor,ours,ours-compiled (each stack in its own process)                              ~2.5 min (limit 250 s):
#         parent and the 13.5 GB random checkpoint (drawn on 16 CPU threads, saved to /tmp) ~40 s, anchor ~45 s
#         and ours ~40 s (imports, 4-bit load, 6 steps), ours-compiled ~2 min (Inductor compile in the warmup);
#         its JSON is rewritten after each stack, so a timeout keeps the stacks that finished
# part 2  packing.py --device cuda: ours packed vs padded on real-length rows, and TRL's SFTTrainer with
#         padding_free=True on the same rows where trl and datasets import (else said, and left out) ~1.5 min (limit 130 s)
# part 3  qlora_70b_step.py: 80 layers, batch 1 x 2048, built from config.json, 3 steps          ~1 min (limit 120 s)
# summary one line per part: tok/s ours/anchor and compiled/anchor, packed/padded and packed/TRL, peak GiB and
#         PASS/FAIL
#
# Files: 1-qlora-7b.{json,log} 2-packing.{json,log} 3-70b-step.{json,log} summary.json (7; the device returns 8).
# A part's JSON: part, name, status (ok|partial|failed|timeout|skipped), rc, seconds, limit_s, command, key,
# numbers, result (the script's own JSON) and log_tail unless ok. Exit status 1 unless every part is ok or skipped.
set -uo pipefail

OUT_DIR=${OUT:-./gpu-check-out} DRY=0 WHEELS="" TIMEOUTS=""
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT_DIR=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --timeouts) TIMEOUTS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$TIMEOUTS" ] || TIMEOUTS=$([ "$DRY" = 1 ] && echo 150,150,150 || echo 250,130,120)
IFS=, read -r T1 T2 T3 <<<"$TIMEOUTS"
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1
[ -z "$WHEELS" ] || WHEELS=$(cd "$WHEELS" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1

PY=${PYTHON:-python3}
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null || PY=python
START=$(date +%s.%N)
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if [ -n "$WHEELS" ]; then
  echo "installing $WHEELS/*.whl into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

run_part() {  # run_part N NAME LIMIT_S COMMAND...: run it under timeout, log it, record its JSON
  local n=$1 name=$2 limit=$3; shift 3
  local log="$OUT_DIR/$n-$name.log" raw="$WORK/$n-$name.raw.json" t0 rc stacks=""
  [ "$n" = 1 ] && stacks=anchor,ours,ours-compiled
  echo; echo "=== part $n $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" --json "$raw" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  "$PY" bench/gpu_check.py record --out-dir "$OUT_DIR" --part "$n" --name "$name" --rc "$rc" --start "$t0" \
    --limit "$limit" --raw "$raw" --log "$log" --command "$*" --stacks "$stacks"
}

echo "=== gpu_check $([ "$DRY" = 1 ] && echo "--dry-run (CPU, tiny sizes)" || echo "(CUDA)"): out $OUT_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader
if [ "$DRY" = 1 ]; then
  DEV=cpu SIZE=256
  P1=(--device cpu --preset micro --steps 2 --warmup 1 --in-process --compute-dtype fp32 --compile-backend aot_eager
      --init-std 0.08)
  P2=(--device cpu --dry-run)
  P3=(--device cpu --layers 2 --hidden 128 --intermediate 256 --heads 4 --kv-heads 2 --vocab 512 --seq 64 --steps 2)
else
  DEV=cuda SIZE=8192
  P1=(--device cuda --preset 7b --shapes 4x1024 --steps 6 --warmup 2)
  P2=(--device cuda)
  P3=(--device cuda)
fi
part1() {
  run_part 1 qlora-7b "$T1" "$PY" bench/qlora_vs_hf.py "${P1[@]}" --stacks anchor,ours,ours-compiled \
    --workdir "$WORK/models"
}
part2() {
  local stacks=padded,packed
  if "$PY" -c "import trl, datasets" 2>/dev/null; then
    stacks=padded,packed,trl
  else
    echo; echo "part 2: TRL's anchor left out (trl or datasets does not import; carry them: bash bench/gpu_wheels.sh)"
  fi
  if [ -f bench/packing.py ]; then
    run_part 2 packing "$T2" "$PY" bench/packing.py "${P2[@]}" --stacks "$stacks"
  else
    echo; echo "part 2 skipped: bench/packing.py missing"
    "$PY" bench/gpu_check.py record --out-dir "$OUT_DIR" --part 2 --name packing --skipped "bench/packing.py missing"
  fi
}
part3() { run_part 3 70b-step "$T3" "$PY" bench/qlora_70b_step.py "${P3[@]}"; }

"$PY" bench/gpu_check.py header --device "$DEV" --size "$SIZE" --out-dir "$OUT_DIR" || echo "header failed"
if [ "$DRY" = 1 ]; then
  # On CPU each part is one import-bound thread (one torch thread each: more threads than idle cores make steps
  # 10-50x slower), so the three parts run side by side and their output is printed in order as they end.
  export OMP_NUM_THREADS=1
  pids=()
  for n in 1 2 3; do "part$n" >"$WORK/part$n.out" 2>&1 & pids+=($!); done
  for n in 1 2 3; do wait "${pids[n - 1]}"; cat "$WORK/part$n.out"; done
else
  part1; part2; part3
fi

echo
"$PY" bench/gpu_check.py summary --out-dir "$OUT_DIR" --start "$START"
