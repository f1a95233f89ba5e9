# Every image of the platform, from one file.
#
# Product images (the five services and the operator), target `runtime`:
#   docker build --build-arg PACKAGE=api-gateway -t meridian/api-gateway:0.1.0 .
#   docker build --build-arg PACKAGE=operator --build-arg BINARY=meridian-operator -t meridian/operator:0.1.0 .
# PACKAGE is the Cargo package; BINARY its binary (defaults to the package name).
# Two ways to the same runtime stage, chosen by APP_FROM:
#   builder   (default) compiles in RUST_IMAGE: chef -> planner -> builder (dependencies cached
#             as their own layer, then the workspace).
#   prebuilt  copies `bin/<BINARY>` from the build context: `just images` builds the binaries
#             on the host and assembles the context (dev/images.sh).
#
# In-cluster development dependencies for the kind e2e (e2e/kind/deps.yaml), from Debian's
# packages and Kafka's jars on Maven Central: targets `redis`, `postgres`, `kafka`. They are
# built from the context dev/images.sh assembles (the `kafka` target needs its `kafka-libs/`).
#
# DEBIAN_IMAGE is the Debian base of every runtime image; where no registry can be reached,
# dev/images.sh makes one with debootstrap and passes it here.
#
# No `# syntax=` line: the Dockerfile frontend built into the engine is enough, and it needs
# no image pulled from a registry.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUST_IMAGE=rust:${RUST_VERSION}-${DEBIAN_RELEASE}
ARG DEBIAN_IMAGE=debian:${DEBIAN_RELEASE}-slim
ARG APP_FROM=builder

# ---- compile in a Rust image -------------------------------------------------------------
FROM ${RUST_IMAGE} AS chef
# cmake builds the bundled librdkafka; the -dev packages are what it links against.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev libssl-dev pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG PACKAGE
ARG BINARY=${PACKAGE}
# The dependency layer: rebuilt only when Cargo.toml/Cargo.lock change.
COPY --from=planner /src/recipe.json recipe.json
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo chef cook --release --locked --recipe-path recipe.json --package "${PACKAGE}"
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked --package "${PACKAGE}" --bin "${BINARY}" \
    && install -D "target/release/${BINARY}" /out/app

# ---- or take a binary built on the host (glibc of the host = glibc of DEBIAN_IMAGE) ------
FROM scratch AS prebuilt
ARG PACKAGE
ARG BINARY=${PACKAGE}
COPY bin/${BINARY} /out/app

FROM ${APP_FROM} AS app

# ---- development dependencies for the kind e2e ------------------------------------------
FROM ${DEBIAN_IMAGE} AS redis
# The package's user, created first with a fixed id so that USER can be numeric (the kubelet
# checks runAsNonRoot against it).
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
USER 999:999
WORKDIR /var/lib/redis
EXPOSE 6379
# In memory only; the operator's ACL users are re-created by its resync after a restart.
ENTRYPOINT ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]

FROM ${DEBIAN_IMAGE} AS postgres
# As for redis: the package's user first, with a fixed id.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
COPY dev/images/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
# A directory below the volume's mount point: initdb wants a directory it can own.
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data/pgdata
USER 999:999
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]

FROM ${DEBIAN_IMAGE} AS kafka
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
# Kafka's broker, tools and a log4j2 backend: the classpath of the local broker, fetched from
# Maven Central by `dev/deps/kafka.sh libs` and put in the build context by dev/images.sh.
COPY kafka-libs/ /opt/kafka/libs/
COPY dev/kafka/server.properties dev/kafka/log4j2.properties /opt/kafka/config/
COPY dev/images/kafka-entrypoint.sh /usr/local/bin/kafka-entrypoint
RUN install -d -o 65532 -g 65532 /var/lib/kafka
USER 65532:65532
EXPOSE 9092 9094
ENTRYPOINT ["/usr/local/bin/kafka-entrypoint"]

# ---- the product's runtime: Debian slim, non-root, one binary ---------------------------
FROM ${DEBIAN_IMAGE} AS runtime
# Runtime libraries of librdkafka (TLS, compression) and CA roots for TLS to Kafka, Redis,
# PostgreSQL and JWKS endpoints.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libcurl4 libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=app /out/app /usr/local/bin/app
# The distroless "nonroot" ids; the Helm chart and the operator's Deployments run as them
# with a read-only root filesystem.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/app"]
