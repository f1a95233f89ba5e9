#!/usr/bin/env bash
# Runs a command and restarts it whenever it exits, as the kubelet restarts a pod's container:
# after 1 s, doubling up to 30 s while it keeps exiting within a minute of its start. SIGTERM
# or SIGINT stop the command (it gets the signal and its time to drain) and then the loop.
# Usage: dev/supervise.sh CMD [ARG...]
set -u
delay=1 child="" stopping=""
stop() {
  stopping=1
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap stop TERM INT
while :; do
  started=$SECONDS
  "$@" &
  child=$!
  wait "$child"
  code=$?
  # A trapped signal interrupts `wait`: wait again for the command to finish draining.
  if [ -n "$stopping" ]; then
    wait "$child"
    exit 0
  fi
  if (( SECONDS - started >= 60 )); then delay=1; fi
  echo "supervise: $1 exited with status $code; restarting it in ${delay}s" >&2
  sleep "$delay" &
  wait $! || true
  [ -n "$stopping" ] && exit 0
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
