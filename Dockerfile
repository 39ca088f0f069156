# syntax=docker/dockerfile:1
#
# rerankd CPU image, two stages:
#   builder  python + compiler + PyTorch (CPU): builds wheels for every runtime dependency
#            (hnswlib ships only as an sdist) and exports the ONNX model bundles to /models.
#   runtime  python + those wheels + /models. No torch, no compiler, runs as a non-root user.
#
#   docker build -t rerankd:0.1.0 .
#   docker build --build-arg EXPORT_ARGS='--no-int8 --no-openvino' -t rerankd:0.1.0 .   # fp32 only (smaller; int8 is default)
#   docker run --rm -p 127.0.0.1:50051:50051 -v rerankd-data:/data -e RERANKD_THREADS=2 rerankd:0.1.0
#
# GPU image (same base; the CUDA 13 runtime and cuDNN 9 come as pip wheels with onnxruntime-gpu,
# the host needs only the NVIDIA driver and the container toolkit):
#   docker build --build-arg ONNXRUNTIME_GPU='onnxruntime-gpu[cuda,cudnn]==1.31.1' \
#       --build-arg EXPORT_ARGS='--fp16' -t rerankd:0.1.0-gpu .
#   docker run --rm --gpus all -p 127.0.0.1:50051:50051 -v rerankd-data:/data \
#       -e RERANKD_MAX_CONCURRENT_SEARCH=32 rerankd:0.1.0-gpu   # the default 2 is sized for a CPU
# (`--backend auto` then serves the fp16 bundles on the CUDA provider; TensorRT needs its own
# libraries in the image, see README "GPU". onnxruntime-gpu provides the same `onnxruntime`
# module as the CPU package rerankd pins, so `pip check` reports that pin as unmet there; the
# fp16 graph is built by the builder's onnxruntime 1.32 optimizer and served by 1.31.1, which the
# backend's load-time probe checks on the GPU. Never built here: no Docker engine, no GPU.)
#
# The trained reranker checkpoint (checkpoints/rerankd-ce-MiniLM-L6/, written by
# `rerankd train-reranker`) must be in the build context: the build fails without it rather
# than ship a reranker with an untrained head.

############################################################################################
FROM python:3.11-slim-trixie AS builder

ARG TORCH_VERSION=2.13.0
# The builder reaches the PyTorch CPU index; plain PyPI `torch` would pull GBs of CUDA wheels.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extras of the rerankd package to install at runtime: tracing (OpenTelemetry SDK + OTLP exporter,
# used only with --otlp-endpoint); e.g. "[tracing,eval]" to add more, "" for none.
ARG EXTRAS="[tracing]"
# Extra `rerankd export` flags, e.g. "--int8", or "--fp16" for a GPU image.
ARG EXPORT_ARGS=""
# GPU image: the onnxruntime-gpu requirement that replaces the CPU onnxruntime at runtime.
ARG ONNXRUNTIME_GPU=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HNSWLIB_NO_NATIVE=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hnswlib is compiled here (HNSWLIB_NO_NATIVE: no -march=native, so the wheel runs on any
# x86-64 host, not only on CPUs like the build machine's).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY export ./export

# Wheelhouse for the runtime stage (rerankd and its runtime dependencies only), then the
# export tools (torch==2.13.0 is already satisfied by the CPU build installed above).
RUN pip wheel --wheel-dir=/wheels "./${EXTRAS}" \
 && if [ -n "${ONNXRUNTIME_GPU}" ]; then pip wheel --wheel-dir=/wheels "${ONNXRUNTIME_GPU}"; fi \
 && pip install --find-links=/wheels "./[export]"

COPY checkpoints/rerankd-ce-MiniLM-L6 /src/checkpoints/rerankd-ce-MiniLM-L6

RUN rerankd export --defaults --models-dir /models \
        --reranker-source /src/checkpoints/rerankd-ce-MiniLM-L6 ${EXPORT_ARGS} \
 && python -c "import json, sys; m = json.load(open('/models/rerankd-ce-MiniLM-L6/manifest.json')); sys.exit(0 if m.get('trained') else 'reranker bundle has an UNTRAINED head: refusing to build')"

############################################################################################
FROM python:3.11-slim-trixie AS runtime

ARG EXTRAS="[tracing]"
ARG ONNXRUNTIME_GPU=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RERANKD_MODELS_DIR=/models \
    RERANKD_DATA_DIR=/data

# Runtime dependencies only, offline from the builder's wheelhouse (bind-mounted, so the
# wheels themselves never land in a layer). ONNXRUNTIME_GPU carries its own pin (==1.31.1 above),
# which hadolint cannot see through the variable.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "rerankd${EXTRAS}==0.1.0" \
 && if [ -n "${ONNXRUNTIME_GPU}" ]; then \
        pip uninstall -y onnxruntime \
     && pip install --no-index --find-links=/wheels "${ONNXRUNTIME_GPU}"; \
    fi

COPY --from=builder /models /models

RUN groupadd --system --gid 10001 rerankd \
 && useradd --system --uid 10001 --gid rerankd --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rerankd \
 && mkdir -p /data /var/run/rerankd \
 && chown rerankd:rerankd /data /var/run/rerankd

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data
# SQLite document store + HNSW snapshot. Mount a volume: the index is lost with the container otherwise.
VOLUME ["/data"]
EXPOSE 50051

# SIGTERM: health goes NOT_SERVING, in-flight calls get RERANKD_GRACE_PERIOD_S to finish.
STOPSIGNAL SIGTERM
# Start period covers loading and warming the models (health is NOT_SERVING until then).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["rerankd", "health", "--target", "localhost:50051", "--timeout", "3"]

ENTRYPOINT ["rerankd", "serve"]
