# syntax=docker/dockerfile:1
# purifier: Defense-GAN input purification, a V2 (Open Inference Protocol) gRPC sidecar.
#
# Two images from this one file; scripts/build_images.sh builds both (base pinned by digest,
# OCI labels filled in) and smoke-tests them.
#
#   CPU (the default, about 1.2 GB):
#     docker build -t purifier:0.1.0 .
#   CUDA (about 5.7 GB; run with `--gpus all`):
#     docker build -t purifier:0.1.0-cuda --build-arg VARIANT=cuda \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# The CUDA image carries CUDA once: PyPI's Linux torch wheels are the CUDA build (2.14.1 is
# built for CUDA 13.0) and bring the CUDA runtime, cuDNN, cuBLAS, NCCL as nvidia-* wheels, so
# the base stays python:*-slim and no CUDA base image adds a second copy. The host needs only
# the NVIDIA driver and the container toolkit. Sizes are estimates from the installed packages
# (site-packages of torch 2.14.1 CUDA: torch 1.2 GB + nvidia-* 3.2 GB + triton 0.9 GB; the CPU
# wheel of torch: 0.76 GB; the other dependencies: 0.33 GB; the slim base: about 0.13 GB).
#
# Run: docker run --rm -p 8081:8081 -p 8082:8082 purifier:0.1.0 serve --downstream HOST:8001
# Ports (docs/DEVELOPING.md, "Ports"): 8081 purifier gRPC, 8082 Prometheus /metrics,
# 8001 serve-classifier gRPC.

# The Python of the dev machines and CI (3.11.7), on Debian bookworm. Pinned to the exact tag
# here, not to a digest: no registry is reachable from where this file is maintained, so no
# digest could be verified, and an unverified one would be worse than none.
# scripts/build_images.sh resolves the tag's digest at build time, builds FROM tag@sha256:...,
# and records it in the org.opencontainers.image.base.digest label; pass
# --build-arg BASE_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest> to do the same by hand.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG BASE_DIGEST=""
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""

LABEL org.opencontainers.image.title="purifier" \
      org.opencontainers.image.description="Defense-GAN input purification as a V2 (Open Inference Protocol) gRPC sidecar (${VARIANT})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_DIGEST}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch in its own layer, from the index that picks the CPU or the CUDA build: without it,
# `pip install` would take PyPI's torch, which on Linux is the CUDA build. With it, the pins in
# pyproject.toml are already met (2.14.1+cpu satisfies ==2.14.1) and pip leaves torch alone.
RUN python -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "${TORCH_INDEX_URL}"

# The other dependencies, from pyproject.toml alone: a change to the code (or the README)
# reuses this layer instead of reinstalling them.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself, editable like a checkout: it stays under /app, beside the shipped
# models/, so the default --model-dir (models/fashion-mnist) resolves as it does in the repo.
COPY README.md ./
COPY purifier/ purifier/
RUN pip install --no-deps -e . && python -c "import purifier.cli"

COPY models/ models/
COPY scripts/healthcheck.py scripts/healthcheck.py
# COPY keeps the build context's modes, and a checkpoint written with mode 0600 (as
# safetensors files can be) would be unreadable by the non-root user. Non-root, with a
# numeric uid so Kubernetes' runAsNonRoot can verify it.
RUN chmod -R a+rX /app \
    && useradd --system --uid 10001 --create-home --home-dir /home/purifier purifier
USER 10001:10001

# Both servers read PURIFIER_* variables; in a container they must listen on all interfaces.
ENV PURIFIER_HOST=0.0.0.0

EXPOSE 8081 8082 8001

# grpc.health.v1 on the serve port (PURIFIER_GRPC_PORT, default 8081); SERVING only after
# the model loaded and a warm-up batch ran. For serve-classifier or TLS, override it
# (docker-compose.yml shows how) or run with --no-healthcheck.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py"]

ENTRYPOINT ["purifier"]
CMD ["serve"]
