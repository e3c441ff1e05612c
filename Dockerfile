# syntax=docker/dockerfile:1.7
# Multi-stage build. Targets:
#   api     FastAPI service + migrations (no torch, no peft: `service` never imports them)
#   worker  Celery worker with the ML core (CUDA build of torch), one process per GPU
# docker compose builds both (see docker-compose.yml).
#
# Dependencies first, source last: each image installs what pyproject.toml declares (a layer rebuilt
# only when pyproject.toml changes), then copies the source and installs it as a wheel, without
# dependencies. The migrations travel in the wheel as package data (`lethe migrate` runs anywhere).

ARG PYTHON_VERSION=3.11

# ---- common base: a non-root user and the project's metadata; no source, no dependencies -------
FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LETHE_HOME=/var/lib/lethe
RUN useradd --system --create-home --home-dir /home/lethe --uid 10001 lethe \
    && mkdir -p /var/lib/lethe && chown lethe /var/lib/lethe
WORKDIR /app
COPY pyproject.toml README.md scripts/pyproject-deps.py ./

# ---- api: core dependencies only; the build fails if torch is importable ----------------------
FROM runtime AS api
RUN python pyproject-deps.py > requirements.txt && pip install -r requirements.txt
COPY migrations ./migrations
COPY service ./service
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build migrations service worker \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
USER lethe
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# Plain HTTP: put a TLS-terminating proxy in front (docker-compose.yml's `proxy`).
CMD ["lethe", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-migrate"]

# ---- worker: torch (CUDA build) + the ml extra ------------------------------------------------
FROM runtime AS worker
# The CUDA build of torch comes from PyTorch's index; the package itself only asks for torch>=2.2,<3.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
RUN python pyproject-deps.py ml > requirements.txt && pip install -r requirements.txt
COPY migrations ./migrations
COPY service ./service
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build migrations service worker
# `lethe worker --check` (the compose healthcheck) reads this container's own heartbeat file:
# $LETHE_HOME is a volume that other worker containers (and machines) share.
ENV LETHE_WORKER_ALIVE_FILE=/tmp/lethe-worker.alive
USER lethe
# One Celery process per visible GPU (CUDA_VISIBLE_DEVICES per child); CPU when none is visible.
CMD ["lethe", "worker"]
