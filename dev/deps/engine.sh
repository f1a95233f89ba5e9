#!/usr/bin/env bash
# The Docker engine, from Debian's docker.io package: images (`just images`) and the kind e2e
# need it. Idempotent.
#
#   deps/engine.sh up       install (docker.io, jq), configure, start dockerd, wait for it
#   deps/engine.sh down     stop the dockerd this script started (containers stop with it)
#   deps/engine.sh status   one line: version, storage driver, cgroup version, runtime
#
# Hosts whose capability bounding set lacks CAP_SYS_RESOURCE (nested container hosts, some
# sandboxes) cannot start privileged containers with plain runc: Docker asks for every
# capability it knows and runc fails with "unable to apply caps: operation not permitted".
# On such a host, and only there, the engine's default runtime becomes `meridian-runc`
# (dev/engine/runc-wrapper), which drops that one capability from each container's spec
# before running the real runc. Everything else is Debian's engine as packaged.
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

DAEMON_JSON=/etc/docker/daemon.json
WRAPPER=/usr/local/libexec/meridian/runc
WRAPPER_SRC="$REPO_ROOT/dev/engine/runc-wrapper"
NAME=dockerd

engine_up() { as_root docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# CAP_SYS_RESOURCE is bit 24 of the bounding set.
lacks_sys_resource() {
  local bnd
  bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  (( (16#$bnd >> 24 & 1) == 0 ))
}

configure() {
  local want
  as_root mkdir -p /etc/docker
  [ -s "$DAEMON_JSON" ] || echo '{}' | as_root tee "$DAEMON_JSON" >/dev/null
  if lacks_sys_resource; then
    as_root install -D -m 0755 "$WRAPPER_SRC" "$WRAPPER"
    want=$(jq --arg w "$WRAPPER" '.runtimes["meridian-runc"] = {path: $w} | ."default-runtime" = "meridian-runc"' "$DAEMON_JSON")
  else
    want=$(jq 'del(.runtimes["meridian-runc"]) | if ."default-runtime" == "meridian-runc" then del(."default-runtime") else . end' "$DAEMON_JSON")
  fi
  if [ "$want" != "$(jq . "$DAEMON_JSON")" ]; then
    echo "$want" | as_root tee "$DAEMON_JSON" >/dev/null
    ok "wrote $DAEMON_JSON"
    if engine_up; then restart; fi
  fi
}

start() {
  engine_up && return 0
  if [ -d /run/systemd/system ]; then
    as_root systemctl start docker
  else
    # No systemd (a container or a minimal VM): run dockerd as a background process; it starts
    # and supervises its own containerd.
    if [ "$(id -u)" = 0 ]; then start_bg "$NAME" dockerd; else start_bg "$NAME" sudo dockerd; fi
  fi
  wait_for "$NAME" 60 engine_up || die "the Docker engine did not start"
}

stop() {
  if [ -d /run/systemd/system ]; then as_root systemctl stop docker docker.socket; else stop_bg "$NAME" 30; fi
}

restart() { stop; start; }

status() {
  if engine_up; then
    printf 'engine:     up (%s)\n' \
      "$(as_root docker info --format 'dockerd {{.ServerVersion}}, {{.Driver}}, cgroup v{{.CgroupVersion}}, runtime {{.DefaultRuntime}}' 2>/dev/null)"
  else
    echo "engine:     down"; return 1
  fi
}

case "${1:-status}" in
  up)
    step "Docker engine"
    # An engine that is up and needs no runtime change is used as it is (Docker CE on a CI
    # runner, say): installing docker.io beside it would conflict.
    if engine_up && ! lacks_sys_resource; then ok "$(status)"; exit 0; fi
    apt_install docker.io jq
    configure
    start
    ok "$(status)"
    ;;
  down) stop ;;
  status) status ;;
  *) die "usage: $0 up|down|status" ;;
esac
