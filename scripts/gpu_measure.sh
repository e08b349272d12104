#!/usr/bin/env bash
# A second, shorter lent-GPU session over models already trained (scripts/gpu_session.sh made
# them): GPU speed with cuDNN autotuning and channels-last, then per dataset (concurrently)
# detection calibration, the paired quality bench on 1,000 images and `purifier eval` at the
# paper's L and R with z on the prior's sphere. Same deadline and packing rules as gpu_session.sh.
set -u
OUT=${OUT:-runs/gpu-out}
W=${W:-runs/gpu}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-230}
N=${N:-1000}
N_ADAPTIVE=${N_ADAPTIVE:-100}
EVAL_EXTRA=${EVAL_EXTRA:-}
PAPER_SPEC=${PAPER_SPEC:-paper}
source "$(dirname "$0")/gpu_lib.sh"
pack() {
  tar --exclude='cache' -czf "$OUT/results.tar.gz" "$W" models/*/card.json 2>/dev/null
  cp "$W/timeline.txt" "$OUT/timeline.txt" 2>/dev/null
}
log "host: $($PY -c 'import sys,torch;print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")')"

# speed, alone on the GPU
step speed-paper 50 $P bench --dataset mnist --device $DEVICE --cudnn-benchmark \
  --config paper-bf16-graph-cl=paper:precision=bf16,cuda_graph=true,channels_last=true \
  --batch-sizes 1,2048 --speed-images 4096 --out $W/bench-gpu-speed-paper-cl.json
step speed-fast 40 $P bench --dataset mnist --device $DEVICE --cudnn-benchmark \
  --config fast-graph-cl=fast:cuda_graph=true,channels_last=true \
  --batch-sizes 1,2048,8192 --speed-images 8192 --out $W/bench-gpu-speed-fast-cl.json
pack

per_dataset() {
  local ds=$1
  step calibrate-$ds 40 $P calibrate models/$ds --dataset $ds --device $DEVICE --projection fast \
    --n $N --batch-size 1000 --no-progress
  step bench-quality-$ds 50 $P bench --dataset $ds --device $DEVICE --model-dir models/$ds \
    --config $PAPER_SPEC --config fast --config fast-fp32=fast:precision=fp32 \
    --config paper-sphere=paper:latent_radius=1 --speed-images 0 --quality-images $N \
    --quality-batch 1000 --conditions clean,fgsm --out $W/bench-$ds-quality.json
  pack
  step eval-$ds-paper-sphere $(( $(left) - 8 )) $P eval models/$ds --device $DEVICE \
    --out $W/eval-$ds-paper-sphere --projection paper --latent-radius 1 --n $N \
    --attacks fgsm,pgd,cw,transfer,bpda --eps 0.1,0.2,0.3 --n-adaptive $N_ADAPTIVE \
    --adaptive-steps 20 --eot-samples 2 --batch-size 1000 --adaptive-batch 100 --no-progress $EVAL_EXTRA
}
per_dataset mnist &
per_dataset fashion-mnist &
wait
pack
log "done"
