#!/usr/bin/env bash
# The container-based e2e, as a user runs the platform: a kind cluster from kind-config.yaml,
# every image built here (`just images`) and loaded into it, the development Kafka, Redis and
# PostgreSQL of e2e/kind/deps.yaml, the operator installed from its image with the Helm chart,
# the demo stack applied and awaited Ready (on Kafka's SASL listener as its own SCRAM user, whose
# ACLs the broker must enforce), the smoke flow through localhost:8080 (gateway) and
# :8085 (hub) — which kind-config.yaml maps to the node's NodePorts — then real faults on real
# pods: a service crash-looping, a pod deleted, PostgreSQL and Kafka restarted, the Redis pod
# replaced; after each the stack's conditions must say so and recover by themselves (no
# service restarted after a dependency restart), and a smoke flow must pass again with every
# document written before still there.
#
# The kind binary and its node image are built here too (dev/kind/node-image.sh), unless
# KIND_NODE_IMAGE names one to use (kind's published images, where a registry is reachable).
# On failure it prints the cluster's state; the cluster is deleted at the end unless
# KEEP_CLUSTER=1.
# Usage: e2e/kind.sh [run|down]
set -euo pipefail
# shellcheck source=../dev/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../dev/lib.sh"

CLUSTER=meridian
NODE=$CLUSTER-control-plane
SERVICES=(api-gateway command-service processor cache-updater ws-hub)
JWT_SECRET="kind-e2e-only-not-a-real-secret"
: "${CARGO_TARGET_DIR:=$MERIDIAN_CACHE_DIR/target}"
export CARGO_TARGET_DIR
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/Cargo.toml" | head -n 1)
# kubectl and helm as `just deps-up` builds them; the cluster's own kubeconfig.
export PATH=$MERIDIAN_STATE_DIR/bin:$PATH KUBECONFIG=$MERIDIAN_STATE_DIR/kind/kubeconfig

kind_bin() { bash "$REPO_ROOT/dev/kind/node-image.sh" kind; }

dump() {
  warn "kind e2e failed; state of the cluster follows"
  kubectl get nodes,all,middlewarestacks -A -o wide || true
  kubectl describe middlewarestack demo || true
  kubectl -n meridian-system logs deployment/meridian-operator --all-containers --tail=200 || true
  for s in "${SERVICES[@]}"; do kubectl logs "deployment/demo-$s" --all-containers --tail=60 || true; done
  kubectl -n meridian-deps logs statefulset/kafka --tail=60 || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -60 || true
}

down() {
  "$(kind_bin)" delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
}

# finish STATUS: on failure the cluster's state; then the cluster goes unless KEEP_CLUSTER=1.
finish() {
  if [ "$1" != 0 ]; then dump; fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then down; fi
}

smoke() {
  "$CARGO_TARGET_DIR/debug/meridian-smoke" --gateway http://127.0.0.1:8080 --hub ws://127.0.0.1:8085 \
    --jwt-secret "$JWT_SECRET" --issuer https://auth.example.invalid/ --audience meridian "$@"
}

# smoke_tries: the smoke flow, up to three times 5 s apart; prints the passing run's output.
# Right after the stack turns Ready, a NodePort's first connection through the host's port
# mapping can be reset: a user's client retries too.
smoke_tries() {
  local out attempt
  for attempt in 1 2 3; do
    if out=$(smoke 2>&1); then echo "$out"; return 0; fi
    grep -v '^ ' <<<"$out" >&2
    (( attempt < 3 )) || die "smoke flow failed three times"
    warn "smoke flow failed (try $attempt of 3); again in 5s"
    sleep 5
  done
}

# condition TYPE: the stack's condition as "Status/Reason".
condition() {
  kubectl get middlewarestack demo \
    -o jsonpath="{.status.conditions[?(@.type==\"$1\")].status}/{.status.conditions[?(@.type==\"$1\")].reason}"
}

# await_condition TYPE STATUS SECONDS: until the stack's condition TYPE has STATUS.
await_condition() {
  local type=$1 want=$2 started=$SECONDS deadline=$((SECONDS + $3))
  until [ "$(condition "$type" | cut -d/ -f1)" = "$want" ]; do
    (( SECONDS < deadline )) || die "$type did not become $want within $3s (now $(condition "$type"))"
    sleep 1
  done
  ok "$type=$want ($(condition "$type" | cut -d/ -f2)) after $((SECONDS - started))s"
}

transition_time() {
  kubectl get middlewarestack demo \
    -o jsonpath="{.status.conditions[?(@.type==\"$1\")].lastTransitionTime}"
}

# await_outage TYPE SINCE SECONDS: until the stack's condition TYPE is False, or has made a
# transition since the time SINCE (it went False and came back between two looks; the
# operator's Events tell).
await_outage() {
  local type=$1 since=$2 deadline=$((SECONDS + $3)) now
  while :; do
    now=$(condition "$type")
    if [ "${now%%/*}" = False ]; then ok "$type=False (${now#*/})"; return; fi
    if [ "$(transition_time "$type")" != "$since" ]; then
      kubectl get events --field-selector "reason=${type}False" --no-headers | tail -n 1 |
        grep -q . || die "$type changed without an Event ${type}False"
      ok "$type went False and back: $(kubectl get events \
        --field-selector "reason=${type}False" -o jsonpath='{.items[-1:].message}')"
      return
    fi
    (( SECONDS < deadline )) || die "$type did not become False within $3s (now $now)"
    sleep 1
  done
}

# fault NAME CONDITION SECONDS ACTION...: run ACTION, see the stack's CONDITION go False with
# a reason, then the stack become Ready again by itself within SECONDS.
fault() {
  local name=$1 type=$2 recovery=$3 since; shift 3
  step "fault: $name"
  since=$(transition_time "$type")
  "$@"
  await_outage "$type" "$since" 120
  await_condition Ready True "$recovery"
}

# pod_of SERVICE: the name of the demo stack's (first) pod of SERVICE.
pod_of() {
  kubectl get pods -l "app.kubernetes.io/name=$1,app.kubernetes.io/instance=demo" \
    -o jsonpath='{.items[0].metadata.name}'
}

# kill_process NAMESPACE CONTAINER: SIGKILL to the process of the running container named
# CONTAINER of a pod in NAMESPACE; the kubelet restarts the container (an emptyDir stays).
kill_process() {
  local id pid
  id=$(docker exec "$NODE" crictl ps --name "$2" --label "io.kubernetes.pod.namespace=$1" -q | head -n 1)
  [ -n "$id" ] || die "no running container named $2 in namespace $1"
  pid=$(docker exec "$NODE" crictl inspect --output go-template --template '{{.info.pid}}' "$id")
  docker exec "$NODE" kill -KILL "$pid"
  ok "killed $2 (pid $pid on the node)"
}

kill_service_process() { kill_process default "$1"; }

# service_restarts: every demo pod with its container's restart count.
service_restarts() {
  kubectl get pods -l app.kubernetes.io/instance=demo \
    -o jsonpath='{range .items[*]}{.metadata.name}={.status.containerStatuses[0].restartCount} {end}'
}

# dependency_restart NAME: kills the dependency's server process (its data stays) and waits
# for the kubelet to restart it; then the smoke flow must pass again by itself within 60 s of
# the kill, and no service may have restarted: every client reconnects.
dependency_restart() {
  local name=$1 before started restarts
  step "fault: $name restarted (its process killed)"
  before=$(service_restarts)
  restarts=$(kubectl -n meridian-deps get pods -l "app=$name" \
    -o jsonpath='{.items[0].status.containerStatuses[0].restartCount}')
  started=$SECONDS
  kill_process meridian-deps "$name"
  until [ "$(kubectl -n meridian-deps get pods -l "app=$name" \
    -o jsonpath='{.items[0].status.containerStatuses[0].restartCount}')" -gt "$restarts" ]; do
    (( SECONDS - started < 60 )) || die "$name was not restarted within 60s"
    sleep 1
  done
  # When the restarted server takes connections again: from then on, recovery is the
  # services' own (their pools, producers and consumers reconnecting).
  local port back
  port=$(kubectl -n meridian-deps get pods -l "app=$name" -o jsonpath='{.items[0].spec.containers[0].ports[0].containerPort}')
  until kubectl -n meridian-deps exec "$(kubectl -n meridian-deps get pods -l "app=$name" -o name | head -n 1)" -- \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" >/dev/null 2>&1; do
    (( SECONDS - started < 90 )) || die "$name did not take connections within 90s"
    sleep 0.5
  done
  back=$SECONDS
  until smoke >/dev/null 2>&1; do
    (( SECONDS - started < 90 )) || { smoke || true; die "the smoke flow did not pass within 90s of the $name restart"; }
    sleep 1
  done
  ok "smoke flow passed again $((SECONDS - started))s after the kill, $((SECONDS - back))s after $name took connections again ($((back - started))s to restart)"
  (( SECONDS - back <= 15 )) || die "the services took $((SECONDS - back))s (more than 15s) to recover once $name was back"
  [ "$(service_restarts)" = "$before" ] || die "a service restarted: $before -> $(service_restarts)"
  ok "no service restarted ($before)"
  settle
}

# settle: until the stack has been Ready for 10 s in a row, so that the operator has seen the
# last fault end (its health check runs every 5 s here) before the next one starts.
settle() {
  local since=$SECONDS deadline=$((SECONDS + 180))
  while (( SECONDS - since < 10 )); do
    (( SECONDS < deadline )) || die "the stack did not stay Ready for 10s within 180s (now $(condition Ready))"
    [ "$(condition Ready | cut -d/ -f1)" = True ] || since=$SECONDS
    sleep 1
  done
  ok "stack Ready for 10s"
}

# crash_loop SERVICE: kills SERVICE's process, and once the kubelet restarted it, kills it
# again: the kubelet then holds the next restart back (CrashLoopBackOff, 10 s), an outage the
# operator must report. A single restart can be back before anything looks.
crash_loop() {
  local before deadline=$((SECONDS + 120))
  before=$(restart_count "$1")
  kill_service_process "$1"
  until (( $(restart_count "$1") > before )) &&
    [ -n "$(docker exec "$NODE" crictl ps --name "$1" -q)" ]; do
    (( SECONDS < deadline )) || die "$1 was not restarted within 120s"
    sleep 1
  done
  kill_service_process "$1"
  until (( $(restart_count "$1") >= before + 2 )); do
    (( SECONDS < deadline )) || die "$1 was not restarted twice within 120s"
    sleep 1
  done
  ok "$1 restarted twice"
}

restart_count() {
  kubectl get pods -l "app.kubernetes.io/name=$1,app.kubernetes.io/instance=demo" \
    -o jsonpath='{.items[0].status.containerStatuses[0].restartCount}'
}

# topic_command ARGS...: Kafka's TopicCommand, run in the broker's pod (its JVM takes a few
# seconds); warnings go to stdout as lines starting with `[`.
topic_command() {
  kubectl -n meridian-deps exec kafka-0 -- java -Xmx128m \
    -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties -Dmeridian.kafka.level=WARN \
    -cp '/opt/kafka/libs/*' org.apache.kafka.tools.TopicCommand "$@"
}

# kafka_principal: the stack on Kafka's SASL listener as its own SCRAM user. The operator
# logged in as the admin (Secret meridian-kafka-admin), created the user, its ACLs and the
# Secret demo-kafka the services log in with; in the real broker that user sees the stack's
# topics and nothing else, and may create no topic outside the stack's prefix.
kafka_principal() {
  local ns=default user password prefix=default.demo. out topics foreign=default.other.events
  kubectl get secret demo-kafka >/dev/null || die "the operator wrote no Secret demo-kafka"
  user=$(kubectl get secret demo-kafka -o jsonpath='{.data.username}' | base64 -d)
  [ "$user" = "meridian:$ns:demo" ] || die "Secret demo-kafka names user '$user', not meridian:$ns:demo"
  [ "$(kubectl get secret demo-kafka -o jsonpath='{.data.mechanism}' | base64 -d)" = SCRAM-SHA-512 ] ||
    die "Secret demo-kafka's mechanism is not SCRAM-SHA-512"
  ok "Secret demo-kafka: user $user, SCRAM-SHA-512"
  kubectl get middlewarestack demo \
    -o jsonpath='{.status.conditions[?(@.type=="CredentialsReady")].message}' | grep -qF "Kafka principal $user" ||
    die "CredentialsReady does not mention the Kafka principal $user"

  local env_ref
  env_ref=$(kubectl get deployment demo-processor -o jsonpath='{range .spec.template.spec.containers[0].env[?(@.name=="KAFKA_SASL_USERNAME")]}{.valueFrom.secretKeyRef.name}/{.valueFrom.secretKeyRef.key}{end}')
  [ "$env_ref" = demo-kafka/username ] || die "the processor's KAFKA_SASL_USERNAME comes from '$env_ref', not demo-kafka/username"
  out=$(kubectl exec deployment/demo-processor -- printenv KAFKA_BOOTSTRAP_SERVERS KAFKA_SECURITY_PROTOCOL \
    KAFKA_SASL_MECHANISM KAFKA_SASL_USERNAME | paste -sd ' ' -) || true
  [ "$out" = "kafka.meridian-deps.svc:9094 sasl_plaintext SCRAM-SHA-512 $user" ] ||
    die "the processor's pod has Kafka settings '$out'"
  ok "processor pod: KAFKA_SASL_USERNAME from demo-kafka/username; $out"

  # Another tenant's topic, created through the PLAINTEXT door (a super user).
  topic_command --bootstrap-server 127.0.0.1:9092 --create --if-not-exists --topic "$foreign" \
    --partitions 1 --replication-factor 1 >/dev/null
  # The stack's login as a client configuration in the pod (umask 077: it holds the password).
  password=$(kubectl get secret demo-kafka -o jsonpath='{.data.password}' | base64 -d)
  printf '%s\n' security.protocol=SASL_PLAINTEXT sasl.mechanism=SCRAM-SHA-512 \
    "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"$user\" password=\"$password\";" |
    kubectl -n meridian-deps exec -i kafka-0 -- sh -c 'umask 077; cat >/tmp/stack-client.properties'
  topics=$(topic_command --bootstrap-server kafka.meridian-deps.svc:9094 \
    --command-config /tmp/stack-client.properties --list | grep -v '^\[' | sort | paste -sd ' ' -)
  [ "$topics" = "${prefix}cache ${prefix}commands ${prefix}commands.dlq ${prefix}events" ] ||
    die "as $user on :9094, Kafka lists '$topics', not exactly the stack's four topics"
  ok "as $user on :9094: topics $topics (not $foreign, nor __consumer_offsets)"
  if out=$(topic_command --bootstrap-server kafka.meridian-deps.svc:9094 \
    --command-config /tmp/stack-client.properties --create --topic "$ns.demo2.events" \
    --partitions 1 --replication-factor 1 2>&1); then
    die "as $user, Kafka created topic $ns.demo2.events"
  fi
  grep -q 'TopicAuthorizationException' <<<"$out" || { echo "$out" >&2; die "creating $ns.demo2.events failed otherwise than unauthorized"; }
  ok "as $user: creating $ns.demo2.events refused (TopicAuthorizationException)"
  kubectl -n meridian-deps exec kafka-0 -- rm -f /tmp/stack-client.properties
}

run() {
  local start=$SECONDS kind node_image
  step "Docker engine"
  bash "$REPO_ROOT/dev/deps.sh" up engine

  step "kind and its node image"
  bash "$REPO_ROOT/dev/kind/node-image.sh" build
  kind=$(kind_bin)
  node_image=${KIND_NODE_IMAGE:-$(bash "$REPO_ROOT/dev/kind/node-image.sh" ref)}

  step "images"
  bash "$REPO_ROOT/dev/images.sh" build
  [ -x "$CARGO_TARGET_DIR/debug/meridian-smoke" ] ||
    cargo build --locked -p tools --bin meridian-smoke

  step "kind cluster $CLUSTER ($node_image)"
  mkdir -p "$(dirname "$KUBECONFIG")"
  if ! "$kind" get clusters | grep -qx "$CLUSTER"; then
    "$kind" create cluster --config "$REPO_ROOT/kind-config.yaml" --image "$node_image" \
      --kubeconfig "$KUBECONFIG" --wait 180s
  fi
  trap 'finish $?' EXIT
  ok "cluster up after $((SECONDS - start))s"

  step "images loaded into the node"
  local images=()
  mapfile -t images < <(bash "$REPO_ROOT/dev/images.sh" list)
  "$kind" load docker-image --name "$CLUSTER" "${images[@]}"

  step "dependencies (Kafka KRaft, Redis, PostgreSQL)"
  kubectl apply -f "$REPO_ROOT/e2e/kind/deps.yaml"
  kubectl -n meridian-deps rollout status statefulset/kafka --timeout=300s
  kubectl -n meridian-deps rollout status deployment/redis --timeout=180s
  kubectl -n meridian-deps rollout status deployment/postgres --timeout=180s

  step "operator (Helm chart, image meridian/operator:$VERSION)"
  helm upgrade --install meridian-operator \
    "$REPO_ROOT/charts/meridian-operator" --namespace meridian-system --create-namespace \
    --set image.repository=meridian/operator --set image.tag="$VERSION" \
    --set image.pullPolicy=Never --wait --timeout 5m \
    --set 'extraEnv[0].name=HEALTH_CHECK_SECONDS' --set-string 'extraEnv[0].value=5'
  kubectl -n meridian-system get pods -o wide

  step "demo stack"
  kubectl apply -f "$REPO_ROOT/e2e/kind/stack.yaml" -f "$REPO_ROOT/e2e/kind/nodeports.yaml"
  kubectl wait --for=condition=Ready middlewarestack/demo --timeout=10m
  kubectl describe middlewarestack demo

  # The API server calls the operator's conversion webhook through its Service, trusting the
  # CA the operator issued into the CRD's caBundle.
  step "v1alpha1 through the conversion webhook"
  local hub_replicas
  hub_replicas=$(kubectl get middlewarestacks.v1alpha1.meridian.dev demo -o jsonpath='{.spec.services.wsHub.replicas}')
  [ "$hub_replicas" = "$(kubectl get middlewarestacks.v1beta1.meridian.dev demo -o jsonpath='{.spec.services.hub.replicas}')" ] ||
    die "v1alpha1 shows wsHub.replicas=$hub_replicas, not v1beta1's hub.replicas"
  kubectl patch middlewarestacks.v1alpha1.meridian.dev demo --type=merge \
    -p '{"metadata":{"annotations":{"e2e.meridian.dev/written-as":"v1alpha1"}}}' >/dev/null
  [ "$(kubectl get middlewarestacks.v1beta1.meridian.dev demo -o jsonpath='{.spec.redis.adminSecretRef.name}')" = meridian-redis-admin ] ||
    die "a write through v1alpha1 lost spec.redis.adminSecretRef"
  [ "$(kubectl get middlewarestacks.v1alpha1.meridian.dev demo -o jsonpath='{.spec.kafka.adminCredentialsSecret}')" = meridian-kafka-admin ] ||
    die "v1alpha1 does not show spec.kafka.adminCredentialsSecret"
  [ "$(kubectl get middlewarestacks.v1beta1.meridian.dev demo -o jsonpath='{.spec.kafka.adminSecretRef.name}')" = meridian-kafka-admin ] ||
    die "a write through v1alpha1 lost spec.kafka.adminSecretRef"
  kubectl get crd middlewarestacks.meridian.dev -o jsonpath='{.spec.conversion.webhook.clientConfig.caBundle}' | grep -q . ||
    die "the CRD has no caBundle"
  [ "$(kubectl get crd middlewarestacks.meridian.dev -o jsonpath='{.status.storedVersions}')" = '["v1beta1"]' ] ||
    die "stored versions are not [v1beta1]"
  ok "read and written as v1alpha1 (wsHub.replicas=$hub_replicas); stored as v1beta1"

  step "the stack's own Kafka principal (SCRAM-SHA-512 on :9094)"
  kafka_principal

  step "smoke flow through localhost:8080 (gateway) and :8085 (hub)"
  local out document token
  out=$(smoke_tries)
  echo "$out"
  document=$(sed -n 's|^ok   GET \(/v1/documents/[^ ]*\) returned it$|\1|p' <<<"$out")
  [ -n "$document" ] || die "the smoke flow did not name its document"

  local before
  before=$(restart_count processor)
  fault "the processor crash-looping" CoreAvailable 300 crash_loop processor
  (( $(restart_count processor) >= before + 2 )) || die "the processor's restart count did not rise by 2"
  ok "processor restart count $before -> $(restart_count processor)"

  # A deleted pod is replaced at once: its Deployment stays Available when the new pod is
  # ready within one readiness period, so no condition need change; the stack stays Ready.
  local old_pod
  old_pod=$(pod_of api-gateway)
  step "fault: the gateway's pod deleted"
  kubectl delete pod "$old_pod" --wait=false
  kubectl wait --for=delete "pod/$old_pod" --timeout=120s
  kubectl wait --for=condition=Ready pod -l app.kubernetes.io/name=api-gateway,app.kubernetes.io/instance=demo --timeout=120s
  [ "$(pod_of api-gateway)" != "$old_pod" ] || die "the gateway's pod was not replaced"
  ok "pod $old_pod replaced by $(pod_of api-gateway)"
  await_condition Ready True 300

  step "after the process kill and the pod deletion: smoke flow again"
  smoke_tries >/dev/null
  ok "smoke flow passed"

  # PostgreSQL and Kafka restart in place (their data is in the pod's emptyDir): the services'
  # pools, producers and consumers reconnect by themselves.
  dependency_restart postgres
  dependency_restart kafka

  # Redis keeps its ACL users in memory: a restart loses the stack's user. The services are
  # refused meanwhile and turn unready, which makes the operator provision the stack again
  # (not only at its resync, 5 min): the stack must be Ready within 2 min, the services'
  # clients healed by themselves, the hub's rooms fed again.
  fault "the Redis pod restarted" Ready 120 \
    kubectl -n meridian-deps delete pod -l app=redis --wait=false

  step "after the Redis restart: smoke flow again, through the hub too"
  smoke_tries >/dev/null
  ok "smoke flow passed"

  step "kubectl meridian rebuild-read-model: a Job replays the events into the read model"
  local summary
  "$CARGO_TARGET_DIR/debug/kubectl-meridian" rebuild-read-model demo -n default --wait --timeout-seconds 180 ||
    { kubectl logs -l app.kubernetes.io/name=read-model-rebuild --tail=40 >&2 || true; die "the read-model rebuild failed"; }
  summary=$(kubectl logs -l app.kubernetes.io/name=read-model-rebuild --tail=-1 | grep 'rebuild complete' || true)
  [[ $summary =~ \(([1-9][0-9]*)\ applied ]] || die "the rebuild applied no event: ${summary:-no summary}"
  ok "$summary"

  step "kubectl meridian dlq replay: a Job sends dead-lettered commands through again"
  "$CARGO_TARGET_DIR/debug/kubectl-meridian" dlq replay demo -n default --max 100 --wait --timeout-seconds 180 ||
    { kubectl logs -l app.kubernetes.io/name=dead-letter-replay --tail=40 >&2 || true; die "the dead-letter replay failed"; }
  summary=$(kubectl logs -l app.kubernetes.io/name=dead-letter-replay --tail=-1 | grep 'replay complete' || true)
  [[ -n $summary ]] || die "the dead-letter replay printed no summary"
  ok "$summary"

  step "kubectl meridian status: the pipeline from the pods' metrics"
  local status_out
  status_out=$("$CARGO_TARGET_DIR/debug/kubectl-meridian" status demo -n default)
  grep -qE '^ *consumer lag +cache-updater [0-9]+, processor [0-9]+' <<<"$status_out" ||
    { echo "$status_out" >&2; die "kubectl meridian status shows no consumer lag for both consumers"; }
  ok "$(grep -E '^ *(outbox backlog|consumer lag|dead-lettered)' <<<"$status_out" | tr -s ' ' | sed 's/^ //' | paste -sd ';' -)"

  step "after the faults: the first document is still there"
  token=$(smoke --print-token)
  curl -fsS --retry 3 --retry-delay 5 --retry-all-errors -H "Authorization: Bearer $token" \
    "http://127.0.0.1:8080$document" >/dev/null || die "GET $document failed after the faults"
  ok "GET $document still answers"
  kubectl describe middlewarestack demo
  ok "kind e2e passed in $((SECONDS - start))s"
}

case "${1:-run}" in
  run) run ;;
  down) down ;;
  *) die "usage: $0 [run|down]" ;;
esac
