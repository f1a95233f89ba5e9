#!/usr/bin/env bash
# The images, each started as a user's cluster runs it: as its non-root user, with a
# read-only root filesystem, no capabilities and no privilege escalation.
#   - the five services and the operator answer 200 on /health and /ready, with the local
#     dependencies (`just deps-up`) and, for the operator, the local control plane (watching
#     a namespace of its own, so it touches nothing else), then stop cleanly on SIGTERM;
#   - redis, postgres and kafka accept a client's request.
# Needs the images (`just images`) and the dependencies. Usage: e2e/images.sh
set -euo pipefail
# shellcheck source=../dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"
eval "$(bash "$REPO_ROOT/dev/deps.sh" env)"

PREFIX=meridian-image-check
SERVICES=(api-gateway command-service processor cache-updater ws-hub operator)
WORK=$(mktemp -d)
trap 'docker ps -aq --filter "name=^$PREFIX-" | xargs -r docker rm -f -v >/dev/null; rm -rf "$WORK"' EXIT
failures=0
fail() { warn "$*"; failures=$((failures + 1)); }

version() { sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/Cargo.toml" | head -n 1; }
VERSION=$(version)

# run NAME IMAGE [docker run options...] -- [args...]: a container locked down as in a pod.
run() {
  local name=$1 image=$2; shift 2
  docker run -d --name "$PREFIX-$name" --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges "$@" "$image" >/dev/null
}

# http_status URL: the status code, or 000 when nothing answers.
http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true; }

# await_200 NAME URL SECONDS
await_200() {
  local name=$1 url=$2 deadline=$((SECONDS + $3))
  until [ "$(http_status "$url")" = 200 ]; do
    if (( SECONDS >= deadline )); then
      docker logs --tail 30 "$PREFIX-$name" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

check_user() {
  local image=$1 user
  user=$(docker image inspect --format '{{.Config.User}}' "$image")
  case ${user%%:*} in
    '' | 0 | root) fail "$image runs as root ('$user')" ;;
  esac
}

check_service() {
  local name=$1 image="meridian/$1:$VERSION" port status
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  check_user "$image"
  local extra=()
  if [ "$name" = operator ]; then
    # Its own namespace, so it reconciles nothing the test suite owns; a flattened kubeconfig
    # its non-root user can read.
    kubectl create namespace "$PREFIX" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    kubectl config view --raw --flatten >"$WORK/kubeconfig" && chmod 0644 "$WORK/kubeconfig"
    # Ready once its conversion webhook serves: its certificate in a Secret of that namespace,
    # the CRD pointed at this container (on the host network, as an operator outside the
    # cluster is).
    local webhook_port
    webhook_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    extra=(-v "$WORK/kubeconfig:/etc/meridian/kubeconfig:ro" -e KUBECONFIG=/etc/meridian/kubeconfig
      -e "WATCH_NAMESPACE=$PREFIX" -e "LEASE_NAME=$PREFIX" -e "POD_NAMESPACE=$PREFIX"
      -e "WEBHOOK_PORT=$webhook_port" -e "WEBHOOK_URL=https://127.0.0.1:$webhook_port/convert")
  fi
  run "$name" "$image" --network host -e "PORT=$port" -e BIND_ADDRESS=127.0.0.1 -e LOG_FORMAT=json \
    -e "DATABASE_URL=$DATABASE_URL" -e "REDIS_URL=$REDIS_URL" -e "KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS" \
    "${extra[@]}"
  if ! await_200 "$name" "http://127.0.0.1:$port/health" 60; then fail "$image: /health never answered 200"; return; fi
  if ! await_200 "$name" "http://127.0.0.1:$port/ready" 60; then fail "$image: /ready never answered 200"; return; fi
  docker stop --time 30 "$PREFIX-$name" >/dev/null
  status=$(docker inspect --format '{{.State.ExitCode}}' "$PREFIX-$name")
  [ "$status" = 0 ] || { fail "$image exited with $status after SIGTERM"; return; }
  ok "$image: /health and /ready 200 as user $(docker image inspect --format '{{.Config.User}}' "$image"), read-only root, clean stop"
}

# await_exec NAME SECONDS CMD...: poll CMD (run in the container) until it succeeds.
await_exec() {
  local name=$1 deadline=$((SECONDS + $2)); shift 2
  until docker exec "$PREFIX-$name" "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then docker logs --tail 30 "$PREFIX-$name" >&2 || true; return 1; fi
    sleep 1
  done
}

check_dependencies() {
  local image
  for image in redis postgres kafka; do check_user "meridian/$image:$VERSION"; done
  # Their data in a volume of their own, as in e2e/kind/deps.yaml; a network of their own.
  docker network create "$PREFIX" >/dev/null 2>&1 || true
  run redis "meridian/redis:$VERSION" --network "$PREFIX"
  if await_exec redis 30 redis-cli ping; then ok "meridian/redis:$VERSION answers PING"; else fail "redis did not answer"; fi
  run postgres "meridian/postgres:$VERSION" --network "$PREFIX" -v /var/lib/postgresql/data -e POSTGRES_PASSWORD=check -e POSTGRES_DB=middleware
  if await_exec postgres 60 env PGPASSWORD=check psql -h 127.0.0.1 -U postgres -d middleware -c 'select 1'; then
    ok "meridian/postgres:$VERSION serves database middleware over TCP with a password"
  else fail "postgres did not answer"; fi
  run kafka "meridian/kafka:$VERSION" --network "$PREFIX" --network-alias kafka -v /var/lib/kafka \
    -e KAFKA_ADVERTISED_HOST=kafka
  if await_exec kafka 120 java -Xmx128m -cp '/opt/kafka/libs/*' org.apache.kafka.tools.TopicCommand \
    --bootstrap-server kafka:9092 --list; then
    ok "meridian/kafka:$VERSION answers a metadata request"
  else fail "kafka did not answer"; fi
  docker rm -f -v "$PREFIX-redis" "$PREFIX-postgres" "$PREFIX-kafka" >/dev/null
  docker network rm "$PREFIX" >/dev/null
}

step "images $VERSION: non-root, read-only root filesystem"
for s in "${SERVICES[@]}"; do check_service "$s"; done
check_dependencies
[ "$failures" = 0 ] || die "$failures image check(s) failed"
ok "all images passed"
