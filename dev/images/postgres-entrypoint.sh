#!/bin/sh
# PostgreSQL for the kind e2e (the `postgres` target of the Dockerfile): initialises $PGDATA
# on first start (superuser `postgres` with $POSTGRES_PASSWORD, SCRAM over TCP, database
# $POSTGRES_DB when set), then runs the server in the foreground on all addresses.
set -eu
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
SOCKETS=/tmp

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --pgdata="$PGDATA" --username=postgres --pwfile="$pwfile" --encoding=UTF8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "host all all ::/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    pg_ctl --pgdata="$PGDATA" --silent --wait \
      --options="-c listen_addresses='' -c unix_socket_directories=$SOCKETS" start
    createdb --host="$SOCKETS" --username=postgres "$POSTGRES_DB"
    pg_ctl --pgdata="$PGDATA" --silent --wait stop
  fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories="$SOCKETS"
