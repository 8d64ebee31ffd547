# connector's container image. The first stage builds the wheel; the second installs only that wheel (and
# its dependencies) into /opt/connector and runs as a non-root user.
#   docker build -t connector .
#   docker run --env-file site/.env -v "$PWD/site:/etc/connector:ro" -p 127.0.0.1:8080:8080 connector
# The image reads /etc/connector/config.yaml (CONNECTOR_CONFIG). Its file system is the image's: give the
# ledger a PostgreSQL URL, or an SQLite file on a volume (sqlite:////var/lib/connector/connector.db).
# No container engine runs in this project's CI: tests/test_deploy.py lints this file with hadolint and
# runs deploy/install.sh, the install step below, in a fresh virtual environment.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# connector/examples links to config.example.yaml and mappings/: the wheel carries them.
COPY pyproject.toml README.md config.example.yaml ./
COPY mappings ./mappings
COPY connector ./connector
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/connector/bin:$PATH \
    CONNECTOR_CONFIG=/etc/connector/config.yaml \
    CONNECTOR_LOG_FORMAT=json
COPY deploy/install.sh /usr/local/bin/install-connector
COPY --from=build /dist/ /tmp/dist/
RUN sh /usr/local/bin/install-connector /opt/connector /tmp/dist/connector-*.whl \
    && rm -rf /tmp/dist \
    && useradd --system --no-log-init --uid 10001 --user-group --home-dir /var/lib/connector --create-home \
       --shell /usr/sbin/nologin connector
USER 10001:10001
WORKDIR /var/lib/connector
# server.port of the config (webhooks, /healthz, /metrics); set server.host: 0.0.0.0 in a container.
EXPOSE 8080
# Liveness (/livez), not readiness (/healthz): an engine acts on an unhealthy container by restarting
# it, and a restart cannot fix what readiness reports (a ledger database or Paubox that is down, sending
# paused); the daemon waits for those itself. Liveness fails only when the process stops answering.
# CONNECTOR_HEALTH_URL overrides the address (another server.port).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('CONNECTOR_HEALTH_URL', 'http://127.0.0.1:8080/livez'), timeout=4)"]
# The default command is `connector run`; the same image runs the others (`db upgrade`, `validate`...).
ENTRYPOINT ["connector"]
CMD ["run"]
