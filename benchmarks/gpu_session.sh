#!/usr/bin/env bash
# One lent-GPU session, everything that needs the card in one call (the lease is 15 minutes, start included).
# Run from the repo root on the GPU machine, with the wheels medssl needs beyond that machine's image in .whl/
# (monai, pydantic + pydantic-core + annotated-types + typing-inspection, nibabel):
#     bash benchmarks/gpu_session.sh        # results under $OUT (or ./gpu_out)
#     PARTS="pretrain_eager tests" bash benchmarks/gpu_session.sh     # only some parts
# Each part has its own time limit, so one hang or failure does not cost the others.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc;
  python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"; } 2>&1 | tee "$OUT/env.txt"

PARTS=${PARTS:-pretrain_eager pretrain_compiled views tests}
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s"
  grep -E '^\{' "$OUT/$name.log" | tail -n 12
}

# 1. end-to-end pretraining, same card, same run: the tutorial recipe vs medssl's 3D MAE ViT-B (eager)
part pretrain_eager 170 python3 benchmarks/bench_pretrain_gpu.py --workers 16 --batch 256 \
  --variants tutorial,medssl-maeviews,medssl --json "$OUT/pretrain_eager.json"
# 2. the same medssl configs under torch.compile
part pretrain_compiled 220 python3 benchmarks/bench_pretrain_gpu.py --batch 256 --compile \
  --variants medssl-maeviews,medssl --json "$OUT/pretrain_compiled.json"
# 3. data path on the card: crops gathered + two views, vs the tutorial chain on 1 and 16 CPU processes
part views 90 python3 benchmarks/bench_views.py --device cuda --batch 64 256 --rounds 2 --with-tutorial \
  --tutorial-procs 1 16 --json "$OUT/views_gpu.json"
# 4. correctness on the card: device crops == CPU crops, same weights, exact resume (CUDA parametrisations)
part tests 90 python3 -m pytest tests/test_device_crops.py -q -p no:cacheprovider
[[ -f "$OUT/tests.log" ]] && tail -n 5 "$OUT/tests.log"
