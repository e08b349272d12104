#!/usr/bin/env bash
# One lent-GPU session, end to end, inside one time budget (a lease is ~15 minutes in all):
#   1. CUDA correctness tests (pytest -m gpu), alongside
#   2. WGAN-GP training of both generators (concurrently), then their encoders;
#   3. GPU speed benchmark (alone on the GPU): eager, whole-search CUDA graph;
#   4. per dataset (concurrently): detection calibration, paired quality bench (paper vs
#      fast, clean + FGSM, 1,000 images), `purifier eval` at the paper and fast settings.
# Every step has a deadline from the script's start; whatever finished is packed under
# $OUT (models per dataset, results, logs) as it finishes, so a cut run still returns work.
#
# Usage (on the GPU machine, repo root, data under ./data/<name>):
#   OUT=/some/dir bash scripts/gpu_session.sh
# Knobs (environment): TRAIN_MIN, BUDGET_S, DEVICE, N, N_ADAPTIVE, SPEED_IMAGES, QUICK=1 (a CPU
# dry run of the script with tiny settings).
set -u
OUT=${OUT:-runs/gpu-out}
W=${W:-runs/gpu}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-575}
TRAIN_MIN=${TRAIN_MIN:-3.3}
N=${N:-1000}
N_ADAPTIVE=${N_ADAPTIVE:-100}
ADAPTIVE_STEPS=${ADAPTIVE_STEPS:-20}
SPEED_IMAGES=${SPEED_IMAGES:-4096}
BATCHES=${BATCHES:-1,256,2048}
ENC_STEPS=${ENC_STEPS:-6000}
ENC_MIN=${ENC_MIN:-0.8}
SWEEP_N=${SWEEP_N:-500}
QUICK=${QUICK:-0}
PAPER_SPEC=${PAPER_SPEC:-paper}   # QUICK dry runs shrink it, e.g. paper=paper:steps=5,restarts=2
EVAL_EXTRA=${EVAL_EXTRA:-}       # e.g. "--steps 5 --restarts 2" for a dry run
source "$(dirname "$0")/gpu_lib.sh"
pack_models() {
  for ds in mnist fashion-mnist; do
    [ -f models/$ds/generator.safetensors ] || continue
    tar -cf "$OUT/models-$ds.tar" models/$ds/generator.safetensors models/$ds/card.json \
      $( [ -f models/$ds/encoder.safetensors ] && echo models/$ds/encoder.safetensors ) 2>/dev/null
  done
}
pack_results() {
  tar --exclude='cache' --exclude='*.pt' --exclude='checkpoint*' -czf "$OUT/results.tar.gz" "$W" 2>/dev/null
  cp "$W/timeline.txt" "$OUT/timeline.txt" 2>/dev/null
}

log "host: $(hostname) python: $($PY -c 'import sys,torch;print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")')"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv > "$W/nvidia-smi.txt" 2>&1
$PY -c 'import grpc, google.protobuf as pb, safetensors, matplotlib; print("grpc", grpc.__version__, "protobuf", pb.__version__)' >> "$W/nvidia-smi.txt" 2>&1

# -- 1 + 2: tests and GAN training ---------------------------------------------------------------
if [ "$QUICK" = 1 ]; then ITERS=4; else ITERS=200000; fi
TRAIN_LIMIT=$(python3 -c "print(int(60*$TRAIN_MIN)+90)")
for ds in mnist fashion-mnist; do
  step train-gan-$ds "$TRAIN_LIMIT" $P train-gan --dataset $ds --device $DEVICE --iterations $ITERS \
    --batch-size 64 --n-critic 5 --ema 0.999 --seed 0 --run-dir $W/gan-$ds --out models/$ds \
    --checkpoint-every 100000 --sample-every 2000 --max-minutes "$TRAIN_MIN" --no-progress &
done
if [ "$DEVICE" = cuda ]; then
  step pytest-gpu 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/speed -rs &
fi
wait
for ds in mnist fashion-mnist; do cp $W/gan-$ds/samples/$(ls $W/gan-$ds/samples 2>/dev/null | tail -1) $W/samples-$ds.png 2>/dev/null; done
pack_models; pack_results

for ds in mnist fashion-mnist; do
  step train-encoder-$ds 90 $P train-encoder --dataset $ds --device $DEVICE --model-dir models/$ds \
    --precision bf16 --steps $ENC_STEPS --batch-size 256 --max-minutes "$ENC_MIN" &
done
wait
pack_models; pack_results

# -- 3: speed, alone on the GPU ------------------------------------------------------------------
step bench-speed-eager $(( $(left) - 200 > 90 ? 90 : $(left) - 200 )) $P bench --dataset mnist --device $DEVICE \
  --model-dir models/mnist --config $PAPER_SPEC --config paper-bf16=paper:precision=bf16 --config fast \
  --batch-sizes $BATCHES --speed-images $SPEED_IMAGES \
  --out $W/bench-gpu-speed-eager.json
if [ "$DEVICE" = cuda ]; then
  step bench-speed-graph $(( $(left) - 170 > 80 ? 80 : $(left) - 170 )) $P bench --dataset mnist --device $DEVICE \
    --model-dir models/mnist --config paper-bf16-graph=paper:precision=bf16,cuda_graph=true \
    --config fast-graph=fast:cuda_graph=true --batch-sizes $BATCHES \
    --speed-images $SPEED_IMAGES --out $W/bench-gpu-speed-graph.json
fi
pack_results

# -- 4: per dataset, concurrently: calibrate, quality, robustness --------------------------------
per_dataset() {
  local ds=$1 sub=""
  step calibrate-$ds 60 $P calibrate models/$ds --dataset $ds --device $DEVICE --projection fast \
    --n $N --batch-size 1000 --no-progress
  step bench-quality-$ds $(( $(left) - 90 > 90 ? 90 : $(left) - 90 )) $P bench --dataset $ds --device $DEVICE \
    --model-dir models/$ds --config $PAPER_SPEC --config fast --config fast-fp32=fast:precision=fp32 \
    --speed-images 0 --quality-images $N --quality-batch 1000 --conditions clean,fgsm \
    --out $W/bench-$ds-quality.json
  step eval-$ds-paper $(( $(left) - 40 )) $P eval models/$ds --device $DEVICE --out $W/eval-$ds-paper \
    --projection paper --n $N --attacks fgsm,pgd,cw,transfer,bpda --eps 0.1,0.2,0.3 \
    --n-adaptive $N_ADAPTIVE --adaptive-steps $ADAPTIVE_STEPS --eot-samples ${EOT:-2} \
    --sweep-l 10,25,50,100,200 --sweep-r 1,2,5,10 --sweep-n $SWEEP_N \
    --batch-size 1000 --adaptive-batch 100 --no-progress $EVAL_EXTRA
  step eval-$ds-fast $(( $(left) - 15 )) $P eval models/$ds --device $DEVICE --out $W/eval-$ds-fast \
    --projection fast --n $N --attacks fgsm,pgd,cw,transfer,bpda --eps 0.1,0.2,0.3 \
    --n-adaptive $N_ADAPTIVE --adaptive-steps $ADAPTIVE_STEPS --eot-samples ${EOT:-2} \
    --batch-size 1000 --adaptive-batch 100 --no-progress $EVAL_EXTRA
}
per_dataset mnist &
per_dataset fashion-mnist &
wait
pack_models; pack_results
log "done"
