#!/usr/bin/env bash
# Installs what building the Rust workspace needs beyond the Rust toolchain: a C toolchain,
# CMake and the headers librdkafka (bundled by rdkafka-sys) compiles against. Idempotent.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"
apt_install build-essential cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev
ok "build dependencies present"
