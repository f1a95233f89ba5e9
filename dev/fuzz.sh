#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time (cargo-fuzz, libFuzzer, the nightly
# toolchain rustup already has). The checked-in corpus (fuzz/corpus/<target>) seeds each run
# and is never written; new inputs go to a scratch directory, and a crash fails the run with
# the input that caused it saved under $MERIDIAN_LOG_DIR/fuzz/.
# Usage: dev/fuzz.sh [seconds per target, default 60] [target...]
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(command_body idempotency_key hub_frame route_table jwt)
# Built once per version of the code, outside the checkout (the nightly, instrumented build of
# the services' dependencies takes several minutes the first time).
FUZZ_TARGET_DIR=$MERIDIAN_CACHE_DIR/fuzz-target
ARTIFACTS=$MERIDIAN_LOG_DIR/fuzz
mkdir -p "$ARTIFACTS"

# libFuzzer's instrumentation needs the nightly compiler.
if ! rustup toolchain list | grep -q '^nightly'; then
  step "installing the nightly toolchain (rustup)"
  rustup toolchain install nightly --profile minimal ||
    die "the nightly toolchain is missing and could not be installed (rustup toolchain install nightly)"
fi
bash "$ROOT/dev/tools.sh" install cargo-fuzz
cargo_fuzz=$(bash "$ROOT/dev/tools.sh" path cargo-fuzz)

cd "$ROOT/fuzz"
for target in "${TARGETS[@]}"; do
  [ -f "fuzz_targets/$target.rs" ] || die "no fuzz target $target"
done
step "building the fuzz targets (nightly, address sanitizer)"
# cargo-fuzz calls cargo, which takes the toolchain from RUSTUP_TOOLCHAIN.
export RUSTUP_TOOLCHAIN=nightly
if ! "$cargo_fuzz" fuzz build --target-dir "$FUZZ_TARGET_DIR" >"$ARTIFACTS/build.log" 2>&1; then
  tail -30 "$ARTIFACTS/build.log" >&2
  die "the fuzz targets do not build (log: $ARTIFACTS/build.log)"
fi
ok "built"

failed=()
for target in "${TARGETS[@]}"; do
  step "fuzzing $target for ${SECONDS_PER_TARGET}s"
  scratch=$(mktemp -d)
  if "$cargo_fuzz" fuzz run --target-dir "$FUZZ_TARGET_DIR" "$target" \
    "$scratch" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -artifact_prefix="$ARTIFACTS/$target-" \
    -print_final_stats=1 >"$ARTIFACTS/$target.log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$ARTIFACTS/$target.log" | tail -1)
    ok "$target: ${runs:-?} inputs, no crash"
  else
    warn "$target failed: see $ARTIFACTS/$target.log and $ARTIFACTS/$target-*"
    tail -20 "$ARTIFACTS/$target.log" >&2
    failed+=("$target")
  fi
  rm -rf "$scratch"
done
[ ${#failed[@]} -eq 0 ] || die "fuzz targets failed: ${failed[*]}"
ok "every fuzz target ran ${SECONDS_PER_TARGET}s without a crash"
