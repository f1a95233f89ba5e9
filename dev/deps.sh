#!/usr/bin/env bash
# Installs, starts, stops and reports the platform's local dependencies as plain processes
# (no containers): PostgreSQL, Redis, Kafka (KRaft) and a Kubernetes control plane with kwok;
# and the Docker engine that builds the images and runs the kind e2e.
#
#   dev/deps.sh up     [group...]   install (cached) and start; idempotent
#   dev/deps.sh down   [group...]   stop (data is kept under $MERIDIAN_STATE_DIR)
#   dev/deps.sh status [group...]   one line per group; exit 1 when any is down
#   dev/deps.sh reset  [group...]   stop, delete the data, start fresh (postgres redis kafka;
#                                   default: those three) — before a benchmark, for example
#   dev/deps.sh env                 print the environment variables the services and tests use
#
# Groups: postgres redis kafka kube engine (default: all). Each group is dev/deps/<group>.sh and
# implements the same three verbs.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_GROUPS=(postgres redis kafka kube engine)
verb=${1:-status}; shift || true
groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=("${ALL_GROUPS[@]}")

print_env() {
  cat <<ENV
export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:$MERIDIAN_PG_PORT/middleware
export MERIDIAN_POSTGRES_CA_FILE=$MERIDIAN_STATE_DIR/postgres/tls/ca.crt
export REDIS_URL=redis://127.0.0.1:$MERIDIAN_REDIS_PORT
export MERIDIAN_REDIS_CLUSTER_URL=redis://127.0.0.1:$MERIDIAN_REDIS_CLUSTER_PORT
export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$MERIDIAN_KAFKA_PORT
export MERIDIAN_KAFKA_SASL_BOOTSTRAP=127.0.0.1:$MERIDIAN_KAFKA_SASL_PORT
export MERIDIAN_KAFKA_SSL_BOOTSTRAP=127.0.0.1:$MERIDIAN_KAFKA_SSL_PORT
export MERIDIAN_KAFKA_CA_FILE=$MERIDIAN_STATE_DIR/kafka/tls/ca.crt
export MERIDIAN_KAFKA_ADMIN_USER=admin
export MERIDIAN_KAFKA_ADMIN_PASSWORD=$(printf %q "$MERIDIAN_KAFKA_ADMIN_PASSWORD")
export KUBECONFIG=$MERIDIAN_STATE_DIR/kube/admin.kubeconfig
export PATH=$MERIDIAN_STATE_DIR/bin:\$PATH
ENV
}

case "$verb" in
  up)
    start=$SECONDS
    for g in "${groups[@]}"; do bash "$DEV_DIR/deps/$g.sh" up; done
    print_env > "$MERIDIAN_STATE_DIR/env"
    step "dependencies up in $((SECONDS - start))s; logs in $MERIDIAN_LOG_DIR"
    echo "    source $MERIDIAN_STATE_DIR/env   # for DATABASE_URL, REDIS_URL, KAFKA_BOOTSTRAP_SERVERS, KUBECONFIG"
    ;;
  down)
    # Reverse order: the control plane first, the databases last.
    for ((i = ${#groups[@]} - 1; i >= 0; i--)); do bash "$DEV_DIR/deps/${groups[i]}.sh" down; done
    ;;
  reset)
    [ $# -eq 0 ] && groups=(postgres redis kafka)
    for g in "${groups[@]}"; do
      case $g in
        postgres | redis | kafka) bash "$DEV_DIR/deps/$g.sh" reset ;;
        kube | engine) warn "$g has no reset; skipped" ;;
        *) die "unknown group '$g'" ;;
      esac
    done
    print_env > "$MERIDIAN_STATE_DIR/env"
    ;;
  status)
    rc=0
    for g in "${groups[@]}"; do bash "$DEV_DIR/deps/$g.sh" status || rc=1; done
    echo "logs:       $MERIDIAN_LOG_DIR"
    echo "kubeconfig: $MERIDIAN_STATE_DIR/kube/admin.kubeconfig"
    exit $rc
    ;;
  env) print_env ;;
  *) die "unknown verb '$verb' (expected up, down, status or env)" ;;
esac
