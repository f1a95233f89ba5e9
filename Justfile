# Meridian — task runner. `just` lists the recipes.
set shell := ["bash", "-euo", "pipefail", "-c"]

# Build outside the checkout, so a fresh clone (CI) reuses earlier compilation.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", env_var("HOME") / ".cache/meridian/target")

# List the recipes.
default:
    @just --list

# Install (cached) and start the local dependencies: postgres redis kafka kube engine (default: all).
deps-up *groups:
    bash dev/deps.sh up {{groups}}

# Stop the local dependencies (their data is kept).
deps-down *groups:
    bash dev/deps.sh down {{groups}}

# Show each dependency group, the log folder and the kubeconfig path.
deps-status *groups:
    bash dev/deps.sh status {{groups}}

# Stop PostgreSQL, Redis and Kafka (or the named ones), delete their data, start them fresh.
deps-reset *groups:
    bash dev/deps.sh reset {{groups}}

# Install what building the workspace needs (C toolchain, CMake, headers for librdkafka).
build-deps:
    bash dev/build-deps.sh

# Keep the shared target directory within its size budget and make sure a build has room.
target-trim:
    bash dev/target-trim.sh

# Build every binary (debug profile, shared with the tests).
build: build-deps target-trim
    cargo build --workspace --bins

# The main job: dependencies, control plane, operator, the example MiddlewareStack and its
# services (run by the process runner), the smoke flow; prints URLs, a JWT and examples.
demo: build deps-up
    bash dev/demo.sh up

# Stop everything the demo started: the stack (cleaned up by the operator), the operator and
# runner, then the dependencies.
demo-down:
    bash dev/demo.sh down
    bash dev/deps.sh down

# The whole suite as CI runs it: lint, unit and integration tests on real dependencies, the
# dashboards against a real Prometheus, 15 s of fuzzing per target, the images (each started as a pod runs it), then the kind e2e on real
# containers.
test: build-deps target-trim deps-up lint-scripts lint-delivery deny
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    cargo build --workspace --bins --locked
    bash e2e/chart.sh
    bash e2e/rules.sh
    eval "$(bash dev/deps.sh env)" && cargo test --workspace --locked -- --skip on_redis_cluster
    just test-redis-cluster
    bash e2e/dashboards.sh
    bash dev/fuzz.sh 15
    bash dev/images.sh build
    bash e2e/images.sh
    bash e2e/kind.sh run

# The suites of everything that uses Redis (hub, gateway, cache updater with the whole pipeline)
# again on the local 3-master Redis Cluster, where keys used together are hash-tagged and rooms
# are sharded channels. Left out: the tests that cut one Redis's TCP path (a cluster has many).
test-redis-cluster:
    eval "$(bash dev/deps.sh env)" && REDIS_URL="$MERIDIAN_REDIS_CLUSTER_URL" REDIS_CLUSTER=true \
        cargo test --locked -p ws-hub -p api-gateway -p cache-updater --test it -- \
        --skip redis_is_down --skip redis_while_it_is_down --skip while_the_pubsub_connection_was_down \
        --skip whose_peer_vanished --skip readmodel::

# Fuzz what the services parse from clients (command bodies, Idempotency-Key, hub frames, the
# route table, JWTs): each target for `seconds` (nightly toolchain, libFuzzer), seeded by fuzz/corpus.
fuzz seconds="60" *targets:
    bash dev/fuzz.sh {{seconds}} {{targets}}

# Supply chain: every dependency's license is allowed, every crate comes from crates.io (deny.toml).
deny:
    bash dev/tools.sh install cargo-deny
    "$(bash dev/tools.sh path cargo-deny)" deny --locked check licenses bans sources

# Known vulnerabilities in the dependencies (needs the RustSec advisory database from GitHub).
deny-advisories:
    bash dev/tools.sh install cargo-deny
    "$(bash dev/tools.sh path cargo-deny)" deny --locked check advisories

# One crate's tests against the running dependencies (`just deps-up` first), e.g. `just test-crate processor`.
test-crate crate *args:
    eval "$(bash dev/deps.sh env)" && cargo test --locked -p {{crate}} {{args}}

# The chart's alert rules: `promtool check rules` and `promtool test rules` (every alert tested).
rules-check:
    bash e2e/rules.sh

# The chart's dashboards against a real Prometheus scraping the demo stack: every query has data.
dashboards-check: build deps-up
    bash e2e/dashboards.sh

# Lint the Dockerfile (hadolint) and the GitHub Actions workflows (actionlint).
lint-delivery:
    bash dev/tools.sh install hadolint actionlint
    "$(bash dev/tools.sh path hadolint)" Dockerfile
    "$(bash dev/tools.sh path actionlint)" .github/workflows/*.yaml

# Helm chart checks against the local control plane: lint, server-side dry run, install/upgrade/uninstall.
chart-check: deps-up
    bash e2e/chart.sh

# Every image, built here from the Dockerfile with nothing pulled: the services, the operator
# and the kind e2e's Redis, PostgreSQL and Kafka (tags meridian/<name>:<version>; sizes printed).
images: build-deps target-trim (deps-up "engine")
    bash dev/images.sh build

# The container-based e2e: a kind cluster (node image built here), the images, the Helm-installed
# operator, the demo stack, the smoke flow and real faults on real pods.
e2e-kind: build-deps target-trim deps-up
    cargo build --locked -p tools --bin meridian-smoke
    bash e2e/kind.sh run

# Format the code.
fmt:
    cargo fmt --all

# Lint the shell scripts (shellcheck from Debian).
lint-scripts:
    bash -c 'source dev/lib.sh && apt_install shellcheck'
    shellcheck -x dev/*.sh dev/deps/*.sh dev/images/*.sh dev/kind/*.sh dev/engine/runc-wrapper e2e/*.sh .ci/run

# Regenerate the CRD YAML in crds/ from the operator's Rust types (a test checks for drift).
crds:
    cargo run --quiet --locked -p operator --bin crdgen > crds/middlewarestack.yaml.tmp
    mv crds/middlewarestack.yaml.tmp crds/middlewarestack.yaml
    cp crds/middlewarestack.yaml charts/meridian-operator/files/crds/middlewarestack.yaml

# The pipeline benchmark (release build, local dependencies): accepted commands/s against pgbench running the intake statement, relayed events/s, end-to-end latency.
bench-pipeline: build-deps target-trim (deps-up "postgres" "redis" "kafka")
    eval "$(bash dev/deps.sh env)" && BENCH_PGBENCH="$(bash dev/deps/postgres.sh bindir)/pgbench" cargo bench --locked -p cache-updater --bench pipeline

# Hub benchmark (release, two hubs on the local Redis): memory per idle connection at 10k/50k, deliveries/s to one room with 10k subscribers and to 30 rooms sharing them, publish→deliver p99 across replicas; then the same on Centrifugo (the peer, built from its Go module) and the ratios.
bench-hub *args: target-trim (deps-up "redis")
    cargo build --release --locked -p ws-hub -p tools --bin ws-hub --bin bench-hub --bin meridian-loadgen
    bash dev/tools.sh install centrifugo
    eval "$(bash dev/deps.sh env)" && "$CARGO_TARGET_DIR/release/bench-hub" --centrifugo "$(bash dev/tools.sh path centrifugo)" {{args}}

# Hub benchmark on the local 3-master Redis Cluster (release, three hubs, sharded rooms): the same figures, deliveries/s to one room and to 30 rooms; no Centrifugo (its comparison runs on one Redis).
bench-hub-cluster *args: target-trim (deps-up "redis")
    cargo build --release --locked -p ws-hub -p tools --bin ws-hub --bin bench-hub --bin meridian-loadgen
    eval "$(bash dev/deps.sh env)" && "$CARGO_TARGET_DIR/release/bench-hub" --redis-cluster {{args}}

# Operator benchmark on the kwok control plane with real provisioning: N=100 and N=1,000 stacks
# to Ready, operator peak RSS, steady-state API writes per stack. BENCH_STACKS, BENCH_STEADY_SECONDS
# (default 60; 300 for a long soak), BENCH_READY_TIMEOUT_SECONDS, BENCH_REPLICAS override.
bench-operator: target-trim deps-up
    cargo build --release --locked -p operator -p tools --bin meridian-operator --bin bench-operator
    eval "$(bash dev/deps.sh env)" && "${CARGO_TARGET_DIR:-target}/release/bench-operator"

# Gateway benchmark (release): req/s and added latency vs the upstream direct, with JWT + rate limiting, rate-limit checks/s, and nginx as the peer (alternating rounds, CPU per request).
bench-gateway: target-trim (deps-up "redis")
    cargo build --release --locked -p api-gateway -p tools --bin api-gateway --bin bench-gateway
    bash dev/tools.sh install nginx
    eval "$(bash dev/deps.sh env)" && BENCH_NGINX="$(bash dev/tools.sh path nginx)" "${CARGO_TARGET_DIR:-target}/release/bench-gateway"

# The gateway's instructions per proxied request (callgrind) and where they go: repeatable on a busy machine.
profile-gateway: target-trim
    cargo build --release --locked -p api-gateway --bin api-gateway
    bash dev/profile-gateway.sh

# Edge benchmarks: the gateway's, then the hub's.
bench-edge: bench-gateway bench-hub
