# syntax=docker/dockerfile:1.7
#
# rmserve serving images. Neither image holds torch or transformers: the service reads an ONNX
# bundle with onnxruntime and the `tokenizers` library only (extras `serve` and `gpu`).
#
#   docker build --target cpu -t rmserve:0.1.0-cpu .          # python slim + onnxruntime
#   docker build --target gpu -t rmserve:0.1.0-gpu .          # CUDA 12 + cuDNN 9 + onnxruntime-gpu
#   docker build --build-arg FLAVOR=gpu -t rmserve:0.1.0-gpu .  # the same, by build argument
#   docker build --target bundled --build-arg FLAVOR=cpu --build-arg BUNDLE_SRC=bundle \
#       -t rmserve:0.1.0-cpu-bundled .                        # bake a bundle in at /models/bundle
#
# Without a baked bundle, mount one at /models/bundle (docker run -v "$PWD/bundle:/models/bundle:ro"),
# which is what the Kubernetes manifests in k8s/ do with a read-only volume.

# Base images, pinned to exact tags. The CUDA image must carry the cuDNN major version that the
# pinned onnxruntime-gpu wheel was built against: onnxruntime-gpu 1.19-1.22 on PyPI is built with
# CUDA 12.x and cuDNN 9.x, and CUDA 12 minor-version compatibility lets it run on any 12.x runtime.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# Which runtime the default (last) stage and the `bundled` stage build on: cpu or gpu.
ARG FLAVOR=cpu

# --------------------------------------------------------------------------------------------
# builder: a wheel of rmserve from the source tree. Only pyproject.toml, README.md and the
# package reach the build context (.dockerignore is an allowlist), so no local file with a
# secret can end up in a layer.
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rmserve ./rmserve
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --------------------------------------------------------------------------------------------
# cpu: python slim + rmserve[serve] (onnxruntime CPU build).
FROM ${PYTHON_IMAGE} AS cpu
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="rmserve" \
      org.opencontainers.image.description="Bradley-Terry reward model server (ONNX Runtime, CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/rmserve/rmserve" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes, so never try to
# write .pyc files next to the sources.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/rmserve/bin:$PATH \
    RMSERVE_BUNDLE=/models/bundle \
    RMSERVE_HOST=0.0.0.0 \
    RMSERVE_PORT=8000
# The wheel is bind-mounted from the builder rather than copied, so it leaves no layer behind.
# The last command fails the build if torch, transformers or a second onnxruntime slipped in
# through a dependency.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    groupadd --system --gid 10001 rmserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin rmserve \
    && mkdir -p /models \
    && python -m venv /opt/rmserve \
    && set -- /wheels/rmserve-*.whl \
    && /opt/rmserve/bin/pip install --no-cache-dir "$1[serve]" \
    && /opt/rmserve/bin/python -c "import importlib.metadata as m, sys; \
bad = [d for d in ('torch', 'transformers', 'onnxruntime-gpu') \
if any(x.metadata['Name'].lower() == d for x in m.distributions())]; \
sys.exit(f'forbidden packages in the cpu image: {bad}' if bad else 0)"
WORKDIR /tmp
# Numeric so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Liveness only: /healthz answers while the process lives. Python's urllib, because slim images
# have no curl; urlopen raises (exit 1) on a refused connection or a non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RMSERVE_PORT', '8000') + '/healthz', timeout=4)"]
# Exec form: rmserve (and uvicorn inside it) is PID 1 and receives SIGTERM directly, so it can
# fail /readyz, drain in-flight batches and exit within RMSERVE_DRAIN_TIMEOUT_S.
ENTRYPOINT ["rmserve"]
CMD ["serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000"]

# --------------------------------------------------------------------------------------------
# gpu: CUDA runtime + cuDNN + rmserve[gpu] (onnxruntime-gpu, pinned to a CUDA 12 / cuDNN 9 build).
FROM ${CUDA_IMAGE} AS gpu
ARG CUDA_IMAGE
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG ONNXRUNTIME_GPU_VERSION=1.22.0
LABEL org.opencontainers.image.title="rmserve" \
      org.opencontainers.image.description="Bradley-Terry reward model server (ONNX Runtime, CUDA)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/rmserve/rmserve" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/rmserve/bin:$PATH \
    RMSERVE_BUNDLE=/models/bundle \
    RMSERVE_HOST=0.0.0.0 \
    RMSERVE_PORT=8000 \
    RMSERVE_PROVIDER=cuda
# Ubuntu's python3 (3.12 on 24.04) in a virtual environment (PEP 668 forbids a system-wide pip).
# apt packages are not version-pinned on purpose: the base image tag is pinned, and Ubuntu's
# archive drops superseded versions, so exact pins would break the build within weeks while
# blocking security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rmserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin rmserve \
    && mkdir -p /models
# The onnxruntime-gpu pin keeps the wheel's CUDA/cuDNN build in step with CUDA_IMAGE; newer
# releases on PyPI move to CUDA 13. The plain CPU onnxruntime must not be installed next to it:
# both ship the `onnxruntime` module and the CPU one would shadow the CUDA provider.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/rmserve \
    && set -- /wheels/rmserve-*.whl \
    && /opt/rmserve/bin/pip install --no-cache-dir "$1[gpu]" \
       "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && /opt/rmserve/bin/python -c "import importlib.metadata as m, sys; \
bad = [d for d in ('torch', 'transformers', 'onnxruntime') \
if any(x.metadata['Name'].lower() == d for x in m.distributions())]; \
sys.exit(f'forbidden packages in the gpu image: {bad}' if bad else 0)"
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RMSERVE_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["rmserve"]
CMD ["serve", "/models/bundle", "--host", "0.0.0.0", "--port", "8000"]

# --------------------------------------------------------------------------------------------
# bundled (optional): the chosen flavour with a bundle baked in at /models/bundle. BUNDLE_SRC is
# a directory inside the build context; .dockerignore lets `bundle/` through, so the simplest
# use is to export (or copy) the bundle to ./bundle. Any other path must be allowed in
# .dockerignore first. The service verifies each model file's sha256 from rmserve.json at start.
# The files stay owned by root: the server (UID 10001) can read its bundle but not change it.
FROM ${FLAVOR} AS bundled
ARG BUNDLE_SRC=bundle
COPY ${BUNDLE_SRC} /models/bundle

# --------------------------------------------------------------------------------------------
# Default target (the last stage): the flavour named by FLAVOR, without a bundle.
FROM ${FLAVOR} AS runtime
