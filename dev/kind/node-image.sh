#!/usr/bin/env bash
# A kind node image built entirely on this machine, pulling nothing from a container registry:
# `kind create cluster --image meridian/kind-node:v1.36.3` then works without registry access.
#
#   dev/kind/node-image.sh [build]   build the kind binary and the node image (idempotent)
#   dev/kind/node-image.sh kind      print the path of the kind binary (building it if needed)
#   dev/kind/node-image.sh ref       print the node image reference
#   dev/kind/node-image.sh binaries  only build the binaries;  ... rootfs  only the root file system
#   dev/kind/node-image.sh module    regenerate dev/kind/k8s/go.{mod,sum} for $MERIDIAN_K8S_VERSION
#
#   "$(dev/kind/node-image.sh kind)" create cluster --image "$(dev/kind/node-image.sh ref)" \
#     --config kind-config.yaml
# (on cgroup v1 hosts the kubelet needs `failCgroupV1: false`: see kind-config.yaml)
#
# Limits: single-node clusters (no routes between nodes' pod CIDRs); a node restarted with
# another IP address is not repaired; on hosts whose capability bounding set lacks
# CAP_SYS_RESOURCE, privileged pods get every other capability but a pod that adds
# SYS_RESOURCE explicitly fails to start (containerd hands privileged pods its own capabilities).
#
# What goes in, every piece built here and cached under $MERIDIAN_CACHE_DIR/kind by version
# (and a fingerprint of its inputs), so that a second run does nothing:
#   kind                   go install sigs.k8s.io/kind@$MERIDIAN_KIND_VERSION
#   kubelet kubeadm kubectl kube-proxy kube-apiserver kube-controller-manager kube-scheduler
#                          k8s.io/kubernetes@$MERIDIAN_K8S_VERSION through the wrapper module
#                          dev/kind/k8s (the control-plane wrapper of dev/deps/kube.sh plus the
#                          node binaries), with the same version ldflags as kube.sh
#   etcd                   the binary dev/deps/kube.sh builds ($MERIDIAN_CACHE_DIR/etcd/<ver>),
#                          built here the same way when it is missing
#   containerd, runc, crictl, CNI plugins (ptp, host-local, portmap, loopback), CoreDNS
#                          from their Go modules; runc with cgo and libseccomp, linked statically
#   pause                  build/pause/linux/pause.c of the Kubernetes module, static, gcc
#   root file system       debootstrap of Debian $MERIDIAN_DEBIAN_RELEASE (minbase + systemd,
#                          iptables, ...), `docker import`ed
#   component images       registry.k8s.io/{kube-apiserver,kube-controller-manager,
#                          kube-scheduler,kube-proxy,etcd,coredns/coredns,pause} with the tags
#                          `kubeadm config images list` names, FROM scratch with the binaries
#                          (kube-proxy adds iptables from the root file system), imported into
#                          the node's containerd content store (pinned, not unpacked) before the
#                          image is committed, as `kind build node-image` does with pulled images
#   node files             dev/kind/node/ (entrypoint, containerd config and CNI template,
#                          systemd units, kind's manifests), copied over the root file system
#
# Pod networking: no kindnetd (it is not a published Go module). containerd writes the CNI
# configuration itself from /etc/containerd/cni.template once the kubelet tells it the node's
# pod CIDR (ptp + host-local + portmap): enough for one node. /kind/manifests/default-cni.yaml
# is only a ConfigMap saying so. Storage: /kind/manifests/default-storage.yaml is a default
# StorageClass "standard" without a provisioner (PersistentVolumes must be created by hand).
#
# Environment: MERIDIAN_K8S_VERSION, MERIDIAN_KIND_VERSION, MERIDIAN_CONTAINERD_VERSION,
# MERIDIAN_RUNC_VERSION, MERIDIAN_CRICTL_VERSION, MERIDIAN_CNI_PLUGINS_VERSION,
# MERIDIAN_ETCD_VERSION, MERIDIAN_DEBIAN_RELEASE, MERIDIAN_DEBIAN_MIRROR,
# MERIDIAN_KIND_NODE_IMAGE (the tag to build).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

: "${MERIDIAN_K8S_VERSION:=v1.36.3}"          # k8s.io/kubernetes
: "${MERIDIAN_KIND_VERSION:=v0.33.0}"         # sigs.k8s.io/kind (kubeadm v1beta4 for Kubernetes >= 1.36)
: "${MERIDIAN_CONTAINERD_VERSION:=v2.3.7}"    # github.com/containerd/containerd/v2
: "${MERIDIAN_RUNC_VERSION:=v1.4.4}"          # github.com/opencontainers/runc
: "${MERIDIAN_CRICTL_VERSION:=v1.37.0}"       # sigs.k8s.io/cri-tools
: "${MERIDIAN_CNI_PLUGINS_VERSION:=v1.9.1}"   # github.com/containernetworking/plugins
: "${MERIDIAN_ETCD_VERSION:=v3.6.16}"         # go.etcd.io/etcd/server/v3 (as dev/deps/kube.sh)
: "${MERIDIAN_DEBIAN_RELEASE:=bookworm}"
: "${MERIDIAN_DEBIAN_MIRROR:=http://deb.debian.org/debian}"
: "${MERIDIAN_KIND_NODE_IMAGE:=meridian/kind-node:$MERIDIAN_K8S_VERSION}"

# Bump when a build command or flag below changes, so that cached builds are redone.
BUILD_REV=1

KIND_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$MERIDIAN_CACHE_DIR/kind
K8S_MAJOR=${MERIDIAN_K8S_VERSION#v}; K8S_MAJOR=${K8S_MAJOR%%.*}
K8S_MINOR=${MERIDIAN_K8S_VERSION#v*.}; K8S_MINOR=${K8S_MINOR%%.*}
KIND_BIN=$CACHE/kind/$MERIDIAN_KIND_VERSION/bin
KUBE_BIN=$CACHE/kube/$MERIDIAN_K8S_VERSION/bin
CONTAINERD_BIN=$CACHE/containerd/$MERIDIAN_CONTAINERD_VERSION/bin
RUNC_BIN=$CACHE/runc/$MERIDIAN_RUNC_VERSION/bin
CRICTL_BIN=$CACHE/crictl/$MERIDIAN_CRICTL_VERSION/bin
CNI_BIN=$CACHE/cni-plugins/$MERIDIAN_CNI_PLUGINS_VERSION/bin
ETCD_BIN=$MERIDIAN_CACHE_DIR/etcd/$MERIDIAN_ETCD_VERSION/bin   # shared with dev/deps/kube.sh
KUBE_BINARIES=(kubelet kubeadm kubectl kube-proxy kube-apiserver kube-controller-manager kube-scheduler)
CNI_PLUGINS=(main/ptp ipam/host-local meta/portmap main/loopback)
# Debian packages of the node on top of minbase. busybox-static also supplies the shell of the
# kube-proxy image.
NODE_PACKAGES=(systemd systemd-sysv dbus iptables conntrack iproute2 kmod procps
  libseccomp2 busybox-static)

export DOCKER_BUILDKIT=0   # the classic builder: FROM local images, nothing resolved remotely

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

need_go() {
  command -v go >/dev/null || die "the node image is built from source: install Go >= 1.26 first"
}

# fingerprint FILE... / fingerprint_of STRING...: short hash of the inputs and the build revision.
fingerprint() { { cat "$@"; echo "rev $BUILD_REV"; } | sha256sum | cut -c1-16; }
fingerprint_of() { printf '%s\n' "$@" "rev $BUILD_REV" | sha256sum | cut -c1-16; }

# built DIR STAMP: was DIR completely built from inputs with this fingerprint?
built() { [ "$(cat "$1/.complete" 2>/dev/null)" = "$2" ]; }

# build WHAT OUTDIR STAMP CMD...: run CMD (which writes into OUTDIR) unless OUTDIR is complete.
build() {
  local what=$1 out=$2 stamp=$3 start=$SECONDS; shift 3
  built "$out" "$stamp" && return 0
  rm -rf "$out" && mkdir -p "$out"
  spin "building $what" "$@" || die "building $what failed"
  echo "$stamp" >"$out/.complete"
  ok "built $what in $((SECONDS - start))s"
}

# go_install WHAT OUTDIR LDFLAGS TAGS PACKAGE@VERSION...: `go install` into OUTDIR, static.
go_install() {
  local what=$1 out=$2 ld=$3 tags=$4; shift 4
  need_go
  build "$what" "$out" "$(fingerprint_of "$ld" "$tags" "$@")" \
    env GOBIN="$out" CGO_ENABLED=0 go install -trimpath -tags "$tags" -ldflags "-s -w $ld" "$@"
}

image_label() { docker image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# Binaries
# ---------------------------------------------------------------------------------------------

build_kind() {
  go_install "kind $MERIDIAN_KIND_VERSION" "$KIND_BIN" "" "" "sigs.k8s.io/kind@$MERIDIAN_KIND_VERSION"
}

# gen_k8s_module VERSION DIR: the wrapper module for k8s.io/kubernetes@VERSION with the node's
# binaries as tools: k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them
# with ./staging/src/..., which resolves only inside its repository, so each is replaced with
# its published v0.<minor>.<patch> (as dev/deps/kube.sh does), then `go mod tidy`.
gen_k8s_module() {
  local v=$1 dir=$2 kmod staging b
  staging=v0.${v#v*.}
  kmod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$kmod" ] || die "could not download k8s.io/kubernetes@$v"
  mkdir -p "$dir"
  {
    cat <<EOF
// Wrapper module that builds the Kubernetes binaries of the kind node image (the node's and the
// control plane's) from the published k8s.io/kubernetes module, whose staging modules are
// replaced with their published releases. Built by dev/kind/node-image.sh; regenerate with
// \`MERIDIAN_K8S_VERSION=vX.Y.Z dev/kind/node-image.sh module\`.
module meridian.local/dev/kind/k8s

EOF
    grep -E '^(go|godebug) ' "$kmod"
    printf '\ntool (\n'
    for b in "${KUBE_BINARIES[@]}"; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$b"; done
    printf ')\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
    awk -v s="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, s }' "$kmod"
    printf ')\n'
  } >"$dir/go.mod"
  rm -f "$dir/go.sum"
  go -C "$dir" mod tidy
}

# k8s_module: the committed wrapper (dev/kind/k8s) when it is for $MERIDIAN_K8S_VERSION, else
# one generated once in the cache.
k8s_module() {
  local dir=$KIND_SRC/k8s
  if grep -q "k8s.io/kubernetes $MERIDIAN_K8S_VERSION\b" "$dir/go.mod" 2>/dev/null; then echo "$dir"; return; fi
  dir=$CACHE/kube/$MERIDIAN_K8S_VERSION/module
  if [ ! -f "$dir/.complete" ]; then
    need_go
    spin "generating the wrapper module for Kubernetes $MERIDIAN_K8S_VERSION" \
      gen_k8s_module "$MERIDIAN_K8S_VERSION" "$dir" >&2 || die "module generation failed"
    touch "$dir/.complete"
  fi
  echo "$dir"
}

build_kubernetes() {
  local mod stamp ld p date pkgs=() b
  mod=$(k8s_module)
  stamp=$(fingerprint "$mod/go.mod" "$mod/go.sum")
  built "$KUBE_BIN" "$stamp" && return 0
  need_go
  # As dev/deps/kube.sh: the module's release date stands in for the build date.
  date=$(go -C "$mod" list -m -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Time": "\(.*\)",*$/\1/p')
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$MERIDIAN_K8S_VERSION -X $p.gitMajor=$K8S_MAJOR -X $p.gitMinor=$K8S_MINOR"
    ld+=" -X $p.gitCommit= -X $p.gitTreeState=clean -X $p.buildDate=${date:-1970-01-01T00:00:00Z}"
  done
  for b in "${KUBE_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  # One invocation, so that the packages the binaries share are compiled once.
  build "Kubernetes $MERIDIAN_K8S_VERSION (${KUBE_BINARIES[*]})" "$KUBE_BIN" "$stamp" \
    env CGO_ENABLED=0 go -C "$mod" build -mod=readonly -trimpath -ldflags "$ld" -o "$KUBE_BIN/" "${pkgs[@]}"
}

# etcd: the binary of dev/deps/kube.sh when it has built it (any build of this version will
# do), else built the same way (its wrapper module dev/k8s/build-etcd, or e2e/k8s/build-etcd
# before the move) into the same place.
build_etcd() {
  local mod
  [ -f "$ETCD_BIN/.complete" ] && [ -x "$ETCD_BIN/etcd" ] && return 0
  for mod in "$REPO_ROOT/dev/k8s/build-etcd" "$REPO_ROOT/e2e/k8s/build-etcd" ""; do
    grep -q "go.etcd.io/etcd/server/v3 $MERIDIAN_ETCD_VERSION\b" "$mod/go.mod" 2>/dev/null && break
  done
  [ -n "$mod" ] || die "no wrapper module for etcd $MERIDIAN_ETCD_VERSION: run dev/deps/kube.sh up once"
  need_go
  build "etcd $MERIDIAN_ETCD_VERSION" "$ETCD_BIN" "$(fingerprint "$mod/go.mod" "$mod/go.sum")" \
    env CGO_ENABLED=0 go -C "$mod" build -mod=readonly -trimpath -ldflags "-s -w" -o "$ETCD_BIN/etcd" go.etcd.io/etcd/server/v3
}

build_containerd() {
  local v=$MERIDIAN_CONTAINERD_VERSION p=github.com/containerd/containerd/v2
  go_install "containerd $v" "$CONTAINERD_BIN" \
    "-X $p/version.Version=$v -X $p/version.Revision= -X $p/version.Package=$p" \
    "urfave_cli_no_docs no_btrfs no_devmapper no_zfs" \
    "$p/cmd/containerd@$v" "$p/cmd/containerd-shim-runc-v2@$v" "$p/cmd/ctr@$v"
}

# runc needs cgo for seccomp: linked statically against Debian's libseccomp.
build_runc() {
  local v=$MERIDIAN_RUNC_VERSION ld
  ld="-s -w -X main.version=${v#v} -X main.gitCommit= -extldflags -static"
  apt_install gcc libc6-dev pkg-config libseccomp-dev
  need_go
  build "runc $v" "$RUNC_BIN" "$(fingerprint_of "$v" "$ld")" \
    env GOBIN="$RUNC_BIN" CGO_ENABLED=1 go install -trimpath -tags "seccomp urfave_cli_no_docs netgo osusergo" \
    -ldflags "$ld" "github.com/opencontainers/runc@$v"
}

build_crictl() {
  local v=$MERIDIAN_CRICTL_VERSION
  go_install "crictl $v" "$CRICTL_BIN" "-X sigs.k8s.io/cri-tools/pkg/version.Version=${v#v}" "" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$v"
}

build_cni() {
  local v=$MERIDIAN_CNI_PLUGINS_VERSION p pkgs=()
  for p in "${CNI_PLUGINS[@]}"; do pkgs+=("github.com/containernetworking/plugins/plugins/$p@$v"); done
  go_install "CNI plugins $v (${CNI_PLUGINS[*]##*/})" "$CNI_BIN" \
    "-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$v" "" "${pkgs[@]}"
}

build_coredns() {
  go_install "CoreDNS $1" "$CACHE/coredns/$1/bin" "" "" "github.com/coredns/coredns@$1"
}

# build_pause VERSION: the sandbox container's binary, from the Kubernetes module's source.
build_pause() {
  local v=$1 out=$CACHE/pause/$1/bin src
  src=$(go mod download -json "k8s.io/kubernetes@$MERIDIAN_K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  src=$src/build/pause/linux/pause.c
  [ -f "$src" ] || die "no $src"
  apt_install gcc libc6-dev
  build "pause $v" "$out" "$(fingerprint "$src")" \
    gcc -Os -Wall -Werror -static -s "-DVERSION=v$v-meridian" -o "$out/pause" "$src"
}

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

# rootfs_image: the node's Debian root file system (debootstrap, then `docker import`), without
# the package cache, lists and documentation. Prints its reference.
rootfs_image() {
  local fp ref rootfs tarball
  fp=$(fingerprint_of "$MERIDIAN_DEBIAN_RELEASE" "$MERIDIAN_DEBIAN_MIRROR" "${NODE_PACKAGES[@]}" | cut -c1-12)
  ref="meridian/kind-rootfs:$MERIDIAN_DEBIAN_RELEASE-$fp"
  docker image inspect "$ref" >/dev/null 2>&1 && { echo "$ref"; return; }
  tarball=$CACHE/rootfs/$MERIDIAN_DEBIAN_RELEASE-$fp.tar
  if [ ! -s "$tarball" ]; then
    apt_install debootstrap >&2
    mkdir -p "$CACHE/rootfs"
    rootfs=$(mktemp -d "$CACHE/rootfs/tree.XXXXXX")
    local packages
    packages=$(IFS=,; echo "${NODE_PACKAGES[*]}")
    spin "debootstrap $MERIDIAN_DEBIAN_RELEASE (minbase, $packages)" as_root debootstrap --variant=minbase \
      --include="$packages" "$MERIDIAN_DEBIAN_RELEASE" "$rootfs" "$MERIDIAN_DEBIAN_MIRROR" >&2 ||
      die "debootstrap failed"
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
      "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
    as_root tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    as_root rm -rf "$rootfs"
    mv "$tarball.tmp" "$tarball"
  fi
  docker import "$tarball" "$ref" >/dev/null
  echo "$ref"
}

# The files every FROM-scratch component image gets: a passwd/group for nobody and root, a
# world-writable /tmp, CA certificates.
static_base() {
  local ctx=$1
  mkdir -p "$ctx/base/etc/ssl/certs" "$ctx/base/tmp"
  chmod 1777 "$ctx/base/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$ctx/base/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/base/etc/group"
  echo 'hosts: files dns' >"$ctx/base/etc/nsswitch.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/base/etc/ssl/certs/" 2>/dev/null || true
}

# component_images ROOTFS OUT.tar: build the images kubeadm runs, tagged as
# `kubeadm config images list` names them, and `docker save` them into OUT.tar.
component_images() {
  local rootfs=$1 out=$2 ctx refs=() ref name tag bin
  ctx=$(mktemp -d "$CACHE/images-ctx.XXXXXX")
  static_base "$ctx"
  while read -r ref; do
    name=${ref%:*}; name=${name##*/}; tag=${ref##*:}
    mkdir -p "$ctx/$name/bin"
    case $name in
      kube-apiserver | kube-controller-manager | kube-scheduler) bin=$KUBE_BIN/$name ;;
      kube-proxy) bin=$KUBE_BIN/kube-proxy ;;
      etcd) bin=$ETCD_BIN/etcd ;;
      coredns) bin=$CACHE/coredns/$tag/bin/coredns ;;
      pause) bin=$CACHE/pause/$tag/bin/pause ;;
      *) die "no recipe for the image $ref" ;;
    esac
    cp "$bin" "$ctx/$name/bin/"
    cp -a "$ctx/base" "$ctx/$name/base"
    case $name in
      kube-proxy)
        cp "$KIND_SRC/images/kube-proxy/Dockerfile" "$KIND_SRC/images/kube-proxy/kube-proxy-iptables" \
          "$KIND_SRC/images/kube-proxy/collect-iptables" "$ctx/$name/"
        spin "image $ref" docker build --quiet --build-arg "ROOTFS=$rootfs" -t "$ref" "$ctx/$name" ||
          die "building $ref failed"
        ;;
      *)
        local entry=''
        case $name in
          coredns) entry='ENTRYPOINT ["/usr/local/bin/coredns"]' ;;
          pause) entry='ENTRYPOINT ["/usr/local/bin/pause"]' ;;
          etcd) entry='CMD ["/usr/local/bin/etcd"]' ;;
        esac
        printf '%s\n' 'FROM scratch' 'COPY base/ /' 'COPY bin/ /usr/local/bin/' \
          'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$entry" >"$ctx/$name/Dockerfile"
        spin "image $ref" docker build --quiet -t "$ref" "$ctx/$name" || die "building $ref failed"
        ;;
    esac
    refs+=("$ref")
  done < <("$KUBE_BIN/kubeadm" config images list --kubernetes-version "$MERIDIAN_K8S_VERSION")
  spin "docker save (${#refs[@]} images)" docker save -o "$out.tmp" "${refs[@]}" || die "docker save failed"
  mv "$out.tmp" "$out"
  # They live on in $out and in the node image; keep the host's image list clean.
  docker rmi "${refs[@]}" >/dev/null
  rm -rf "$ctx"
}

# node_image: the node image, unless one with the same fingerprint exists.
node_image() {
  local rootfs fp ctx images_tar cid coredns_tag pause_tag previous start=$SECONDS
  rootfs=$(rootfs_image)
  ok "root file system $rootfs"
  coredns_tag=$("$KUBE_BIN/kubeadm" config images list --kubernetes-version "$MERIDIAN_K8S_VERSION" | sed -n 's|.*/coredns:||p')
  pause_tag=$("$KUBE_BIN/kubeadm" config images list --kubernetes-version "$MERIDIAN_K8S_VERSION" | sed -n 's|.*/pause:||p')
  if [ -z "$coredns_tag" ] || [ -z "$pause_tag" ]; then die "kubeadm names no coredns or pause image"; fi
  build_coredns "$coredns_tag"
  build_pause "$pause_tag"

  # Inputs: the binaries' build stamps, the root file system, this script and the node files.
  fp=$( {
    echo "$rootfs $MERIDIAN_KIND_NODE_IMAGE $coredns_tag $pause_tag"
    cat "$KUBE_BIN/.complete" "$ETCD_BIN/.complete" "$CONTAINERD_BIN/.complete" "$RUNC_BIN/.complete" \
      "$CRICTL_BIN/.complete" "$CNI_BIN/.complete" "$CACHE/coredns/$coredns_tag/bin/.complete" \
      "$CACHE/pause/$pause_tag/bin/.complete" "${BASH_SOURCE[0]}"
    (cd "$KIND_SRC" && find node images -type f | LC_ALL=C sort | xargs sha256sum)
  } | sha256sum | cut -c1-16)
  if [ "$(image_label "$MERIDIAN_KIND_NODE_IMAGE" meridian.fingerprint)" = "$fp" ]; then
    ok "node image $MERIDIAN_KIND_NODE_IMAGE up to date ($fp)"
    return 0
  fi

  images_tar=$CACHE/images/$fp.tar
  if [ ! -s "$images_tar" ]; then
    mkdir -p "$CACHE/images"
    find "$CACHE/images" -name '*.tar' -delete   # those of earlier inputs
    component_images "$rootfs" "$images_tar"
  fi
  ok "component images $(du -h "$images_tar" | cut -f1) ($images_tar)"

  # The file tree added to the root file system: the binaries and dev/kind/node.
  ctx=$(mktemp -d "$CACHE/node-ctx.XXXXXX")
  mkdir -p "$ctx/tree/usr/bin" "$ctx/tree/usr/local/bin" "$ctx/tree/usr/local/sbin" "$ctx/tree/opt/cni/bin"
  cp -a "$KIND_SRC/node/." "$ctx/tree/"
  cp "$KUBE_BIN/kubelet" "$KUBE_BIN/kubeadm" "$KUBE_BIN/kubectl" "$ctx/tree/usr/bin/"
  cp "$CONTAINERD_BIN"/{containerd,containerd-shim-runc-v2,ctr} "$CRICTL_BIN/crictl" "$ctx/tree/usr/local/bin/"
  cp "$RUNC_BIN/runc" "$ctx/tree/usr/local/sbin/"
  cp "$CNI_BIN"/{ptp,host-local,portmap,loopback} "$ctx/tree/opt/cni/bin/"
  echo "$MERIDIAN_K8S_VERSION" >"$ctx/tree/kind/version"
  # containerd's default OCI spec minus its RLIMIT_NOFILE of 1024: pods inherit the node's.
  "$CONTAINERD_BIN/ctr" oci spec | jq 'del(.process.rlimits)' >"$ctx/tree/etc/containerd/cri-base.json"
  sed -i "s|@PAUSE_IMAGE@|$("$KUBE_BIN/kubeadm" config images list --kubernetes-version "$MERIDIAN_K8S_VERSION" | grep /pause:)|" \
    "$ctx/tree/etc/containerd/config.toml"
  cp "$KIND_SRC/images/node/Dockerfile" "$ctx/"
  spin "node image base" docker build --quiet --build-arg "ROOTFS=$rootfs" -t "meridian/kind-node-build:$fp" "$ctx" ||
    die "building the node image base failed"
  rm -rf "$ctx"

  # Import the component images into the node's containerd (k8s.io namespace), as kind does:
  # pinned (never garbage-collected by the kubelet), not unpacked (the CRI plugin unpacks them
  # on first use), then commit. /run is a tmpfs, so containerd's runtime state is not kept.
  cid=$(docker run -d --tmpfs /run --tmpfs /tmp -v "$images_tar:/kind/images.tar:ro" \
    --entrypoint /bin/sleep "meridian/kind-node-build:$fp" infinity)
  # shellcheck disable=SC2064 # expand now: the id is known
  trap "docker rm -f $cid >/dev/null 2>&1; docker rmi meridian/kind-node-build:$fp >/dev/null 2>&1 || true" EXIT
  docker exec "$cid" bash -c 'containerd >/tmp/containerd.log 2>&1 &' ||
    die "could not start containerd in the build container"
  local i
  for ((i = 0; i < 60; i++)); do docker exec "$cid" ctr version >/dev/null 2>&1 && break; sleep 0.5; done
  spin "importing the component images into the node's containerd" docker exec "$cid" \
    ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned --all-platforms \
    --no-unpack /kind/images.tar || die "ctr import failed"
  docker exec "$cid" ctr --namespace=k8s.io images list -q | grep -v '^sha256:' | sed 's/^/        /'
  docker exec "$cid" bash -c 'kill $(pidof containerd) && while pidof containerd >/dev/null; do sleep 0.2; done'
  previous=$(docker image inspect --format '{{.Id}}' "$MERIDIAN_KIND_NODE_IMAGE" 2>/dev/null || true)
  docker commit \
    --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
    --change 'CMD []' \
    --change "LABEL meridian.fingerprint=$fp" \
    "$cid" "$MERIDIAN_KIND_NODE_IMAGE" >/dev/null
  docker rm -f "$cid" >/dev/null
  trap - EXIT
  docker rmi "meridian/kind-node-build:$fp" >/dev/null
  # The image this one replaces, unless a container (a running cluster) still uses it.
  if [ -n "$previous" ]; then docker rmi "$previous" >/dev/null 2>&1 || true; fi
  ok "node image $MERIDIAN_KIND_NODE_IMAGE ($fp, $(docker image inspect --format '{{.Size}}' "$MERIDIAN_KIND_NODE_IMAGE" | numfmt --to=iec)) in $((SECONDS - start))s"
}

build_binaries() {
  build_kind
  build_kubernetes
  build_etcd
  build_containerd
  build_runc
  build_crictl
  build_cni
}

build_all() {
  step "kind $MERIDIAN_KIND_VERSION and node image $MERIDIAN_KIND_NODE_IMAGE (Kubernetes $MERIDIAN_K8S_VERSION, containerd $MERIDIAN_CONTAINERD_VERSION, runc $MERIDIAN_RUNC_VERSION)"
  command -v docker >/dev/null || die "docker not found"
  command -v jq >/dev/null || apt_install jq
  mkdir -p "$CACHE"
  build_binaries
  node_image
}

case "${1:-build}" in
  build) build_all ;;
  kind) build_kind >&2; echo "$KIND_BIN/kind" ;;
  ref) echo "$MERIDIAN_KIND_NODE_IMAGE" ;;
  binaries) mkdir -p "$CACHE"; build_binaries ;;
  rootfs) mkdir -p "$CACHE"; rootfs_image ;;
  module) need_go; gen_k8s_module "$MERIDIAN_K8S_VERSION" "$KIND_SRC/k8s" ;;
  *) die "usage: $0 [build|kind|ref|binaries|rootfs|module]" ;;
esac
