#!/usr/bin/env bash
# One prepared GPU run (fits the few minutes a lent GPU is available): the demo path on CUDA, unchanged,
# then throughput at ViT-B/16 scale. Wheels the GPU machine lacks travel in .whl/ (see docs/benchmarks.md).
# Usage on the GPU machine, from the repo root:  bash scripts/gpu_check.sh [OUTDIR]
# BENCH_GPU=1 adds step 3, `scripts/bench_gpu.py` (every fusion switch on/off + the open_clip baseline at
# ViT-B/16, < 8 min): its table is appended to a copy of docs/benchmarks.md in OUTDIR. BENCH_GPU=only runs
# nothing else (when the lent machine's time only allows that); SKIP_B16=1 stops after step 1.
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUTDIR=${1:-${OUT:-/tmp/mmpt-gpu}}
mkdir -p "$OUTDIR"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  DS="python3 /tmp/site/bin/deepspeed"
else
  DS=deepspeed
fi
python3 - <<'PY' | tee "$OUTDIR/env.txt"
import torch, deepspeed, megatron.core, webdataset
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("deepspeed", deepspeed.__version__, "megatron-core", megatron.core.__version__)
PY
git rev-parse HEAD 2>/dev/null | tee -a "$OUTDIR/env.txt" || true
if [ "${BENCH_GPU:-0}" = only ]; then
  cp docs/benchmarks.md "$OUTDIR/benchmarks.md"
  echo "== 3. fusion switches and open_clip baseline, ViT-B/16 (scripts/bench_gpu.py)"
  python3 scripts/bench_gpu.py --out "$OUTDIR/benchmarks.md" --json-out "$OUTDIR/bench_gpu.json"
  exit 0
fi
echo "== 0. CUDA tests: towers, bf16 on device, fp16 / fused Adam / fused LayerNorm against the plain path,"
echo "     fp32 MAE noise, the logit-scale ceiling through the engine, fp8 vs bf16 losses (tests that need several"
echo "     ranks deselected)"
python3 -m pytest -q -rs -p no:cacheprovider tests/unit/test_model_cuda.py tests/unit/test_train_inputs.py \
  tests/unit/test_nonfinite_guard.py tests/unit/test_fp8.py tests/e2e/test_logit_scale.py -k "not two_ranks" 2>&1 | tail -12 \
  | tee "$OUTDIR/cuda_tests.txt" || echo "CUDA tests FAILED (see above); going on with the runs" | tee -a "$OUTDIR/cuda_tests.txt"
D=/tmp/mmpt-data
python3 -m pretrain.cli data synth $D/train64 --overwrite --samples 12000 --samples-per-shard 500 --image-size 64 --seed 0 >/dev/null
python3 -m pretrain.cli data synth $D/val64 --overwrite --samples 1000 --samples-per-shard 500 --image-size 64 --seed 1 >/dev/null

echo "== 1. demo recipe on CUDA (deepspeed launcher, 1 GPU, ZeRO-3, bf16)"
t0=$(date +%s)
$DS --num_gpus 1 --no_local_rank --module pretrain.cli train --config configs/demo.yaml \
  "data.train=$D/train64/shard-{000000..000023}.tar" run.dir=/tmp/run-demo --overwrite-run data.workers=4 logging.progress=false
python3 -m pretrain.cli eval --checkpoint /tmp/run-demo --data "$D/val64/shard-{000000..000001}.tar" \
  --classnames $D/val64/classnames.txt --json | tee "$OUTDIR/demo_eval.json"
echo "demo wall_s $(( $(date +%s) - t0 ))" | tee -a "$OUTDIR/env.txt"
cp /tmp/run-demo/summary.json "$OUTDIR/demo_summary.json"

if [ "${SKIP_B16:-0}" = 1 ]; then echo "== 2. skipped (SKIP_B16=1)"; exit 0; fi
echo "== 2. ViT-B/16-scale CLIP+MAE+MLM throughput, bf16, ZeRO-3, 1 GPU"
python3 -m pretrain.cli data synth $D/train224 --overwrite --samples 8000 --samples-per-shard 250 --image-size 224 --seed 0 >/dev/null
$DS --num_gpus 1 --no_local_rank --module pretrain.cli train --config configs/demo.yaml \
  "data.train=$D/train224/shard-{000000..000031}.tar" run.dir=/tmp/run-b16 --overwrite-run data.workers=12 logging.progress=false \
  model.image_size=224 model.embed_dim=512 model.vision.patch_size=16 model.vision.width=768 model.vision.layers=12 \
  model.vision.heads=12 model.text.width=512 model.text.layers=12 model.text.heads=8 model.text.context_length=77 \
  model.decoder.width=512 model.decoder.layers=4 model.decoder.heads=16 data.vocab_size=4096 \
  train.micro_batch=256 train.steps=60 logging.every=10 checkpoint.every=0 optim.warmup_steps=10
cp /tmp/run-b16/metrics.jsonl "$OUTDIR/b16_metrics.jsonl"
cp /tmp/run-b16/summary.json "$OUTDIR/b16_summary.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUTDIR/env.txt"

if [ "${BENCH_GPU:-0}" != 0 ]; then
  echo "== 3. fusion switches and open_clip baseline, ViT-B/16 (scripts/bench_gpu.py)"
  cp docs/benchmarks.md "$OUTDIR/benchmarks.md"
  python3 scripts/bench_gpu.py --out "$OUTDIR/benchmarks.md" --json-out "$OUTDIR/bench_gpu.json"
fi
