#!/usr/bin/env bash
# Issue [9/9] in one call on a lent GPU machine: the whole training-throughput measurement of
# jaxmu/configs/bench.py:gpu (ResNet-18 both stems, airbench94, TinyViT-11M, small CNN at 32x32, batch
# 256 per model, stacks of 1/16/4/64, vmap and loop, bf16 and fp32, most important rows first),
# with the projections, in under 10 minutes on an H100.
#
#   bash launch/gpu_bench.sh            # on the device machine, from the repository root
#   bash launch/gpu_bench.sh --config.steps=1 ...   # extra flags go to the first benchmark
#
# Then, within DISPATCH_BUDGET seconds (default 150), jaxmu/configs/bench.py:gpu_dispatch: train.fit's
# model-steps/s with each epoch dispatched per step vs scanned as one program (CIFAR-stem
# ResNet-18 and the small CNN, bf16, N = 1 and 16, vmap and loop), which decides the epoch mode
# `auto` picks on GPUs (jaxmu.parallel.Strategy.scans); DISPATCH_ARGS adds flags to it.
#
# Writes into $OUT (default runs/gpu_bench): bench_gpu.json (rows + device and versions),
# bench_gpu.md (table + projections), bench_gpu.log, bench_dispatch.{json,md,log}, env.txt
# (nvidia-smi, jax devices).
# The device image has jax/flax/optax/orbax/absl but not ml_collections: carry its wheel
# (here: `python3 -m pip download --no-deps ml_collections==1.1.0 -d .whl`, `.whl` ignored by
# git, and name `.whl` in the run's carry); it is installed into /tmp/site when present.
# BUDGET (seconds, default 420) bounds the rows started; rows already measured are kept.
set -uo pipefail
OUT=${OUT:-runs/gpu_bench}
BUDGET=${BUDGET:-420}
DISPATCH_BUDGET=${DISPATCH_BUDGET:-150}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAXMU_CACHE=/tmp/jaxmu_cache
PY=${PYTHON:-python3}
if ! $PY -c "import ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  else
    echo "ml_collections is missing: carry its wheel in .whl (see the header of $0)" >&2
    exit 1
  fi
fi
{ nvidia-smi; $PY -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
timeout $((BUDGET + 150)) $PY -m jaxmu benchmark --config=bench:gpu \
    --config.time_budget_s="$BUDGET" --out="$OUT/bench_gpu.json" --out_md="$OUT/bench_gpu.md" \
    "$@" 2>&1 | tee "$OUT/bench_gpu.log"
status=${PIPESTATUS[0]}
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
# shellcheck disable=SC2086  # DISPATCH_ARGS holds several flags
timeout "$DISPATCH_BUDGET" $PY -m jaxmu benchmark --config=bench:gpu_dispatch \
    --out="$OUT/bench_dispatch.json" --out_md="$OUT/bench_dispatch.md" ${DISPATCH_ARGS:-} \
    2>&1 | tee "$OUT/bench_dispatch.log"
[ -f "$OUT/bench_dispatch.md" ] && cat "$OUT/bench_dispatch.md"
exit "$status"
