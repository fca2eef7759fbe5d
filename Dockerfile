# syntax=docker/dockerfile:1.7
# One image for the API and the GPU worker:
#   docker run IMAGE                                          -> harmprune serve (API on :8000)
#   docker run --gpus 1 IMAGE worker --queues gpu --concurrency 1   -> one Celery worker per GPU
#
# torch: this image installs a CUDA build of its own, in its own cached layer. The CPU pin in
# constraints/ is for CI and tests only and is never used here. The default is the PyPI Linux
# wheel (a CUDA 13 build, needs an NVIDIA driver >= 580); for older drivers build with e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Optional extras from pyproject baked into the image ("datasets": Hub datasets named by domain specs).
ARG EXTRAS=datasets

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.12 (Ubuntu 24.04) in a virtualenv: the system Python is externally managed (PEP 668).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --gid 10001 harmprune \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin harmprune \
    && mkdir -p /data/cache /data/hf \
    && chown -R harmprune:harmprune /data

# Layer 1: the CUDA torch build (largest, changes least). Fails the build if a CPU-only wheel slipped in.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch is a CPU-only build')" \
    && pip freeze | grep -i '^torch==' > /opt/torch-constraint.txt

WORKDIR /app

# Layer 2: the project's dependencies, read from pyproject.toml alone, so editing code keeps this
# layer cached. The constraint keeps pip from swapping the CUDA torch for another build.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in sys.argv[1].split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" "$EXTRAS" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c /opt/torch-constraint.txt \
    && rm /tmp/requirements.txt

# Layer 3: the code. A regular (non-editable) install of the one package `harmprune`; the
# example domains (`--domain cyber`) ship inside it as package data.
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && harmprune --help > /dev/null

ENV HARMPRUNE_CACHE_DIR=/data/cache \
    HF_HOME=/data/hf \
    HARMPRUNE_ALLOW_REMOTE_CODE=false

# Numeric, so Kubernetes runAsNonRoot can verify it (uid 10001 = harmprune).
USER 10001:10001
EXPOSE 8000

# For the API (the default command). Compose gives the worker its own; Kubernetes ignores it
# (probes in deploy/k8s instead).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# tini as PID 1 forwards SIGTERM to harmprune/celery so a worker can stop its job cooperatively.
ENTRYPOINT ["tini", "--", "harmprune"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
