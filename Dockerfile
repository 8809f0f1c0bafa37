# syntax=docker/dockerfile:1.7
#
# jlad images. One image runs either process, chosen by its command:
#   API     python -m service          (the default CMD; uvicorn on JLAD_HOST:JLAD_PORT)
#   worker  python -m service.worker   (Redis stream consumer, owns the ONNX sessions)
#
# Targets:
#   build  torch (CPU) + .[train]: exports the committed checkpoints to ONNX under /models
#   cpu    python slim + onnxruntime + .[serve]              docker build --target cpu .
#   gpu    CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu       docker build --target gpu .
# Neither runtime image contains torch. docs/DEPLOY.md has the build and push commands.
#
# Base images are pinned to exact tags. For byte-for-byte reproducible builds pin digests
# too: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> (the digest
# comes from `docker buildx imagetools inspect python:3.11.14-slim-bookworm`).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# onnxruntime-gpu >= 1.27 on PyPI is built against CUDA 13 (host driver >= 580). For older
# drivers build with CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04 and
# ORT_GPU_VERSION=1.26.0, the last CUDA 12 build.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG ORT_GPU_VERSION=1.31.1

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# torch first and from the CPU index: resolved through PyPI it would pull the CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY client ./client
COPY service ./service
COPY model_export ./model_export
COPY docker/constraints-train.txt ./docker/
RUN pip install --constraint docker/constraints-train.txt ".[train]"
COPY checkpoints ./checkpoints
RUN python -m model_export.export --checkpoints checkpoints --out /models \
    && pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# Runtime targets. Both: pip byte-compiles at install time and PYTHONDONTWRITEBYTECODE
# stops later writes, so the root file system can be read-only; HOME and TMPDIR point at
# /tmp, the one writable mount (an emptyDir or tmpfs), which also takes CUDA's JIT cache.
# The models are root-owned and read-only to the unprivileged user 10001.
FROM ${CUDA_IMAGE} AS gpu
ARG ORT_GPU_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    PATH=/opt/venv/bin:${PATH} \
    JLAD_HOST=0.0.0.0 \
    JLAD_PORT=8000 \
    JLAD_MODEL_DIR=/opt/jlad/models \
    JLAD_PRECISION=fp16
# Ubuntu's Python moves with the pinned base image; pinning its Debian revision as well
# would only break the build when the archive drops the old revision.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# .[serve] pulls the CPU onnxruntime wheel; both wheels install the same `onnxruntime`
# package, so the CPU one must go before the GPU one goes in.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=docker/constraints-serve.txt,target=/constraints.txt \
    pip install --constraint /constraints.txt "$(echo /wheels/jlad-*.whl)[serve]" \
    && pip uninstall --yes onnxruntime \
    && pip install "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()" \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin jlad
COPY --from=build --chown=root:root /models /opt/jlad/models
COPY --chown=root:root docker/healthcheck.py /opt/jlad/healthcheck.py
WORKDIR /opt/jlad
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/jlad/healthcheck.py"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------
# Last stage, so the default of `docker build .`: the laptop / CPU image. Same layout as
# gpu; the two install separately because their bases ship different Pythons (3.11 here,
# Ubuntu 24.04's 3.12 there).
FROM ${PYTHON_IMAGE} AS cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    JLAD_HOST=0.0.0.0 \
    JLAD_PORT=8000 \
    JLAD_MODEL_DIR=/opt/jlad/models
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=docker/constraints-serve.txt,target=/constraints.txt \
    pip install --constraint /constraints.txt "$(echo /wheels/jlad-*.whl)[serve]" \
    && python -c "import onnxruntime, service; print(onnxruntime.get_available_providers())" \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin jlad
COPY --from=build --chown=root:root /models /opt/jlad/models
COPY --chown=root:root docker/healthcheck.py /opt/jlad/healthcheck.py
WORKDIR /opt/jlad
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/jlad/healthcheck.py"]
CMD ["python", "-m", "service"]
