# syntax=docker/dockerfile:1
# fallback-proxy image: build the package into a venv, then copy only that venv
# into a clean slim image that runs as a non-root user.
#
#   docker build -t fallback-proxy:0.1.0 .
#   docker run --rm -p 127.0.0.1:8080:8080 --env-file .env --stop-timeout 35 fallback-proxy:0.1.0
#
# Both stages use the same base tag so the venv's interpreter path exists in
# the final image. What takes the space, past the base image: the venv, 295 MB,
# most of it litellm (120 MB) and what it pulls in (botocore 31 MB, the OpenAI
# SDK 19 MB, tokenizers 11 MB, hf_xet 10 MB), then uvloop 13 MB and aiohttp
# 8 MB; ~80 MB of it is bytecode. tests/test_container.py prints the breakdown.

# --- builder: resolve and install into /opt/venv --------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, from pyproject.toml alone, so that editing the code or
# the README does not install them again: a stub package (and README, which
# the metadata names) lets `pip install .` resolve them.
COPY pyproject.toml ./
RUN mkdir proxy && touch proxy/__init__.py README.md \
    && pip install . \
    && pip uninstall -y fallback-proxy \
    && rm -rf proxy build ./*.egg-info README.md
# Only what runs: pip and setuptools are for installing; the test suites some
# packages ship and the web UI of litellm's own proxy server (17 MB of static
# files) are never loaded. Then compile every module once, so that the
# runtime, which cannot write there, does not compile litellm's thousands of
# modules again at each start.
RUN pip uninstall -y setuptools wheel \
    && find /opt/venv -depth -type d \( -name tests -o -name __pycache__ \) \
         -path '*/site-packages/*' -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3*/site-packages/litellm/proxy/_experimental/out \
    && python -m compileall -q -j 0 /opt/venv/lib

# Then the code itself, compiled too; and pip goes last.
COPY README.md ./
COPY proxy/ ./proxy/
RUN pip install --no-deps --no-compile . \
    && python -m compileall -q /opt/venv/lib/python3*/site-packages/proxy \
    && pip uninstall -y pip \
    && fallback-proxy --help >/dev/null

# --- runtime: the venv and a default config, nothing else ------------------------
FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="fallback-proxy" \
      org.opencontainers.image.description="OpenAI-compatible LLM reverse proxy with provider fallback" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"

# Not "proxy": Debian's base-passwd already has a user and group proxy (13).
RUN groupadd --system --gid 10001 fallback-proxy \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin fallback-proxy

COPY --from=builder /opt/venv /opt/venv
# The default routing config: each provider is disabled until its key (or, for
# the local model, OLLAMA_URL) is set, so it starts with none at all. Mount your
# own over it (compose, Helm ConfigMap) or set FALLBACK_PROXY_CONFIG.
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

# Liveness (/healthz) on the address the server was really started with: the
# check reads serve's own arguments and config (`serve --port 9000` is checked
# on 9000). Readiness (/readyz, `healthcheck --ready`) is for orchestrators.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["fallback-proxy", "healthcheck"]

ENTRYPOINT ["fallback-proxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
