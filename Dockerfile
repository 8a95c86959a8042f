# syntax=docker/dockerfile:1
#
# One image for every role: `recon-stream run ingest|scanner|scheduler|all` and
# `recon-stream init`. Dependencies come from uv.lock (`uv sync --frozen`), the
# runtime stage holds only the virtual environment and runs as a non-root user
# with nothing to write outside /tmp, so it runs with a read-only root
# filesystem.
#
#   docker build -t recon-stream:local .
#   docker run --rm recon-stream:local --help

ARG PYTHON_VERSION=3.11
# Pinned like tasks.py (UV_VERSION): the lock file is read by the uv that wrote it.
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------- build stage
FROM python:${PYTHON_VERSION}-slim-trixie AS build

COPY --from=uv /uv /usr/local/bin/uv

# Bytecode is compiled here, once: the runtime filesystem is read-only.
# The venv is created at the path it will have in the runtime stage.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/recon-stream

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --no-install-project

# Then the project itself, installed as a wheel (not editable) so the runtime
# stage needs no source tree.
COPY pyproject.toml uv.lock README.md ./
COPY recon_stream ./recon_stream
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
    && /opt/recon-stream/bin/recon-stream --help > /dev/null

# -------------------------------------------------------------- runtime stage
FROM python:${PYTHON_VERSION}-slim-trixie AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="recon-stream" \
      org.opencontainers.image.description="Outside-in attack-surface monitoring from endpoint-agent heartbeats: Kafka + MongoDB + Shodan" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot without a
# name lookup and volume permissions are predictable.
RUN groupadd --system --gid 10001 recon \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin recon

COPY --from=build /opt/recon-stream /opt/recon-stream

# PYTHONDONTWRITEBYTECODE: nothing is written next to the code (read-only root).
# HOME and TMPDIR point at /tmp, the one writable place (an emptyDir or tmpfs).
ENV PATH=/opt/recon-stream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    RECON_HTTP_PORT=8080

# An empty working directory: Settings also reads `.env` from here, and there
# must be none inside the image.
WORKDIR /app
USER 10001:10001

# /healthz, /readyz and /metrics
EXPOSE 8080

# Liveness of the process (/healthz). slim images have no curl: use Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RECON_HTTP_PORT', '8080') + '/healthz', timeout=4)"]

# SIGTERM starts the graceful shutdown (RECON_GRACEFUL_TIMEOUT_SECONDS).
STOPSIGNAL SIGTERM
ENTRYPOINT ["recon-stream"]
CMD ["run", "all"]
