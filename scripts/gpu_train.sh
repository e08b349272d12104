#!/usr/bin/env bash
# Lent-GPU call 1 of 2 (issue 9): the generators get the lease.
#   1. check the CUDA-graph-captured WGAN-GP iteration against the eager one (10 updates,
#      identical random inputs, fp32), then train MNIST and Fashion-MNIST at once (one CUDA
#      stream each) for TRAIN_MIN minutes, resuming from $W/gan-<ds>/checkpoint when present, else
#      warm-starting from the shipped models/<ds> (generator + critic.safetensors);
#   2. export each generator (G or its EMA, whichever has the higher mean of purified clean and
#      transfer-attacked accuracy on held-out training images: --select-by defense),
#      continue its encoder where the encoder came along (scripts/lease.sh holds them out of a
#      call, so after a lease the CPU continues them: docs/DEVELOPING.md);
#   3. pack under $OUT: both model folders (generator, critic, card and any encoder: 15.5 MiB each,
#      enough for `train-gan --warm-start` next lease) and the logs. The exact checkpoints
#      (35 MiB each, parts < 16 MiB) and the snapshots stay in $W (git-ignored, kept on a warm
#      machine): call 2, scripts/gpu_eval.sh, returns the MNIST one with the results, and
#      `CKPT=fashion-mnist scripts/gpu_eval.sh` (or a plain copy) the other, budget permitting.
# Usage (GPU machine, repo root, data carried under ./data/<name>):
#   OUT=... bash scripts/gpu_train.sh          knobs: TRAIN_MIN BUDGET_S ITERS QUICK=1 DEVICE
set -u
OUT=${OUT:-runs/gpu-out}
W=${W:-runs/gpu-lease}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-575}
TRAIN_MIN=${TRAIN_MIN:-7.7}
ITERS=${ITERS:-200000}
SNAPSHOTS=${SNAPSHOTS:-10000,25000,50000,100000,150000,200000}
ENC_STEPS=${ENC_STEPS:-6000}
ENC_MIN=${ENC_MIN:-0.7}
CHECK=${CHECK:-10}
SELECT=${SELECT:-500}
QUICK=${QUICK:-0}
EXTRA=${EXTRA:-}
source "$(dirname "$0")/gpu_lib.sh"
OUT=$(cd "$OUT" && pwd)
MODELS=${MODELS:-models}   # where models/<ds> are read (warm start) and written (export)
WARM=(--warm-start "$MODELS/{dataset}")
if [ "$QUICK" = 1 ]; then  # a dry run on tiny settings; never touches the shipped models
  ITERS=6; SNAPSHOTS=2,4; ENC_STEPS=3; SELECT=4; MODELS=$W/quick-models; WARM=()
  mkdir -p "$MODELS"; cp -r models/mnist models/fashion-mnist "$MODELS/"
fi
log "host: $($PY -c 'import sys,torch;print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$W/nvidia-smi.txt" 2>&1

TRAIN_LIMIT=$(python3 -c "print(int(60*$TRAIN_MIN)+100)"); [ "$QUICK" = 1 ] && TRAIN_LIMIT=600  # CPU: slow export
step train-gan $TRAIN_LIMIT $P train-gan --dataset mnist,fashion-mnist \
  --data-dir "data/{dataset}" --device $DEVICE --iterations $ITERS --batch-size 64 --n-critic 5 --ema 0.999 \
  --seed 0 --run-dir "$W/gan-{dataset}" --out "$MODELS/{dataset}" --checkpoint-every 25000 \
  --sample-every 10000 --log-every 250 --snapshot-at $SNAPSHOTS --check-graph $CHECK --select-by defense --select-images $SELECT \
  --max-minutes "$TRAIN_MIN" --no-progress --resume "${WARM[@]}" $EXTRA
grep -E "graph vs eager|stopping|training from|it/s\)" "$W/train-gan.log" | tail -8

# --init keeps the encoder's hold-out (the last 2,000 MNIST / 5,000 Fashion-MNIST training images,
# which calibrate then uses); both encoders are continued with the random-haze stage they shipped with (docs/service.md).
# Only where the encoder came along: scripts/lease.sh holds the encoders out of a call (the models,
# data and code fill its 64 MiB without them), and then the CPU continues them after the lease.
for ds in mnist fashion-mnist; do
  if [ -f $MODELS/$ds/encoder.safetensors ]; then
    step train-encoder-$ds 75 $P train-encoder --dataset $ds --data-dir data/$ds --device $DEVICE \
      --model-dir $MODELS/$ds --precision bf16 --steps $ENC_STEPS --batch-size 256 --max-minutes "$ENC_MIN" \
      --init $MODELS/$ds/encoder.safetensors --latent-radius 1 --latent-weight 0 --lr 0.001 \
      --denoise-eps 0.3 &  # FAST's sphere (docs/speed.md)
  else
    log "$ds: no encoder in $MODELS/$ds (held out of the call); continue it on the CPU after the lease"
  fi
done
wait

for ds in mnist fashion-mnist; do
  mkdir -p "$W/models/$ds"; cp $MODELS/$ds/*.safetensors $MODELS/$ds/card.json "$W/models/$ds/" 2>/dev/null
  files=(generator.safetensors critic.safetensors card.json)
  [ -f $MODELS/$ds/encoder.safetensors ] && files+=(encoder.safetensors)
  tar -cf "$OUT/models-$ds.tar" -C "$MODELS/.." "${files[@]/#/$(basename "$MODELS")/$ds/}"
  cp "$W/gan-$ds/samples/$(ls "$W/gan-$ds/samples" | tail -1)" "$W/samples-$ds.png" 2>/dev/null
done
# 4. optionally (PROFILE_S > 0) the step profile (issue 9: 65 it/s per data set is not launch-bound any more):
#    graph-captured step as is / channels-last / bf16 autocast / both / the cheaper sn1 recipe
#    (spectral norm, no penalty, one critic step), and the eager step's top kernels
#    (PROFILE_VARIANTS=base,sn1 picks some). After the training, bounded, so it never costs the
#    generators their minutes.
#    Runs after the models are packed, within what is left of BUDGET_S, so a slow profile can
#    never cost the lease its generators.
PS=${PROFILE_S:-0};  # measured on 2026-11-27 (docs/results.md); PROFILE_S=60 profiles again
 [ $(( $(left) - 10 )) -lt "$PS" ] && PS=$(( $(left) - 10 ))
if [ "$PS" -gt 0 ]; then
  PIT=300; [ "$QUICK" = 1 ] && PIT=2
  step profile-gan-step "$PS" $PY scripts/profile_gan_step.py --dataset mnist --data-dir data/mnist \
    --device $DEVICE --iterations $PIT --profile --out "$OUT/profile-gan-step.json" \
    ${PROFILE_VARIANTS:+--variants $PROFILE_VARIANTS}
fi

(cd "$W" && tar -czf "$OUT/logs1.tar.gz" --ignore-failed-read *.log *.txt samples-*.png gan-*/samples) 2>/dev/null
ls -la "$OUT" | tee -a "$W/timeline.txt"
log "done"
