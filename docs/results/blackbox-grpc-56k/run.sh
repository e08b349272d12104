#!/usr/bin/env bash
# The paper's black-box protocol against a *running* purifier (issue 9 item 7): the substitute's
# labels come over V2 gRPC from `purifier serve` (fast preset) in front of `serve-classifier`,
# as a real attacker would get them; the purified column is measured locally with the same
# models and preset. 2-core CPU. Usage: bash docs/results/blackbox-grpc-56k/run.sh [mnist|fashion-mnist]
set -euo pipefail
cd "$(dirname "$0")/../../.."
DS=${1:-mnist}
P=.venv/bin/purifier
OUT=runs/blackbox-grpc-$DS
$P serve-classifier --model-dir models/$DS --port 18001 > runs/blackbox-grpc-$DS-classifier.log 2>&1 &
C=$!
$P serve --model-dir models/$DS --downstream localhost:18001 --grpc-port 18081 --metrics-port 18091 --threads 1 \
  > runs/blackbox-grpc-$DS-serve.log 2>&1 &
S=$!
trap 'kill $S $C 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 240); do grep -q '"serving"' runs/blackbox-grpc-$DS-serve.log && break; sleep 0.5; done
$P eval models/$DS --dataset $DS --projection fast --attacks blackbox --eps 0.3 --threads 1 \
  --blackbox-oracle localhost:18081 --blackbox-oracle-model classifier --out $OUT --resume --no-progress
