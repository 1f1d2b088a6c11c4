# syntax=docker/dockerfile:1
#
# emarsys-stream worker image.
#
#   docker build -t emarsys-stream .
#   docker run --rm -e EMARSYS_USERNAME -e EMARSYS_SECRET \
#       -e KAFKA_BOOTSTRAP_SERVERS=broker:9092 \
#       -v "$PWD/deploy/config.docker.yaml:/etc/emarsys-stream/config.yaml:ro" \
#       -p 6066:6066 emarsys-stream
#
# See deploy/README.md and docker-compose.kafka.yml.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build stage: compile/install the project and its deps into a venv -------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers only in the build stage, for any dependency without a wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
COPY . /src
RUN pip install --upgrade pip setuptools wheel \
    && pip install .

# --- runtime stage ----------------------------------------------------------
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

# Unprivileged user; owns only the data dir.
RUN groupadd --system --gid 10001 emarsys \
    && useradd --system --uid 10001 --gid emarsys \
        --home-dir /var/lib/emarsys-stream --no-create-home \
        --shell /usr/sbin/nologin emarsys \
    && mkdir -p /var/lib/emarsys-stream /etc/emarsys-stream \
    && chown emarsys:emarsys /var/lib/emarsys-stream

COPY --from=build /opt/venv /opt/venv
# Default config (mount your own over it); secrets come from ${EMARSYS_*} env.
COPY deploy/config.docker.yaml /etc/emarsys-stream/config.yaml

USER emarsys
WORKDIR /var/lib/emarsys-stream

# RocksDB tables / worker state (config: data_dir).
VOLUME ["/var/lib/emarsys-stream"]

# Faust web server (/metrics etc.), config: web.port.
EXPOSE 6066

ENTRYPOINT ["emarsys-stream"]
CMD ["worker", "--config", "/etc/emarsys-stream/config.yaml"]
