#!/usr/bin/env bash
# Kubernetes for tests without containers and without a kubelet: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and the kwok controller, all plain processes. kwok
# plays one fake node, kwok-node-0, and the lifecycle of the pods scheduled onto it (Running and
# Ready at once, Jobs complete, deletions finish), so Deployments become Available, Jobs
# succeed and `helm install --wait` returns. No container ever runs; a bare Pod (no Job owning
# it, e.g. a `helm test` pod) stays Running forever.
#
#   dev/deps/kube.sh up|down|status
#   dev/deps/kube.sh module    regenerate dev/k8s/build/go.{mod,sum} for $MERIDIAN_K8S_VERSION
#
# Every binary is built from Go modules, once per version, into $MERIDIAN_CACHE_DIR and linked
# into $MERIDIAN_STATE_DIR/bin: kube-apiserver, kube-controller-manager, kube-scheduler and kubectl
# (wrapper module dev/k8s/build), etcd (wrapper module dev/k8s/build-etcd), kwok and helm.
# Certificates (openssl), kubeconfigs and etcd data live in $MERIDIAN_STATE_DIR/kube and are kept
# across down/up. The admin kubeconfig is $MERIDIAN_STATE_DIR/kube/admin.kubeconfig (context
# "meridian", user CN=meridian-admin in system:masters).
#
# Ports: etcd $MERIDIAN_ETCD_PORT (+ peer $MERIDIAN_ETCD_PEER_PORT), API server
# $MERIDIAN_APISERVER_PORT; the controller-manager, scheduler and kwok health/metrics ports
# default to the API server port +1, +2, +3 (not the upstream 10257/10259/10247) so that a second
# copy with other lib.sh ports does not collide (the deprecated `kubectl get componentstatuses`
# hard-codes 10257/10259 and so reports them Unhealthy). Everything binds to 127.0.0.1 only.
#
# Nothing runs in the pods: their IPs (kwok --cidr) and Service cluster IPs are not reachable.
# The API server would try to dial them for admission webhooks and aggregated APIs.
#
# The controller-manager and scheduler run without client-side rate limits (as kwokctl does for
# scale tests) and with more deployment/replica-set workers: with the defaults (20 qps) creating
# the ReplicaSets and Pods of 1,000 stacks alone would take minutes (`just bench-operator`).

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

: "${MERIDIAN_K8S_VERSION:=v1.36.3}"   # k8s.io/kubernetes; staging modules at v0.<minor>.<patch>
: "${MERIDIAN_ETCD_VERSION:=v3.6.16}"  # go.etcd.io/etcd/server/v3
: "${MERIDIAN_KWOK_VERSION:=v0.8.0}"   # sigs.k8s.io/kwok
: "${MERIDIAN_HELM_VERSION:=v3.22.0}"  # helm.sh/helm/v3 (Helm 3 only: the ldflags name v3 packages)
: "${MERIDIAN_KCM_PORT:=$((MERIDIAN_APISERVER_PORT + 1))}"
: "${MERIDIAN_SCHEDULER_PORT:=$((MERIDIAN_APISERVER_PORT + 2))}"
: "${MERIDIAN_KWOK_PORT:=$((MERIDIAN_APISERVER_PORT + 3))}"

# Bump when the build commands or flags change, so that cached builds are redone.
BUILD_REV=1

K8S_SRC=$DEV_DIR/k8s
KUBE_DIR=$MERIDIAN_STATE_DIR/kube
PKI=$KUBE_DIR/pki
ADMIN_KC=$KUBE_DIR/admin.kubeconfig
BIN_DIR=$MERIDIAN_STATE_DIR/bin
NODE_NAME=kwok-node-0
API_URL=https://127.0.0.1:$MERIDIAN_APISERVER_PORT
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16
# In start order; `down` stops them in reverse. Each name is also the binary's name.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

K8S_MAJOR=${MERIDIAN_K8S_VERSION#v}; K8S_MAJOR=${K8S_MAJOR%%.*}
K8S_MINOR=${MERIDIAN_K8S_VERSION#v*.}; K8S_MINOR=${K8S_MINOR%%.*}
K8S_BIN=$MERIDIAN_CACHE_DIR/kube/$MERIDIAN_K8S_VERSION/bin
ETCD_BIN=$MERIDIAN_CACHE_DIR/etcd/$MERIDIAN_ETCD_VERSION/bin
KWOK_BIN=$MERIDIAN_CACHE_DIR/kwok/$MERIDIAN_KWOK_VERSION/bin
HELM_BIN=$MERIDIAN_CACHE_DIR/helm/$MERIDIAN_HELM_VERSION/bin

# ---------------------------------------------------------------------------------------------
# Build (cached per version; a build without its .complete marker is redone)
# ---------------------------------------------------------------------------------------------

need_go() {
  command -v go >/dev/null ||
    die "the Kubernetes binaries are built from source: install Go >= 1.26 (https://go.dev/dl) first"
}

# fingerprint FILE... : short hash of the files and the build revision. The committed wrapper
# modules are hashed byte for byte, so their text (e.g. the `meridian.local/e2e/...` module paths
# and comments from before the scripts moved to dev/) changes only with a version bump.
fingerprint() { { cat "$@"; echo "rev $BUILD_REV"; } | sha256sum | cut -c1-16; }

# built DIR STAMP: was DIR completely built from inputs with this fingerprint?
built() { [ "$(cat "$1/.complete" 2>/dev/null)" = "$2" ]; }

# gen_k8s_module VERSION DIR: write the wrapper module for k8s.io/kubernetes@VERSION into DIR:
# require it, replace every staging module it replaces with ./staging/src/... by its published
# v0.<minor>.<patch>, and `go mod tidy`.
gen_k8s_module() {
  local v=$1 dir=$2 kmod staging
  staging=v0.${v#v*.}
  kmod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$kmod" ] || die "could not download k8s.io/kubernetes@$v"
  mkdir -p "$dir"
  {
    cat <<EOF
// Wrapper module that builds the Kubernetes control-plane binaries from the published
// k8s.io/kubernetes module. k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces
// them with ./staging/src/..., which only resolves inside its own repository; here every staging
// module is replaced with its published release instead. Built by dev/deps/kube.sh; regenerate
// with \`MERIDIAN_K8S_VERSION=vX.Y.Z dev/deps/kube.sh module\`.
module meridian.local/dev/k8s/build

EOF
    grep -E '^(go|godebug) ' "$kmod"
    printf '\ntool (\n'
    printf '\tk8s.io/kubernetes/cmd/%s\n' kube-apiserver kube-controller-manager kube-scheduler kubectl
    printf ')\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
    awk -v s="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, s }' "$kmod"
    printf ')\n'
  } >"$dir/go.mod"
  rm -f "$dir/go.sum"
  go -C "$dir" mod tidy
}

# k8s_module: directory of the wrapper module for $MERIDIAN_K8S_VERSION: the committed one, or
# one generated (once) in the cache for another version.
k8s_module() {
  local dir=$K8S_SRC/build
  if grep -q "k8s.io/kubernetes $MERIDIAN_K8S_VERSION\b" "$dir/go.mod"; then echo "$dir"; return; fi
  dir=$MERIDIAN_CACHE_DIR/kube/$MERIDIAN_K8S_VERSION/module
  if [ ! -f "$dir/.complete" ]; then
    need_go
    spin "generating the wrapper module for Kubernetes $MERIDIAN_K8S_VERSION" \
      gen_k8s_module "$MERIDIAN_K8S_VERSION" "$dir" >&2 || die "module generation failed"
    touch "$dir/.complete"
  fi
  echo "$dir"
}

gen_etcd_module() {
  go -C "$2" mod edit -require="go.etcd.io/etcd/server/v3@$1" && go -C "$2" mod tidy
}

# etcd_module: the committed etcd wrapper, or a copy (once, in the cache) for another version.
etcd_module() {
  local dir=$K8S_SRC/build-etcd
  if grep -q "go.etcd.io/etcd/server/v3 $MERIDIAN_ETCD_VERSION\b" "$dir/go.mod"; then echo "$dir"; return; fi
  dir=$MERIDIAN_CACHE_DIR/etcd/$MERIDIAN_ETCD_VERSION/module
  if [ ! -f "$dir/.complete" ]; then
    need_go
    mkdir -p "$dir" && cp "$K8S_SRC/build-etcd/go.mod" "$dir/"
    spin "generating the wrapper module for etcd $MERIDIAN_ETCD_VERSION" \
      gen_etcd_module "$MERIDIAN_ETCD_VERSION" "$dir" >&2 || die "module generation failed"
    touch "$dir/.complete"
  fi
  echo "$dir"
}

# go_build WHAT OUTDIR STAMP CMD...: run the build CMD into a fresh OUTDIR unless it is complete.
go_build() {
  local what=$1 out=$2 stamp=$3 start=$SECONDS; shift 3
  built "$out" "$stamp" && return 0
  need_go
  rm -rf "$out" && mkdir -p "$out"
  spin "building $what" env CGO_ENABLED=0 "$@" || die "building $what failed"
  echo "$stamp" >"$out/.complete"
  ok "built $what in $((SECONDS - start))s"
}

build_kubernetes() {
  local mod stamp ld p date
  mod=$(k8s_module)
  stamp=$(fingerprint "$mod/go.mod" "$mod/go.sum")
  built "$K8S_BIN" "$stamp" && return 0
  need_go
  # The release date of the module stands in for the build date: reproducible builds.
  date=$(go -C "$mod" list -m -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Time": "\(.*\)",*$/\1/p')
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$MERIDIAN_K8S_VERSION -X $p.gitMajor=$K8S_MAJOR -X $p.gitMinor=$K8S_MINOR"
    ld+=" -X $p.gitCommit= -X $p.gitTreeState=clean -X $p.buildDate=${date:-1970-01-01T00:00:00Z}"
  done
  # One invocation, so that the packages the four binaries share are compiled once.
  go_build "Kubernetes $MERIDIAN_K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)" \
    "$K8S_BIN" "$stamp" \
    go -C "$mod" build -mod=readonly -trimpath -ldflags "$ld" -o "$K8S_BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
  local mod
  mod=$(etcd_module)
  go_build "etcd $MERIDIAN_ETCD_VERSION" "$ETCD_BIN" "$(fingerprint "$mod/go.mod" "$mod/go.sum")" \
    go -C "$mod" build -mod=readonly -trimpath -ldflags "-s -w" -o "$ETCD_BIN/etcd" go.etcd.io/etcd/server/v3
}

build_kwok() {
  # kwok's go.mod has no replace directives: `go install module@version` works and is pinned by
  # the checksum database.
  local ld="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${MERIDIAN_KWOK_VERSION#v}"
  go_build "kwok $MERIDIAN_KWOK_VERSION" "$KWOK_BIN" "$(echo "$ld $BUILD_REV" | sha256sum | cut -c1-16)" \
    env GOBIN="$KWOK_BIN" go install -trimpath -ldflags "$ld" "sigs.k8s.io/kwok/cmd/kwok@$MERIDIAN_KWOK_VERSION"
}

build_helm() {
  # As helm's Makefile does, plus the Kubernetes version its lint rules and default
  # capabilities assume set to the one we run.
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$MERIDIAN_HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$K8S_MAJOR -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$K8S_MINOR"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$K8S_MAJOR -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$K8S_MINOR"
  go_build "helm $MERIDIAN_HELM_VERSION" "$HELM_BIN" "$(echo "$ld $BUILD_REV" | sha256sum | cut -c1-16)" \
    env GOBIN="$HELM_BIN" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$MERIDIAN_HELM_VERSION"
}

install_binaries() {
  build_kubernetes
  build_etcd
  build_kwok
  build_helm
  mkdir -p "$BIN_DIR"
  local b
  for b in "$K8S_BIN"/kube-apiserver "$K8S_BIN"/kube-controller-manager "$K8S_BIN"/kube-scheduler \
    "$K8S_BIN"/kubectl "$ETCD_BIN"/etcd "$KWOK_BIN"/kwok "$HELM_BIN"/helm; do
    [ "$(readlink "$BIN_DIR/${b##*/}" 2>/dev/null)" = "$b" ] || ln -sfn "$b" "$BIN_DIR/${b##*/}"
  done
}

# ---------------------------------------------------------------------------------------------
# PKI and kubeconfigs (generated once, kept across down/up)
# ---------------------------------------------------------------------------------------------

# new_ca NAME CN: a self-signed CA key and certificate NAME (in the current directory).
new_ca() {
  openssl genrsa -out "$1.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$1.key" -sha256 -days 3650 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$1.crt"
}

# sign CA NAME SUBJECT EXTENSIONS: key and certificate NAME signed by CA, unless they exist.
sign() {
  local ca=$1 name=$2 subj=$3 ext=$4
  [ -f "$name.crt" ] && [ -f "$name.key" ] && return 0
  openssl genrsa -out "$name.key" 2048 2>/dev/null
  openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr"
  printf '%s\n' "$ext" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -days 3650 -sha256 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

# Bump when gen_pki makes new files: the missing ones are then added to an existing PKI.
PKI_REV=2
gen_pki() {
  [ "$(cat "$PKI/.complete" 2>/dev/null)" = "$PKI_REV" ] && return 0
  step "generating certificates in $PKI"
  if [ ! -f "$PKI/ca.crt" ] || [ ! -f "$PKI/ca.key" ]; then rm -rf "$PKI"; fi
  mkdir -p "$PKI" && chmod 700 "$PKI"
  (
    cd "$PKI"
    local client="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    [ -f ca.crt ] || new_ca ca meridian-kubernetes-ca
    sign ca apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    sign ca admin "/O=system:masters/CN=meridian-admin" "$client"
    sign ca controller-manager "/CN=system:kube-controller-manager" "$client"
    sign ca scheduler "/CN=system:kube-scheduler" "$client"
    # Front proxy (request-header authentication): the API server's client certificate towards
    # aggregated API servers; controller-manager and scheduler read its CA to authenticate.
    [ -f front-proxy-ca.crt ] || new_ca front-proxy-ca meridian-front-proxy-ca
    sign front-proxy-ca front-proxy-client "/CN=front-proxy-client" "$client"
    # Service-account token signing key pair (controller-manager signs, API server verifies).
    if [ ! -f sa.key ]; then
      openssl genrsa -out sa.key 2048 2>/dev/null
      openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    fi
    chmod 600 ./*.key
  ) || die "certificate generation failed"
  echo "$PKI_REV" >"$PKI/.complete"
  ok "CA, API server, admin, controller-manager, scheduler and front-proxy certificates, service-account keys"
}

# write_kubeconfig FILE CERT-NAME USER: a self-contained kubeconfig (certificates embedded).
write_kubeconfig() {
  local file=$1 cert=$2 user=$3 tmp
  tmp=$(mktemp "$file.XXXXXX")
  cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: meridian
  cluster:
    server: $API_URL
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 "$PKI/$cert.key")
contexts:
- name: meridian
  context:
    cluster: meridian
    user: $user
current-context: meridian
EOF
  chmod 600 "$tmp"
  # Rewrite only on change, so that readers never see a half-written file.
  if cmp -s "$tmp" "$file"; then rm -f "$tmp"; else mv -f "$tmp" "$file"; fi
}

write_kubeconfigs() {
  write_kubeconfig "$ADMIN_KC" admin meridian-admin
  write_kubeconfig "$KUBE_DIR/controller-manager.kubeconfig" controller-manager system:kube-controller-manager
  write_kubeconfig "$KUBE_DIR/scheduler.kubeconfig" scheduler system:kube-scheduler
  write_kubeconfig "$KUBE_DIR/kwok.kubeconfig" admin meridian-admin
}

# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------

# component_pid NAME: pid of our running NAME (pid file, process alive and really that binary,
# so that a stale pid file after a reboot whose pid was reused does not count).
component_pid() {
  local pid exe
  pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  [ "${exe##*/}" = "$1" ] || return 1
  echo "$pid"
}

port_owner() {
  ss -ltnpH "sport = :$1" 2>/dev/null |
    sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1
}

STARTED=()
# start_component NAME "PORT..." CMD...: start NAME unless it runs.
start_component() {
  local name=$1 ports=$2 port; shift 2
  component_pid "$name" >/dev/null && return 0
  rm -f "$(pidfile "$name")"
  for port in $ports; do
    if port_open "$port"; then
      die "$name: 127.0.0.1:$port is taken by $(port_owner "$port" || true) (another copy? set the MERIDIAN_*_PORT variables)"
    fi
  done
  if ((${#STARTED[@]} == 0)); then
    step "starting Kubernetes $MERIDIAN_K8S_VERSION (etcd $MERIDIAN_ETCD_VERSION, kwok $MERIDIAN_KWOK_VERSION) on $API_URL"
  fi
  # kwok manages a node only while it holds the node's Lease, and every kwok process has a new
  # identity: a Lease left by the previous one would keep the pods Pending until it expires
  # (up to 40s). No kwok of ours runs now, so release it.
  if [ "$name" = kwok ]; then
    api "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/$NODE_NAME" -X DELETE >/dev/null 2>&1 || true
  fi
  start_bg "$name" "$@"
  printf '%q ' "$@" >"$MERIDIAN_STATE_DIR/pids/$name.cmd"
  STARTED+=("$name")
}

# stale_reason NAME CMD...: why the running NAME must be restarted to run CMD (it runs another
# command line, e.g. after a version or flag change, or a binary rebuilt since); fails if not.
stale_reason() {
  local name=$1 pid; shift
  pid=$(component_pid "$name") || return 1
  if [ "$(cat "$MERIDIAN_STATE_DIR/pids/$name.cmd" 2>/dev/null)" != "$(printf '%q ' "$@")" ]; then
    echo "runs with another command line"
  elif [[ $(readlink "/proc/$pid/exe") == *" (deleted)" ]]; then
    echo "runs a binary rebuilt since"
  else
    return 1
  fi
}

# stop_component NAME: stop our NAME if it runs; never signal a pid that is not ours.
stop_component() {
  if component_pid "$1" >/dev/null; then
    stop_bg "$1" 30
    ok "stopped $1"
  fi
  rm -f "$(pidfile "$1")" "$MERIDIAN_STATE_DIR/pids/$1.cmd"
}

# wait_healthy NAME TIMEOUT CMD...: poll CMD; fail early, with the log's tail, if NAME exits.
wait_healthy() {
  local name=$1 timeout=$2 start=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    # (is_running, not component_pid: right after the start the pid may not have exec'd yet)
    if ! is_running "$name" || ((SECONDS - start >= timeout)); then
      if is_running "$name"; then warn "$name not healthy after ${timeout}s"; else warn "$name exited"; fi
      warn "last lines of $MERIDIAN_LOG_DIR/$name.log:"
      tail -n 30 "$MERIDIAN_LOG_DIR/$name.log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.25
  done
}

# api PATH [CURL-ARGS...]: request (GET by default) to the API server as admin.
api() {
  local path=$1; shift
  curl -fsS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$@" "$API_URL$path"
}
https_ok() { curl -fsSk --max-time 3 "$1"; }
http_ok() { curl -fsS --max-time 3 "$1"; }
kc() { "$BIN_DIR/kubectl" --kubeconfig "$ADMIN_KC" --cache-dir "$KUBE_DIR/cache" "$@"; }
node_ready() { api "/api/v1/nodes/$NODE_NAME" | tr -d ' \n' | grep -q '"type":"Ready","status":"True"'; }
server_version() { api /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p'; }

# component_cmd NAME: set PORTS (to check free) and CMD (to run) for component NAME.
PORTS=
CMD=()
component_cmd() {
  local stages=() f advertise=()
  case $1 in
    etcd)
      PORTS="$MERIDIAN_ETCD_PORT $MERIDIAN_ETCD_PEER_PORT"
      CMD=("$ETCD_BIN/etcd"
        --name=meridian
        --data-dir="$KUBE_DIR/etcd"
        --listen-client-urls="http://127.0.0.1:$MERIDIAN_ETCD_PORT"
        --advertise-client-urls="http://127.0.0.1:$MERIDIAN_ETCD_PORT"
        --listen-peer-urls="http://127.0.0.1:$MERIDIAN_ETCD_PEER_PORT"
        --initial-advertise-peer-urls="http://127.0.0.1:$MERIDIAN_ETCD_PEER_PORT"
        --initial-cluster="meridian=http://127.0.0.1:$MERIDIAN_ETCD_PEER_PORT"
        --initial-cluster-state=new
        --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
        --auto-compaction-mode=periodic --auto-compaction-retention=10m
        --log-level=warn)
      ;;
    kube-apiserver)
      # The API server advertises the address of the default route's interface in the
      # `kubernetes` Service's endpoints; without a default route it cannot pick one, and
      # loopback is invalid there, so give it loopback and no endpoint reconciler.
      awk '$2 == "00000000" { found = 1 } END { exit !found }' /proc/net/route 2>/dev/null ||
        advertise=(--advertise-address=127.0.0.1 --endpoint-reconciler-type=none)
      PORTS=$MERIDIAN_APISERVER_PORT
      # shellcheck disable=SC2054 # the comma in --authorization-mode=Node,RBAC is meant
      CMD=("$K8S_BIN/kube-apiserver"
        --etcd-servers="http://127.0.0.1:$MERIDIAN_ETCD_PORT"
        --bind-address=127.0.0.1 --secure-port="$MERIDIAN_APISERVER_PORT" "${advertise[@]}"
        --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key"
        --client-ca-file="$PKI/ca.crt"
        --requestheader-client-ca-file="$PKI/front-proxy-ca.crt"
        --requestheader-allowed-names=front-proxy-client
        --requestheader-username-headers=X-Remote-User
        --requestheader-group-headers=X-Remote-Group
        --requestheader-extra-headers-prefix=X-Remote-Extra-
        --proxy-client-cert-file="$PKI/front-proxy-client.crt"
        --proxy-client-key-file="$PKI/front-proxy-client.key"
        --authorization-mode=Node,RBAC
        --service-cluster-ip-range="$SERVICE_CIDR"
        --service-account-issuer=https://kubernetes.default.svc.cluster.local
        --service-account-key-file="$PKI/sa.pub"
        --service-account-signing-key-file="$PKI/sa.key"
        --allow-privileged=true
        --profiling=false)
      ;;
    kube-controller-manager)
      PORTS=$MERIDIAN_KCM_PORT
      CMD=("$K8S_BIN/kube-controller-manager"
        --kubeconfig="$KUBE_DIR/controller-manager.kubeconfig"
        --authentication-kubeconfig="$KUBE_DIR/controller-manager.kubeconfig"
        --authorization-kubeconfig="$KUBE_DIR/controller-manager.kubeconfig"
        --bind-address=127.0.0.1 --secure-port="$MERIDIAN_KCM_PORT"
        --leader-elect=false
        --cluster-name=meridian
        --service-account-private-key-file="$PKI/sa.key"
        --root-ca-file="$PKI/ca.crt"
        --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key"
        --use-service-account-credentials=true
        --service-cluster-ip-range="$SERVICE_CIDR"
        --kube-api-qps=5000 --kube-api-burst=10000
        --concurrent-deployment-syncs=20 --concurrent-replicaset-syncs=20
        --profiling=false)
      ;;
    kube-scheduler)
      PORTS=$MERIDIAN_SCHEDULER_PORT
      CMD=("$K8S_BIN/kube-scheduler"
        --kubeconfig="$KUBE_DIR/scheduler.kubeconfig"
        --authentication-kubeconfig="$KUBE_DIR/scheduler.kubeconfig"
        --authorization-kubeconfig="$KUBE_DIR/scheduler.kubeconfig"
        --bind-address=127.0.0.1 --secure-port="$MERIDIAN_SCHEDULER_PORT"
        --leader-elect=false
        --kube-api-qps=5000 --kube-api-burst=10000
        --profiling=false)
      ;;
    kwok)
      # Stages come from --config files (kwok's own "fast" stages, copied into dev/k8s/kwok),
      # so no kwok CRDs are needed. KWOK_WORKDIR keeps a ~/.kwok/kwok.yaml out of it. The
      # server (healthz, metrics, and kubelet-like logs/exec endpoints) binds to loopback.
      for f in "$K8S_SRC"/kwok/*.yaml; do stages+=(--config="$f"); done
      PORTS=$MERIDIAN_KWOK_PORT
      CMD=(env KWOK_WORKDIR="$KUBE_DIR/kwok" "$KWOK_BIN/kwok"
        --kubeconfig="$KUBE_DIR/kwok.kubeconfig"
        "${stages[@]}"
        --manage-all-nodes=false
        --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake
        --node-lease-duration-seconds=40
        --cidr="$POD_CIDR"
        --node-ip=127.0.0.1
        --server-address="127.0.0.1:$MERIDIAN_KWOK_PORT")
      ;;
  esac
}

start_all() {
  local i j name reason
  # A component that must be restarted takes the ones after it down first: the API server
  # would otherwise wait for its clients' watches before it exits.
  for i in "${!COMPONENTS[@]}"; do
    name=${COMPONENTS[i]}
    component_cmd "$name"
    if reason=$(stale_reason "$name" "${CMD[@]}"); then
      warn "$name $reason: restarting it and the components after it"
      for ((j = ${#COMPONENTS[@]} - 1; j >= i; j--)); do stop_component "${COMPONENTS[j]}"; done
      break
    fi
  done
  for name in "${COMPONENTS[@]}"; do
    component_cmd "$name"
    start_component "$name" "$PORTS" "${CMD[@]}"
    case $name in
      etcd) wait_healthy etcd 60 http_ok "http://127.0.0.1:$MERIDIAN_ETCD_PORT/health" || die "etcd did not start" ;;
      kube-apiserver) wait_healthy kube-apiserver 180 api /readyz || die "kube-apiserver did not become ready" ;;
    esac
  done
  wait_healthy kube-controller-manager 60 https_ok "https://127.0.0.1:$MERIDIAN_KCM_PORT/healthz" ||
    die "kube-controller-manager did not become healthy"
  wait_healthy kube-scheduler 60 https_ok "https://127.0.0.1:$MERIDIAN_SCHEDULER_PORT/healthz" ||
    die "kube-scheduler did not become healthy"
  wait_healthy kwok 60 http_ok "http://127.0.0.1:$MERIDIAN_KWOK_PORT/healthz" || die "kwok did not become healthy"
}

# smoke_test: a Deployment of two pods becomes Available, with the default ServiceAccount's
# token mounted; then it is deleted again.
smoke_test() {
  local d=meridian-smoke sa
  kc -n default delete deployment "$d" --ignore-not-found --wait=true >/dev/null
  kc -n default create deployment "$d" --image=busybox --replicas=2 >/dev/null
  if ! kc -n default wait --for=condition=Available "deployment/$d" --timeout=60s >/dev/null; then
    kc -n default get deployment,replicaset,pod -l "app=$d" -o wide >&2 || true
    die "smoke test: deployment/$d did not become Available (logs in $MERIDIAN_LOG_DIR)"
  fi
  sa=$(kc -n default get pod -l "app=$d" \
    -o jsonpath='{range .items[*]}{.spec.serviceAccountName}/{.spec.volumes[*].projected.sources[*].serviceAccountToken.path}{" "}{end}')
  kc -n default delete deployment "$d" --wait=true >/dev/null
  [[ $sa == *default/token* ]] || die "smoke test: pods have no default ServiceAccount token ($sa)"
  ok "smoke test: deployment/$d Available with 2 pods (serviceaccount default), deleted"
}

up() {
  local start=$SECONDS
  if ! command -v curl >/dev/null || ! command -v openssl >/dev/null; then apt_install curl openssl; fi
  install_binaries
  mkdir -p "$KUBE_DIR"
  gen_pki
  write_kubeconfigs

  # Returns at once when every component runs (with the same command line) and answers.
  start_all
  if ! api "/api/v1/nodes/$NODE_NAME" >/dev/null 2>&1; then
    kc apply -f "$K8S_SRC/node.yaml" >/dev/null || die "could not create node $NODE_NAME"
  fi
  wait_for kwok 60 node_ready || die "node $NODE_NAME did not become Ready"
  wait_for kube-controller-manager 60 api /api/v1/namespaces/default/serviceaccounts/default ||
    die "the default ServiceAccount was not created"
  if ((${#STARTED[@]} == 0)); then
    ok "kube already up: $API_URL ($(server_version), node $NODE_NAME Ready)"
    return 0
  fi
  ok "started ${STARTED[*]}"
  smoke_test
  ok "kube up in $((SECONDS - start))s: $API_URL ($(server_version)), KUBECONFIG=$ADMIN_KC"
}

down() {
  local i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop_component "${COMPONENTS[i]}"; done
}

# Two lines: the control plane (etcd, API server, controller-manager, scheduler) and kwok
# (the fake node and pod lifecycle) with the client tools.
status() {
  local n missing=() ver rc=0 tools
  for n in "${COMPONENTS[@]}"; do
    [ "$n" = kwok ] && continue
    component_pid "$n" >/dev/null || missing+=("$n")
  done
  if ((${#missing[@]})); then
    printf '%-11s%-5s%s\n' kube down "$API_URL (not running: ${missing[*]})"; rc=1
  elif ! api /readyz >/dev/null 2>&1; then
    printf '%-11s%-5s%s\n' kube down "$API_URL (API server not ready)"; rc=1
  else
    ver=$(server_version)
    printf '%-11s%-5s%s\n' kube up "$API_URL ($ver: etcd, apiserver, controller-manager, scheduler)"
  fi
  tools="kubectl, helm in $MERIDIAN_STATE_DIR/bin"
  if ! component_pid kwok >/dev/null; then
    printf '%-11s%-5s%s\n' kwok down "kwok controller not running"; rc=1
  elif [ $rc -ne 0 ] || ! node_ready; then
    printf '%-11s%-5s%s\n' kwok down "node $NODE_NAME not Ready"; rc=1
  else
    printf '%-11s%-5s%s\n' kwok up "$MERIDIAN_KWOK_VERSION, node $NODE_NAME Ready; $tools"
  fi
  printf '%-16s%s\n' '' "KUBECONFIG=$ADMIN_KC"
  return $rc
}

case "${1:-status}" in
  up) up ;;
  down) down ;;
  status) status ;;
  module) need_go; gen_k8s_module "$MERIDIAN_K8S_VERSION" "$K8S_SRC/build" ;;
  *) die "usage: $0 up|down|status|module" ;;
esac
