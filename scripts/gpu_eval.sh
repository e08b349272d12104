#!/usr/bin/env bash
# Lent-GPU call 2 of 2, on the machine scripts/gpu_train.sh just used (same $W): return one
# run's exact checkpoint (CKPT), then per data set (concurrently) `purifier eval` of the new models
# at the paper and fast settings (clean, oblivious FGSM, substitute-B transfer, the paper's
# black-box protocol; eps 0.3; then PGD, CW and BPDA+EOT at the paper setting) and the robustness-vs-iterations sweep over the snapshots
# (paper setting, SWEEP_N images). Results packed under $OUT as they finish.
set -u
OUT=${OUT:-runs/gpu-out}
W=${W:-runs/gpu-lease}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-230}
N=${N:-1000}
SWEEP_N=${SWEEP_N:-500}
ATTACKS=${ATTACKS:-fgsm,transfer,blackbox}
MORE=${MORE-pgd,cw,bpda}   # second pass at the paper setting ("" skips it)
EVAL_EXTRA=${EVAL_EXTRA:-}
source "$(dirname "$0")/gpu_lib.sh"
CKPT=${CKPT:-mnist}   # which run's exact checkpoint comes back (two do not fit one call's 64 MiB)
mkdir -p "$OUT/ckpt-$CKPT" && cp "$W"/gan-$CKPT/checkpoint/* "$OUT/ckpt-$CKPT/"
pack() { tar --exclude='cache' --exclude='checkpoint' --exclude='*.safetensors' -czf "$OUT/results2.tar.gz" "$W" 2>/dev/null; }

per_dataset() {
  local ds=$1 m=$W/models/$1
  step eval-$ds-paper $(( $(left) * 40 / 100 )) $P eval "$m" --dataset $ds --data-dir data/$ds --device $DEVICE \
    --out "$W/eval-$ds-paper" --projection paper --n $N --attacks $ATTACKS --eps 0.3 --batch-size 1000 \
    --no-progress $EVAL_EXTRA
  # fast starts at E(x): without the encoder for this generator (held out of the call) its numbers
  # would describe a projection nobody serves, so the CPU measures fast after continuing the encoder
  if [ -f "$m/encoder.safetensors" ]; then
    step eval-$ds-fast $(( $(left) * 30 / 100 )) $P eval "$m" --dataset $ds --data-dir data/$ds --device $DEVICE \
      --out "$W/eval-$ds-fast" --projection fast --n $N --attacks $ATTACKS --eps 0.3 --batch-size 1000 \
      --no-progress $EVAL_EXTRA
  else
    log "SKIP eval-$ds-fast (no encoder in $m: measured on the CPU after the lease)"
  fi
  pack
  # then the white-box and adaptive rows at the paper setting (PGD, CW, BPDA+EOT on 100 images),
  # resumed into the same folder: if the time runs out, the rows above are already written
  [ -n "$MORE" ] && step eval-$ds-paper-more $(( $(left) * 50 / 100 )) $P eval "$m" --dataset $ds --data-dir data/$ds \
    --device $DEVICE --out "$W/eval-$ds-paper" --projection paper --n $N --attacks $ATTACKS,$MORE --eps 0.3 \
    --batch-size 1000 --n-adaptive 100 --adaptive-steps 20 --eot-samples 2 --resume \
    --no-progress $EVAL_EXTRA
  pack
  for snap in $(ls "$W/gan-$ds/snapshots" 2>/dev/null | grep G_ema); do
    local it=${snap%%-*} d=$W/sweep/$ds-${snap%%-*}
    mkdir -p "$d"; cp "$m/classifier.safetensors" "$m/substitute.safetensors" "$m/card.json" "$d/"
    cp "$W/gan-$ds/snapshots/$snap" "$d/generator.safetensors"
    step sweep-$ds-$it $(( $(left) - 10 > 40 ? 40 : $(left) - 10 )) $P eval "$d" --dataset $ds --data-dir data/$ds \
      --device $DEVICE --out "$W/sweep-$ds-$it" --projection paper --n $SWEEP_N --attacks fgsm,transfer \
      --eps 0.3 --batch-size 1000 --no-progress $EVAL_EXTRA
  done
}
per_dataset mnist &
per_dataset fashion-mnist &
wait
pack
ls -la "$OUT"
log "done"
