#!/usr/bin/env bash
# The main job on a fresh machine: the reference classifier in the background, purifier in
# the foreground forwarding to it. Run from the repo root:
#
#   scripts/run.sh                          # shipped Fashion-MNIST models, CPU or CUDA
#   scripts/run.sh --projection fast        # extra flags go to `purifier serve`
#
# Ports: purifier gRPC 8081, metrics 8082, classifier 8001 (PURIFIER_* variables and the
# flags above change them; CLASSIFIER_PORT moves the classifier). Ctrl-C stops both.
set -euo pipefail

cd "$(dirname "$0")/.."
CLASSIFIER_PORT=${CLASSIFIER_PORT:-8001}
MODEL_DIR=${PURIFIER_MODEL_DIR:-models/fashion-mnist}

# .venv with purifier installed from this checkout; a no-op when it already is (REINSTALL=1 forces it).
source scripts/venv.sh
ensure_venv "$PWD"
PURIFIER=.venv/bin/purifier

"$PURIFIER" serve-classifier --model-dir "$MODEL_DIR" --port "$CLASSIFIER_PORT" &
classifier_pid=$!
# The classifier goes down with us, however we exit (Ctrl-C, purifier failing, set -e).
trap 'kill "$classifier_pid" 2>/dev/null || true; wait "$classifier_pid" 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# purifier retries an unavailable downstream, but starting after the classifier is up keeps
# the first requests from failing while it loads.
for _ in $(seq 120); do
    kill -0 "$classifier_pid" 2>/dev/null || { echo "serve-classifier exited" >&2; exit 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$CLASSIFIER_PORT") 2>/dev/null && break
    sleep 0.5
done

# Not exec: the EXIT trap must outlive purifier to stop the classifier.
"$PURIFIER" serve --model-dir "$MODEL_DIR" --downstream "localhost:$CLASSIFIER_PORT" "$@" &
purifier_pid=$!
trap 'kill -TERM "$purifier_pid" 2>/dev/null || true; wait "$purifier_pid" 2>/dev/null || true; exit 130' INT
trap 'kill -TERM "$purifier_pid" 2>/dev/null || true; wait "$purifier_pid" 2>/dev/null || true; exit 143' TERM
wait "$purifier_pid"
