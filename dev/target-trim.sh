#!/usr/bin/env bash
# Keeps the shared Cargo target directory within a size budget and makes sure a build has room
# before it starts. Run by `just build` and `just test` (as `just target-trim`).
#
# The target directory lives outside the checkout ($CARGO_TARGET_DIR, default
# $MERIDIAN_CACHE_DIR/target) so that fresh clones reuse compilation. Cargo never deletes old
# artifacts: every change to the dependency graph, the profile or the flags leaves a new set
# behind (1–2 GiB for this workspace), and rustc's incremental caches grow with every edit.
# Left alone it reached 69 GiB and a CI run failed with "No space left on device" while linking.
#
#   1. incremental caches bigger than MERIDIAN_INCREMENTAL_MAX_GIB (default 4) are deleted —
#      they only speed up rebuilds after edits;
#   2. cargo-sweep removes the least recently used artifacts until the rest fits in
#      MERIDIAN_TARGET_MAX_GIB (default 24: a checkout and CI's work tree, each built in the
#      check, debug/test and release profiles, take about 16 GiB; at 16 the sweep removed the
#      release dependencies every other run and their rebuild cost 15 minutes);
#   3. when the file system still has less than MERIDIAN_TARGET_WIPE_FREE_GIB (default 10)
#      free, every artifact goes; when even then less than MERIDIAN_BUILD_FREE_MIN_GIB
#      (default 6: a build and test run from nothing takes ~5.5 GiB) is free, stop now with a
#      message saying so rather than fail in the middle of a link.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${CARGO_TARGET_DIR:=$MERIDIAN_CACHE_DIR/target}"
: "${MERIDIAN_INCREMENTAL_MAX_GIB:=4}"
: "${MERIDIAN_TARGET_MAX_GIB:=24}"
: "${MERIDIAN_TARGET_WIPE_FREE_GIB:=10}"
: "${MERIDIAN_BUILD_FREE_MIN_GIB:=6}"
export CARGO_TARGET_DIR

GIB=$((1024 * 1024)) # in KiB, the unit of du -k and df -k

# size_kib PATH...: disk usage of the paths that exist, in KiB.
size_kib() {
  local paths=() p
  for p in "$@"; do [ -e "$p" ] && paths+=("$p"); done
  [ ${#paths[@]} -eq 0 ] && { echo 0; return; }
  du -skc "${paths[@]}" | awk 'END { print $1 }'
}

# free_kib: space available to us on the target directory's file system, in KiB.
free_kib() { df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { print $4 }'; }

gib() { awk -v k="$1" 'BEGIN { printf "%.1f GiB", k / 1048576 }'; }

mkdir -p "$CARGO_TARGET_DIR"
step "target directory $CARGO_TARGET_DIR: $(gib "$(size_kib "$CARGO_TARGET_DIR")"), $(gib "$(free_kib)") free"

shopt -s nullglob
incremental=("$CARGO_TARGET_DIR"/*/incremental)
if [ "$(size_kib "${incremental[@]}")" -gt $((MERIDIAN_INCREMENTAL_MAX_GIB * GIB)) ]; then
  rm -rf "${incremental[@]}"
  ok "incremental caches over ${MERIDIAN_INCREMENTAL_MAX_GIB} GiB: deleted"
fi

bash "$DEV_DIR/tools.sh" install cargo-sweep >/dev/null
sweep=$(bash "$DEV_DIR/tools.sh" path cargo-sweep)
(cd "$REPO_ROOT" && "$sweep" sweep --maxsize "${MERIDIAN_TARGET_MAX_GIB}GiB" >/dev/null) ||
  die "cargo-sweep could not trim $CARGO_TARGET_DIR"

if [ "$(free_kib)" -lt $((MERIDIAN_TARGET_WIPE_FREE_GIB * GIB)) ]; then
  warn "less than ${MERIDIAN_TARGET_WIPE_FREE_GIB} GiB free: deleting every artifact in $CARGO_TARGET_DIR"
  rm -rf "${CARGO_TARGET_DIR:?}"/*
fi
free=$(free_kib)
[ "$free" -ge $((MERIDIAN_BUILD_FREE_MIN_GIB * GIB)) ] ||
  die "only $(gib "$free") free on the file system of $CARGO_TARGET_DIR; building and testing the" \
    "workspace needs about ${MERIDIAN_BUILD_FREE_MIN_GIB} GiB. Free some space, or point" \
    "CARGO_TARGET_DIR at a larger disk."
ok "target directory: $(gib "$(size_kib "$CARGO_TARGET_DIR")") (budget ${MERIDIAN_TARGET_MAX_GIB} GiB), $(gib "$free") free"
