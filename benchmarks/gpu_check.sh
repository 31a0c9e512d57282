#!/bin/bash
# The one-shot check of the CUDA paths, for a session that is lent a GPU for a few minutes:
#   1. the tests that skip without CUDA (tests/test_evaluate.py, test_augment.py, test_inference.py,
#      engine/test_amp.py);
#   2. the cost benchmark at ResNet-50 / crop 321 (FARCLUSS against its FixMatch and UniMatch
#      skeletons, time and memory);
#   3. a few iterations of the GPU own-data recipe (configs/own_data_gpu.yaml: ResNet-50, crop 321,
#      sliding evaluation) on the built-in digits dataset, launched by torchrun, in fp16 with its
#      GradScaler, then resumed from its checkpoint;
#   4. the cost of UniMatch V2's step on DINOv2-B + DPT at crop 518 beside ResNet-101.
# With one GPU torchrun starts one process, which needs no process group: NCCL and SyncBatchNorm
# are checked only where NPROC=2 (two GPUs) is given.
# Each step has its own time limit and log; a failing step does not stop the others.
#
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh        # about 7 minutes on one H200
#
# ImageNet weights cannot be downloaded on a machine without internet: the recipe runs with
# model.pretrained=null there, which changes the accuracy, not the code path being checked.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/farcluss_gpu_check}

step() {
    local name=$1 limit=$2; shift 2
    local start; start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, $(( $(date +%s) - start )) s"
    tail -n "${TAIL:-22}" "$OUT/$name.log"
}

nvidia-smi -L 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_evaluate.py tests/test_augment.py \
    tests/test_inference.py tests/engine/test_amp.py

step cost_r50_321 150 $PY benchmarks/step_cost.py --backbone resnet50 --base-width 64 --crop 321 \
    --batch 8 --classes 21 --device cuda --amp bf16 --iterations 10 --warmup 3 --no-sweeps \
    --no-data-wait --json "$OUT/cost_r50_321.json"

rm -rf "$WORK"; mkdir -p "$WORK"
TAIL=3 step digits 60 $PY -m farcluss data make-digits "$WORK/digits" --num-train 320 --num-val 40 \
    --num-test 40
recipe=(configs/own_data_gpu.yaml --set data.root="$WORK/digits" --set model.pretrained=null
        --set train.epochs=null --set train.amp=fp16 --set train.num_workers=4
        --set train.eval_interval=40 --set train.checkpoint_interval=40 --set train.log_interval=10)
step train_fp16 120 $PY -m torch.distributed.run --standalone --nproc_per_node=${NPROC:-1} -m farcluss \
    train "${recipe[@]}" --set train.iterations=40 --out "$WORK/run"
# the same run continued to 60 iterations from its checkpoint (resume on CUDA, GradScaler state)
step resume_fp16 90 $PY -m torch.distributed.run --standalone --nproc_per_node=${NPROC:-1} -m farcluss \
    train "${recipe[@]}" --set train.iterations=60 --out "$WORK/run" --resume
# the logged train records (seconds per iteration of each window, data wait), not the whole file:
# only a few files come back from a lent machine
step train_records 30 $PY -c "
import sys
from farcluss.report import read_metrics, train_records
for r in train_records(read_metrics(sys.argv[1])):
    print({k: r[k] for k in ('iteration', 'loss_sup', 'seconds_per_iteration', 'data_wait_fraction') if k in r})
" "$WORK/run/metrics.jsonl"
TAIL=14 step cost_vitb_518 120 $PY benchmarks/step_cost.py --backbone dinov2_vitb14 --crop 518 \
    --batch 4 --classes 21 --device cuda --amp bf16 --iterations 6 --warmup 2 \
    --json "$OUT/cost_vitb_518.json"

exit 0
