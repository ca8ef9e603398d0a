# psn-stream: streaming inference service for Parallel Spiking Neuron networks.
#
#   docker build -t psn-stream .                       # CPU torch (default), python:3.11-slim base
#   docker compose up                                  # build if needed and run (see docs/docker.md)
#
# Build arguments
#   BASE_IMAGE        base for every stage (default python:3.11-slim). Any Debian/Ubuntu image works;
#                     if it lacks python3 + venv they are installed with apt. scripts/docker-smoke
#                     uses a base made from Debian packages with debootstrap.
#   TORCH_REQUIREMENT pip requirement for torch (default torch==2.13.0).
#   TORCH_INDEX_URL   index torch comes from (default the PyTorch CPU index). CUDA builds:
#                     https://download.pytorch.org/whl/cu128 (or empty = the default index, whose
#                     Linux x86_64 torch is a CUDA build). Empty also means: use WHEELS_URL + PIP_INDEX_URL.
#   WHEELS_URL        optional find-links location (a directory listing served over HTTP, e.g.
#                     `python3 -m http.server` on the build host with --network host) searched before
#                     the indexes: lets a local torch wheel be used instead of a download.
#   PIP_INDEX_URL     package index for everything else (default PyPI).
#   TRIM_TORCH        1 (default) drops torch's C++ tests and headers (about 190 MB); 0 keeps them.
#   APT_PACKAGES      extra Debian packages for the runtime image (the GPU variant adds a C compiler,
#                     which Triton needs to build its launcher at run time).
# Build secret (optional, BuildKit)
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt   CA bundle pip uses (TLS-intercepting proxies).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- base: python3 + the service user
FROM ${BASE_IMAGE} AS base
ARG APT_PACKAGES=""
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1 \
       || [ -n "$APT_PACKAGES" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates $APT_PACKAGES; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 psn; \
    useradd --system --uid 10001 --gid psn --home-dir /app --no-create-home --shell /usr/sbin/nologin psn; \
    mkdir -p /app; \
    chown psn:psn /app

# ---------------------------------------------------------------- builder: venv with torch + the project
FROM base AS builder
ARG TORCH_REQUIREMENT=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS_URL=""
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: the largest download, and it changes least.
RUN --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    set --; \
    if [ -n "$WHEELS_URL" ]; then set -- "$@" --find-links "$WHEELS_URL"; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then set -- "$@" --index-url "$TORCH_INDEX_URL"; fi; \
    pip install "$@" "$TORCH_REQUIREMENT"; \
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# The project with its runtime dependencies only (no [train] or [dev] extras), installed as a wheel, at the
# versions the test suite last passed with (constraints.txt).
COPY pyproject.toml README.md constraints.txt /src/
COPY model /src/model
COPY service /src/service
COPY exported /src/exported
RUN --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    set --; \
    if [ -n "$WHEELS_URL" ]; then set -- "$@" --find-links "$WHEELS_URL"; fi; \
    pip install "$@" -c /src/constraints.txt /src; \
    pip check; \
    python -c 'import model, service, exported; print("project imports ok")'

# Drop what serving never uses from torch: C++ test binaries, the tools next to them and the C++ headers
# (needed only to compile extensions or torch.compile C++ code). TRIM_TORCH=0 keeps everything.
ARG TRIM_TORCH=1
RUN set -eu; \
    if [ "$TRIM_TORCH" = 1 ]; then \
        t=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))'); \
        rm -rf "$t/test" "$t/include"; \
        find "$t/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
        python -c 'import torch; torch.ones(2).sum(); print("torch ok after trim")'; \
    fi

# The shipped models: every folder of exported/ that holds a config.json, readable by the service user
# whatever modes the files had in the build context.
RUN set -eu; \
    mkdir -p /models; \
    for d in /src/exported/*/; do \
        if [ -f "$d/config.json" ]; then cp -r "$d" /models/; echo "model: $(basename "$d")"; fi; \
    done; \
    chmod -R u=rwX,go=rX /models

# ---------------------------------------------------------------- runtime
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /app/exported
# the session log (durable sessions): a volume here keeps sessions across new containers too
RUN mkdir -p /var/lib/psn && chown psn:psn /var/lib/psn
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONSAFEPATH=1 \
    HOME=/app \
    PSN_HOST=0.0.0.0 \
    PSN_PORT=8000 \
    PSN_MODEL_DIR=/app/exported \
    PSN_STATE_DIR=/var/lib/psn
WORKDIR /app
USER psn:psn
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PSN_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service"]
