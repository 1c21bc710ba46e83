# syntax=docker/dockerfile:1
# fallback-proxy image: build the package into a venv, then copy only that venv
# into a clean slim image that runs as a non-root user.
#
#   docker build -t fallback-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 --env-file .env fallback-proxy:0.1.0
#
# Both stages use the same base tag so the venv's interpreter path
# (/usr/local/bin/python3.11) exists in the final image.

# --- builder: resolve and install into /opt/venv --------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, from the metadata alone, so editing code does not
# re-download them: a stub package lets `pip install .` resolve them.
COPY pyproject.toml README.md ./
RUN mkdir proxy && touch proxy/__init__.py \
    && pip install . \
    && pip uninstall -y fallback-proxy \
    && rm -rf proxy build ./*.egg-info

# Then the code itself; dependencies are already in place.
COPY proxy/ ./proxy/
RUN pip install --no-deps . \
    && fallback-proxy --help >/dev/null

# --- runtime: the venv and a default config, nothing else ------------------------
FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="fallback-proxy" \
      org.opencontainers.image.description="OpenAI-compatible LLM reverse proxy with provider fallback" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin proxy

COPY --from=builder /opt/venv /opt/venv
# A default routing config; mount your own over it (compose, Helm ConfigMap).
COPY config/example.yaml /etc/fallback-proxy/config.yaml

# LITELLM_LOCAL_MODEL_COST_MAP: use litellm's bundled model map instead of
# fetching it over the network at import time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    FALLBACK_PROXY_CONFIG=/etc/fallback-proxy/config.yaml

WORKDIR /app
USER 10001:10001

EXPOSE 8080

# Liveness only (/healthz); readiness (/readyz) is for orchestrators to decide.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

ENTRYPOINT ["fallback-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
