#!/usr/bin/env bash
# Lent-GPU call 2, second half (issue 11, item 7): the serving path on the GPU, after
# scripts/gpu_eval.sh on the same warm machine. Run from .lease/ (scripts/lease.sh prepare):
#   1. the wheels the device's python lacks (grpcio-health-checking, grpcio-reflection, starlette,
#      uvicorn; grpcio and protobuf at the versions our generated stubs need), from ../.whl when carried;
#   2. every `gpu`-marked test, the service's included (`purifier serve` with CUDA graphs vs eager);
#   3. scripts/serve_check.py: `purifier serve --device cuda` (per-bucket CUDA graphs: auto) with
#      the models call 1 trained ($W/models/<ds>), 32 concurrent callers for SERVE_S seconds of
#      seeded / default / batched / non-default requests, every answer checked;
#   4. scripts/soak.py for SOAK_S seconds: mixed valid and hostile traffic at 2x the measured
#      capacity (client-bound on a GPU: one Python process sends it);
#   5. (PARTS has "kernels"; issue 15, item 3) scripts/bench_generator_kernels.py: the latent-step
#      as cuDNN's transposed convolutions vs sub-pixel convolutions vs explicit GEMMs, with the
#      fp32 equivalence check, within what is left of BUDGET_S.
# Results: $OUT/gpu-tests.log, $OUT/serve-check-gpu.json, $OUT/soak-gpu.json, logs in $OUT/serve-logs.tar.gz.
# CPU twin: PY=.venv/bin/python DEVICE=cpu SERVE_S=5 SOAK_S=5 OUT=/tmp/dry bash scripts/gpu_serve.sh
set -u
OUT=${OUT:-runs/gpu-out}
W=${W:-runs/gpu-lease}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-200}
SERVE_S=${SERVE_S:-45}
SOAK_S=${SOAK_S:-30}
DS=${DS:-fashion-mnist}
PARTS=${PARTS:-tests serve soak}   # e.g. PARTS=tests beside gpu_eval.sh, then PARTS="serve soak" after it
source "$(dirname "$0")/gpu_lib.sh"
WHL=${WHL:-../.whl}
if ls "$WHL"/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
log "python: $($PY -c 'import grpc, google.protobuf as p, torch; print(grpc.__version__, p.__version__, torch.__version__)' 2>&1)"
# The model served must have an encoder: `fast` without one starts from random latents only, and
# then serve_check's unseeded "owner" check fails without a misrouted answer (2026-11-28, H200:
# call 1's encoder-less export, 184 "owner" failures, every reported error and seeded answer right).
# Call 1's export has none (scripts/lease.sh holds encoders out), so serve the shipped model with
# its encoder, carried in .lease-enc/ (lease.sh prepare writes it; carry it in call 2).
MODEL=$W/models/$DS
[ -e "$MODEL/generator.safetensors" ] || MODEL=models/$DS   # no call 1 on this machine: the shipped one
if [ ! -f "$MODEL/encoder.safetensors" ]; then
  if [ -f "../.lease-enc/$DS/encoder.safetensors" ] && [ -f "models/$DS/generator.safetensors" ]; then
    rm -rf "$W/serve-$DS" && mkdir -p "$W/serve-$DS" && cp models/$DS/* "$W/serve-$DS/" \
      && cp "../.lease-enc/$DS/encoder.safetensors" "$W/serve-$DS/" && MODEL=$W/serve-$DS
    log "serving the shipped $DS model with its carried encoder ($MODEL)"
  else
    log "WARNING: $MODEL has no encoder (carry .lease-enc): the owner check can fail without misrouting"
  fi
fi

has() { [[ " $PARTS " == *" $1 "* ]]; }
if has tests; then
  step gpu-tests 90 $PY -m pytest -m gpu tests -o addopts='' -q -p no:cacheprovider
  cp "$W/gpu-tests.log" "$OUT/" 2>/dev/null
fi
has serve && step serve-check $((SERVE_S + 60)) $PY scripts/serve_check.py --dataset $DS --data-dir data/$DS --model-dir "$MODEL" \
  --serve-arg=--device --serve-arg=$DEVICE --clients 32 --seconds "$SERVE_S" --out "$OUT/serve-check-gpu.json"
S=$(( $(left) - 10 )); [ "$S" -gt $((SOAK_S + 45)) ] && S=$((SOAK_S + 45))
has soak && step soak "$S" $PY scripts/soak.py --model-dir "$MODEL" --serve-arg=--device --serve-arg=$DEVICE \
  --duration "$SOAK_S" --calibrate-seconds 10 --deadline 5 --rss-every 5 --out "$OUT/soak-gpu.json"
K=$(( $(left) - 5 )); [ "$K" -gt 60 ] && K=60
has kernels && step kernels "$K" $PY scripts/bench_generator_kernels.py --device $DEVICE --latents "${KLATENTS:-2560,10240}" \
  --seconds 0.5 --profile --out "$OUT/generator-kernels.json"
(cd "$W" && tar -czf "$OUT/serve-logs.tar.gz" --ignore-failed-read gpu-tests.log serve-check.log soak.log kernels.log timeline.txt) 2>/dev/null
log "done"
