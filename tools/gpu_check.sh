#!/usr/bin/env bash
# GPU check (<= 7 minutes): the CUDA-parametrized tests, one quick `prunelib run` on CUDA, a
# short table, then every method's hook overhead per training step on CUDA (issue 15's table:
# `python -m prunelib.bench`, ResNet-56 at batch 64, median of interleaved rounds with spread). Run from the repository root on a machine with a CUDA GPU:
#   PRUNELIB_DATA=<folder with cifar10_{train,test}.npz> bash tools/gpu_check.sh
# CI never needs this; it is how we check that everything is device-agnostic.
set -uo pipefail
cd "$(dirname "$0")/.."
export PRUNELIB_CACHE="${PRUNELIB_CACHE:-$(mktemp -d)}"
OUT="${OUT:-$(mktemp -d)}"
python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
t0=$(date +%s)
python -m pytest -q -p no:cacheprovider -o addopts="" -k "cuda" tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 5
tests_rc=${PIPESTATUS[0]}
t1=$(date +%s)
prunelib run --method ns --model resnet20 --target-macs 0.5 --scale quick --device cuda \
  --quiet --out "$OUT/gpu_run.json" 2>&1 | tail -n 3
run_rc=${PIPESTATUS[0]}
t2=$(date +%s)
python - "$OUT/gpu_run.json" "$tests_rc" "$run_rc" "$((t1 - t0))" "$((t2 - t1))" <<'PY'
import json, sys
path, trc, rrc, ts, rs = sys.argv[1:]
print(f"{'check':38s} {'result':>30s}")
print(f"{'CUDA-parametrized tests (rc)':38s} {trc:>30s}   {ts}s")
try:
    r = json.load(open(path))
    a = r["accuracy"]
    print(f"{'prunelib run ns resnet20 quick (rc)':38s} {rrc:>30s}   {rs}s")
    print(f"{'  MACs kept':38s} {r['pruned']['macs_ratio']:30.3f}")
    print(f"{'  acc dense/reg/removed/finetuned':38s} "
          f"{a['dense']:6.2f}/{a['regularized']:6.2f}/{a['removed']:6.2f}/{a['finetuned']:6.2f}")
    for b in ("batch1", "batch64"):
        l = r["latency"][b]
        print(f"{'  latency ' + b + ' dense/pruned ms':38s} "
              f"{l['dense_ms']:14.2f}/{l['pruned_ms']:.2f} (x{l['speedup']:.2f})")
except Exception as e:  # noqa: BLE001
    print("no run result:", e)
PY
timeout 240 python -m prunelib.bench --section overhead --device cuda --rounds 5 --steps 10 \
  2>&1 | tee "$OUT/gpu_overhead.txt" | tail -n 25
[ "$tests_rc" = 0 ] && [ "$run_rc" = 0 ]
