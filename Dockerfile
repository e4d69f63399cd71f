# syntax=docker/dockerfile:1
# One image for the hub and the site nodes: `exchange serve hub` / `exchange serve node`
# (compose/docker-compose.yml; docs/deploy.md). No keys, certificates or secrets are in
# it: they come at run time from volumes and compose secrets (EXCHANGE_SECRETS_DIR).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with the pinned dependencies -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /app
# Dependencies first (pinned by constraints.txt, as scripts/bootstrap.sh installs them),
# so a source change does not reinstall them: the package's metadata and its version.
COPY pyproject.toml constraints.txt README.md ./
COPY exchange/__init__.py exchange/__init__.py
RUN pip install -c constraints.txt '.[postgres]' && pip uninstall -y exchange
# Then the project, installed in place: it finds policies/ and fhir_profiles/ beside
# the package directory (exchange/config.py, exchange/fhir/profiles.py).
COPY exchange exchange
COPY policies policies
COPY fhir_profiles fhir_profiles
RUN pip install --no-deps -e . && python -m compileall -q exchange

# -- runtime: the environment, the sources, a user without privileges ----------------------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXCHANGE_HOST=0.0.0.0 \
    EXCHANGE_PORT=8443 \
    EXCHANGE_DATA_DIR=/var/lib/exchange
RUN groupadd --system --gid 10001 exchange \
    && useradd --system --uid 10001 --gid exchange --home-dir /var/lib/exchange \
       --no-create-home --shell /usr/sbin/nologin exchange \
    && install -d -o exchange -g exchange -m 0700 /var/lib/exchange /certs
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
USER exchange:exchange
WORKDIR /var/lib/exchange
EXPOSE 8443
# /healthz of this service on loopback (HTTPS when EXCHANGE_TLS_CERT_FILE is set).
HEALTHCHECK --interval=30s --timeout=6s --start-period=60s --retries=3 \
    CMD ["python", "-m", "exchange.probe", "/healthz"]
ENTRYPOINT ["exchange"]
CMD ["--help"]
