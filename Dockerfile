# syntax=docker/dockerfile:1
# The authz sidecar: `docker build -t oais-authz .` then `docker run oais-authz` (authz serve).
# Two stages: the builder makes a wheel of this project and installs it with its dependencies
# into a virtualenv; the runtime copies only that virtualenv onto a slim Python.
# The runtime runs as a numeric non-root user and writes nothing outside /var/lib/authz (a
# volume: the embedded SQLite database) and /tmp (mount a tmpfs), so it runs with a read-only
# root filesystem. Health is the gRPC health service on 9191: Kubernetes' native `grpc:` probes
# use it directly; there is no HEALTHCHECK and no grpc_health_probe binary.

ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/authz
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY authz ./authz
COPY ratelimit ./ratelimit
COPY demo ./demo
# Every dependency ships manylinux wheels, so no compiler is needed. pip compiles the
# bytecode at install time, so the read-only runtime never has to. Versions are the ones
# constraints.txt pins (`make lock`), the same as `make install`'s. xds-protos ships an old
# copy of opentelemetry/proto that may overwrite opentelemetry-proto's, which the OTLP exporter
# needs: it is installed again last.
RUN /opt/authz/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/authz/bin/pip install --constraint constraints.txt /wheels/*.whl \
    && /opt/authz/bin/pip install --constraint constraints.txt --force-reinstall --no-deps \
        opentelemetry-proto \
    && /opt/authz/bin/authz --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="oais-authz" \
      org.opencontainers.image.description="Envoy ext_authz sidecar for OpenAI-compatible APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin authz \
    && install --directory --owner 10001 --group 10001 --mode 0750 /var/lib/authz
COPY --from=build /opt/authz /opt/authz
ENV PATH=/opt/authz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    AUTHZ_GRPC_ADDR=0.0.0.0:9191 \
    AUTHZ_METRICS_ADDR=0.0.0.0:9464 \
    AUTHZ_DATABASE_URL=sqlite:////var/lib/authz/authz.db
VOLUME ["/var/lib/authz"]
WORKDIR /var/lib/authz
USER 10001:10001
EXPOSE 9191 9464
# SIGTERM: NOT_SERVING, drain, exit 0 (the sidecar handles it itself as PID 1).
STOPSIGNAL SIGTERM
CMD ["authz", "serve"]
