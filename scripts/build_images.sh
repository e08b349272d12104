#!/usr/bin/env bash
# Build the CPU and CUDA images and smoke-test them, for anyone with Docker (the tests check the
# Dockerfile statically; this runs it). From the repo root:
#
#   scripts/build_images.sh              # both images, then the smoke tests
#   scripts/build_images.sh cpu          # one variant
#   SKIP_SMOKE=1 scripts/build_images.sh # build only
#
# The base image is pinned by digest here: the Dockerfile's BASE_IMAGE tag is resolved to the
# digest it points to now, the build uses tag@sha256:..., and the digest is recorded in the
# org.opencontainers.image.base.digest label (copy it into the Dockerfile to freeze it).
# Smoke tests: the CLI runs; the CPU image serves end to end (serve-classifier and serve on a
# private network, health SERVING through the image's HEALTHCHECK script); the CUDA image has a
# CUDA build of torch, and sees a GPU when the host has one (`--gpus all`).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo "")
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
BASE_TAG=$(sed -n 's/^ARG BASE_IMAGE=\(.*\)/\1/p' Dockerfile)
VARIANTS=("${@:-cpu cuda}")
read -r -a VARIANTS <<<"${VARIANTS[*]}"

BASE_REF=$BASE_TAG BASE_DIGEST=""
if [[ $BASE_TAG != *@sha256:* ]]; then
    docker pull --quiet "$BASE_TAG" >/dev/null
    BASE_DIGEST=$(docker image inspect --format '{{index .RepoDigests 0}}' "$BASE_TAG" | sed 's/.*@//')
    BASE_REF="$BASE_TAG@$BASE_DIGEST"
else
    BASE_DIGEST=${BASE_TAG##*@}
fi
echo "base: $BASE_REF" >&2

image_of() { [[ $1 == cpu ]] && echo "purifier:$VERSION" || echo "purifier:$VERSION-$1"; }

for variant in "${VARIANTS[@]}"; do
    case $variant in
        cpu)  index=TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ;;
        cuda) index=TORCH_INDEX_URL=https://pypi.org/simple ;;  # PyPI's torch: the CUDA build
        *) echo "unknown variant $variant (cpu or cuda)" >&2; exit 2 ;;
    esac
    docker build -t "$(image_of "$variant")" \
        --build-arg "BASE_IMAGE=$BASE_REF" --build-arg "BASE_DIGEST=$BASE_DIGEST" \
        --build-arg "VARIANT=$variant" --build-arg "$index" \
        --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED" .
    docker image ls "$(image_of "$variant")" --format '{{.Repository}}:{{.Tag}} {{.Size}}'
done

[[ ${SKIP_SMOKE:-0} == 1 ]] && exit 0

net="purifier-smoke-$$"
cleanup() {
    docker rm -f "$net-classifier" "$net-purifier" >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
}
trap cleanup EXIT

for variant in "${VARIANTS[@]}"; do
    image=$(image_of "$variant")
    echo "smoke: $image" >&2
    docker run --rm "$image" --help >/dev/null
    docker image inspect --format '{{json .Config.Labels}}' "$image"
    if [[ $variant == cuda ]]; then
        docker run --rm --entrypoint python "$image" -c \
            "import torch; assert torch.version.cuda, 'not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
        if docker info --format '{{json .Runtimes}}' | grep -q nvidia; then
            docker run --rm --gpus all --entrypoint python "$image" -c \
                "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))"
        else
            echo "no NVIDIA runtime on this host: CUDA image not run on a GPU" >&2
        fi
        continue
    fi
    docker network create "$net" >/dev/null
    docker run -d --name "$net-classifier" --network "$net" --network-alias classifier "$image" \
        serve-classifier --host 0.0.0.0 --port 8001 --model-name classifier >/dev/null
    docker run -d --name "$net-purifier" --network "$net" "$image" \
        serve --downstream classifier:8001 --metrics-port 8082 >/dev/null
    for _ in $(seq 90); do
        status=$(docker inspect --format '{{.State.Health.Status}}' "$net-purifier")
        [[ $status == healthy ]] && break
        [[ $(docker inspect --format '{{.State.Running}}' "$net-purifier") == true ]] || break
        sleep 2
    done
    if [[ $status != healthy ]]; then
        docker logs "$net-purifier" | tail -20 >&2
        echo "smoke: $image did not become healthy ($status)" >&2
        exit 1
    fi
    # the classifier through purifier, from inside the network, with the image's own health script
    docker exec "$net-purifier" python /app/scripts/healthcheck.py classifier:8001
    echo "smoke: $image healthy, and the classifier reachable from it" >&2
    cleanup
done
