# syntax=docker/dockerfile:1.7
# One Dockerfile, one image per binary:
#   docker build --build-arg PACKAGE=api-gateway -t meridian-api-gateway .
#   docker build --build-arg PACKAGE=operator --build-arg BINARY=meridian-operator -t meridian-operator .
# PACKAGE is the Cargo package; BINARY its binary (defaults to the package name).
# Stages: chef (tooling) -> planner (dependency recipe) -> builder (dependencies, cached as
# their own layer, then the workspace) -> runtime (Debian slim, non-root, the one binary).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
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

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# Runtime libraries of librdkafka (TLS, compression, OAuth) and CA roots for TLS to Kafka,
# Redis, PostgreSQL and JWKS endpoints.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libcurl4 libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/app /usr/local/bin/app
# The distroless "nonroot" ids; the Helm chart and the operator's Deployments run as them
# with a read-only root filesystem.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/app"]
