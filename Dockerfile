# syntax=docker/dockerfile:1
# purifier: Defense-GAN input purification, a V2 (Open Inference Protocol) gRPC sidecar.
#
# CPU image (the default):
#   docker build -t purifier .
# CUDA image: a CUDA runtime base and CUDA wheels of the same torch version, e.g.
#   docker build -t purifier:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# (pick the cuXYZ index that download.pytorch.org publishes torch 2.14.1 for, and a
# base image with that CUDA major version; run with `--gpus all`.)
#
# Run: docker run --rm -p 8081:8081 -p 8082:8082 purifier serve --downstream HOST:8001
# Ports (docs/DEVELOPING.md, "Ports"): 8081 purifier gRPC, 8082 Prometheus /metrics,
# 8001 serve-classifier gRPC.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python:*-slim has Python and venv; CUDA base images are plain Ubuntu and need them installed.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# torch in its own layer, from the index that picks the CPU or CUDA build. Without this,
# `pip install` would take PyPI's torch, which on Linux is the multi-GB CUDA build; with it,
# the pins in pyproject.toml are already satisfied and pip leaves torch alone.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY purifier/ purifier/
# Editable, like a checkout: the package stays under /app, beside the shipped models/,
# so the default --model-dir (models/fashion-mnist) resolves the same way it does in the repo.
RUN pip install -e . && python -c "import purifier.cli"

COPY models/ models/
COPY scripts/healthcheck.py scripts/healthcheck.py
# COPY keeps the build context's modes, and a checkpoint written with mode 0600 (as
# safetensors files can be) would be unreadable by the non-root user below.
RUN chmod -R a+rX /app

# Non-root, with a numeric uid so Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --create-home --home-dir /home/purifier purifier
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
