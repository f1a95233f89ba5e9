#!/usr/bin/env bash
# Builds every image of the platform here, from the repository's Dockerfile, pulling nothing
# from a registry (`just images`):
#   meridian/debian:<release>-<fp>    the Debian base of every image: debootstrap, then
#                                     `docker import` (cached by release and mirror)
#   meridian/<service>:<version>      api-gateway command-service processor cache-updater
#                                     ws-hub operator: release binaries built on this host,
#                                     copied into the Dockerfile's `runtime` stage
#   meridian/<dependency>:<version>   redis postgres kafka: the kind e2e's dependencies, from
#                                     Debian's packages and Kafka's jars on Maven Central
# <version> is the workspace's version (Cargo.toml). Prints each image's size at the end.
#
#   dev/images.sh [build]   build all (idempotent: unchanged inputs are cache hits)
#   dev/images.sh list      print the image references, one a line
#   dev/images.sh base      print the base image reference (building it when missing)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${MERIDIAN_DEBIAN_RELEASE:=bookworm}"
: "${MERIDIAN_DEBIAN_MIRROR:=http://deb.debian.org/debian}"
: "${CARGO_TARGET_DIR:=$MERIDIAN_CACHE_DIR/target}"
export CARGO_TARGET_DIR
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/Cargo.toml" | head -n 1)
IMAGES_CACHE=$MERIDIAN_CACHE_DIR/images
# Cargo package and binary of each product image.
declare -A BINARY=(
  [api-gateway]=api-gateway [command-service]=command-service [processor]=processor
  [cache-updater]=cache-updater [ws-hub]=ws-hub [operator]=meridian-operator
)
PRODUCT=(api-gateway command-service processor cache-updater ws-hub operator)
DEPENDENCIES=(redis postgres kafka)

export DOCKER_BUILDKIT=1
# BuildKit through the buildx CLI plugin where it is installed, else through the engine's own
# client: Debian's docker.io has BuildKit in the engine but ships no buildx plugin.
if docker buildx version >/dev/null 2>&1 || [ ! -x /usr/bin/docker ]; then DOCKER=docker; else DOCKER=/usr/bin/docker; fi

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The base image: a minimal Debian root filesystem, without the package cache, lists and
# documentation, as the distribution's own slim images are.
base_image() {
  local fp ref rootfs tarball
  fp=$(printf '%s %s v1' "$MERIDIAN_DEBIAN_RELEASE" "$MERIDIAN_DEBIAN_MIRROR" | sha256sum | cut -c1-12)
  ref="meridian/debian:$MERIDIAN_DEBIAN_RELEASE-$fp"
  image_exists "$ref" && { echo "$ref"; return; }
  tarball=$IMAGES_CACHE/debian-$MERIDIAN_DEBIAN_RELEASE-$fp.tar
  if [ ! -s "$tarball" ]; then
    apt_install debootstrap >&2
    rootfs=$(mktemp -d "$IMAGES_CACHE/rootfs.XXXXXX")
    spin "debootstrap $MERIDIAN_DEBIAN_RELEASE (minbase)" as_root debootstrap --variant=minbase \
      "$MERIDIAN_DEBIAN_RELEASE" "$rootfs" "$MERIDIAN_DEBIAN_MIRROR" >&2 || die "debootstrap failed"
    cat >"$rootfs/etc/apt/sources.list" <<LIST
deb $MERIDIAN_DEBIAN_MIRROR $MERIDIAN_DEBIAN_RELEASE main
deb $MERIDIAN_DEBIAN_MIRROR $MERIDIAN_DEBIAN_RELEASE-updates main
deb http://deb.debian.org/debian-security $MERIDIAN_DEBIAN_RELEASE-security main
LIST
    # What the distribution's slim images leave out.
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    as_root tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
    as_root rm -rf "$rootfs"
    mv "$tarball.tmp" "$tarball"
  fi
  docker import --change 'CMD ["bash"]' "$tarball" "$ref" >/dev/null
  echo "$ref"
}

# The label of every image built here: what `prune` may remove once a rebuild replaced it.
LABEL=dev.meridian.built-by=images.sh

# build TARGET REF CONTEXT [--build-arg ...]
build() {
  local target=$1 ref=$2 context=$3; shift 3
  spin "image $ref" "$DOCKER" build --target "$target" --tag "$ref" --label "$LABEL" \
    --build-arg "DEBIAN_IMAGE=$BASE" "$@" --file "$REPO_ROOT/Dockerfile" "$context" ||
    die "building $ref failed"
}

build_all() {
  local name context
  step "images $VERSION (no registry: a local Debian base, host-built binaries)"
  mkdir -p "$IMAGES_CACHE"
  BASE=$(base_image)
  ok "base $BASE"

  local bins=()
  for name in "${PRODUCT[@]}"; do bins+=(--bin "${BINARY[$name]}"); done
  spin "cargo build --release (${#PRODUCT[@]} binaries)" \
    cargo build --release --locked "${bins[@]}" || die "release build failed"

  # The build context: the binaries, Kafka's jars and the files the dependency images take
  # from the repository (hard links where the file system allows, copies otherwise).
  context=$IMAGES_CACHE/context
  libs=$(bash "$REPO_ROOT/dev/deps/kafka.sh" libs) || die "could not fetch Kafka's jars"
  rm -rf "$context" && mkdir -p "$context/bin" "$context/dev"
  for name in "${PRODUCT[@]}"; do
    cp "$CARGO_TARGET_DIR/release/${BINARY[$name]}" "$context/bin/"
  done
  cp -al "$libs" "$context/kafka-libs" 2>/dev/null || cp -a "$libs" "$context/kafka-libs"
  cp -a "$REPO_ROOT/dev/images" "$REPO_ROOT/dev/kafka" "$context/dev/"
  for name in "${PRODUCT[@]}"; do
    build runtime "meridian/$name:$VERSION" "$context" --build-arg APP_FROM=prebuilt \
      --build-arg "PACKAGE=$name" --build-arg "BINARY=${BINARY[$name]}"
  done
  for name in "${DEPENDENCIES[@]}"; do
    build "$name" "meridian/$name:$VERSION" "$context"
  done
  # A rebuild leaves the image it replaced untagged: remove those, not to fill the disk.
  docker image prune --force --filter "label=$LABEL" >/dev/null
  docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep "^meridian/" | grep ":$VERSION\b" |
    sort | while IFS=$'\t' read -r ref size; do printf '    %-40s %s\n' "$ref" "$size"; done
}

case "${1:-build}" in
  build) build_all ;;
  list) for name in "${PRODUCT[@]}" "${DEPENDENCIES[@]}"; do echo "meridian/$name:$VERSION"; done ;;
  base) mkdir -p "$IMAGES_CACHE"; base_image ;;
  *) die "usage: $0 [build|list|base]" ;;
esac
