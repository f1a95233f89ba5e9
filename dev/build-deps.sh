#!/usr/bin/env bash
# Installs what building the Rust workspace needs beyond the Rust toolchain: a C toolchain,
# CMake and the headers librdkafka (bundled by rdkafka-sys) compiles against. Idempotent.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"
# The toolchain rust-toolchain.toml pins: installed by rustup, or, where rustup cannot download
# it, the installed stable toolchain linked under its name when it is that very release.
if command -v rustup >/dev/null; then
  pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$REPO_ROOT/rust-toolchain.toml")
  if ! rustup toolchain list | grep -q "^$pinned-"; then
    step "installing Rust $pinned (rust-toolchain.toml)"
    if ! rustup toolchain install "$pinned" --profile minimal -c rustfmt -c clippy; then
      stable=$(cd / && rustup run stable rustc --version 2>/dev/null | cut -d' ' -f2)
      [ "$stable" = "$pinned" ] ||
        die "Rust $pinned (rust-toolchain.toml) could not be installed, and the stable toolchain is ${stable:-missing}"
      rustup toolchain link "$pinned" "$(cd / && rustup run stable rustc --print sysroot)"
      warn "rustup could not download Rust $pinned: linked the installed stable toolchain, which is $pinned"
    fi
  fi
fi
apt_install build-essential cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev
ok "build dependencies present"
