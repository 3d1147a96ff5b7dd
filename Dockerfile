# order-viewer: `docker build -t order-viewer .`, then `docker run order-viewer` (serve) or
# `docker run order-viewer migrate`. Configured by the environment variables of the README.

# Build stage: the locked runtime dependencies and the project wheel, in a virtualenv.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
# The locked versions, each checked against its hash, in a layer of their own that a change of
# the code alone does not rebuild.
COPY requirements/main.txt ./requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --no-deps --wheel-dir /build/dist . \
    && /opt/venv/bin/pip install --no-deps /build/dist/order_viewer-*.whl

# Runtime stage: the Python runtime and the virtualenv, nothing else.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HTTP_HOST=0.0.0.0

RUN groupadd --gid 10001 order-viewer \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin order-viewer

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8081

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/livez', timeout=2)"]

ENTRYPOINT ["order-viewer"]
CMD ["serve"]
