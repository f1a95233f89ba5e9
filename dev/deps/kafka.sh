#!/usr/bin/env bash
# Kafka for tests: Apache Kafka (default 4.1.1, MERIDIAN_KAFKA_VERSION) in KRaft combined mode
# (broker + controller in one JVM, no ZooKeeper). The jars come from Maven Central through
# dev/kafka/pom.xml and are cached in $MERIDIAN_CACHE_DIR/kafka/<version>/libs; data, config and
# the cluster id live in $MERIDIAN_STATE_DIR/kafka. Creates the platform's topics.
#
# Listeners (config: dev/kafka/server.properties + dev/kafka/server-ssl.properties):
#   127.0.0.1:$MERIDIAN_KAFKA_PORT       PLAINTEXT, no credentials: User:ANONYMOUS, a super user
#                                        (the tests and tools; the development/superuser door)
#   127.0.0.1:$MERIDIAN_KAFKA_SASL_PORT  SASL_PLAINTEXT, PLAIN (user admin, password
#                                        $MERIDIAN_KAFKA_ADMIN_PASSWORD; a super user) or
#                                        SCRAM-SHA-512 (tenants, created at run time; ACLs apply)
#   127.0.0.1:$MERIDIAN_KAFKA_SSL_PORT   SASL_SSL, the same over TLS; clients trust
#                                        $MERIDIAN_STATE_DIR/kafka/tls/ca.crt (a local CA made
#                                        once with openssl; `reset` keeps it)
#   127.0.0.1:$MERIDIAN_KAFKA_CONTROLLER_PORT  the KRaft controller
# `up` restarts a running broker whose configuration differs from what it would write now.
#
#   dev/deps/kafka.sh up|down|status|reset
#   dev/deps/kafka.sh libs    fetch the jars (cached) and print their directory (the kafka image)
# shellcheck source-path=SCRIPTDIR source=../lib.sh
source "$(dirname "$0")/../lib.sh"

NAME=kafka
PORT=$MERIDIAN_KAFKA_PORT
CONTROLLER_PORT=$MERIDIAN_KAFKA_CONTROLLER_PORT
SASL_PORT=$MERIDIAN_KAFKA_SASL_PORT
SSL_PORT=$MERIDIAN_KAFKA_SSL_PORT
ADMIN_PASSWORD=$MERIDIAN_KAFKA_ADMIN_PASSWORD
KAFKA_VERSION=${MERIDIAN_KAFKA_VERSION:-4.1.1}
KAFKA_CACHE=$MERIDIAN_CACHE_DIR/kafka/$KAFKA_VERSION
LIBS=$KAFKA_CACHE/libs
LIBS_DONE=$KAFKA_CACHE/.libs-complete   # written after a successful copy-dependencies
KAFKA_DIR=$MERIDIAN_STATE_DIR/kafka
DATA=$KAFKA_DIR/data
PROPS=$KAFKA_DIR/server.properties
CLUSTER_ID_FILE=$KAFKA_DIR/cluster.id
VERSION_FILE=$KAFKA_DIR/running.version
TLS_DIR=$KAFKA_DIR/tls   # ca.crt, ca.key, server.pem (the broker's key and certificate chain)
LOG4J=$DEV_DIR/kafka/log4j2.properties
TOPICS=(commands events cache commands.dlq)
TOPIC_PARTITIONS=6

# kafka_pid: prints the pid of *our* broker (pid file from start_bg, alive, a JVM running
# kafka.Kafka with our server.properties; a zombie or a recycled pid does not count).
kafka_pid() {
  local pid
  pid=$(cat "$(pidfile "$NAME")" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "kafka.Kafka $PROPS" || return 1
  echo "$pid"
}

port_owner() {
  ss -ltnpH "sport = :$1" 2>/dev/null |
    sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1
}

# JAVA: a Java 17+ runtime (Kafka 4 brokers need 17).
find_java() {
  local j major
  for j in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)" /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    if [ -z "$j" ] || [ ! -x "$j" ]; then continue; fi
    major=$("$j" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
    if [ "${major%%.*}" -ge 17 ] 2>/dev/null; then JAVA=$j; return 0; fi
  done
  return 1
}

ensure_java() {
  find_java && return 0
  apt_install openjdk-17-jre-headless
  find_java || die "no Java 17+ runtime found after installing openjdk-17-jre-headless"
}

# Tools (storage format, topics) are short-lived JVMs: tune them for start-up time; never hang.
kafka_tool() {
  timeout 180 "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Dlog4j2.configurationFile="$LOG4J" -Dmeridian.kafka.level=WARN -cp "$LIBS/*" "$@"
}
topic_cmd() {
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$PORT" "$@"
}

fetch_libs() {
  [ -f "$LIBS_DONE" ] && [ -d "$LIBS" ] && return 0
  command -v mvn >/dev/null || apt_install maven
  step "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
  rm -rf "$LIBS"
  mkdir -p "$KAFKA_CACHE"
  spin "kafka maven copy-dependencies" mvn -q -B -Dstyle.color=never -f "$DEV_DIR/kafka/pom.xml" \
    dependency:copy-dependencies -Dkafka.version="$KAFKA_VERSION" -DoutputDirectory="$LIBS" ||
    { rm -rf "$LIBS"; rmdir "$KAFKA_CACHE" 2>/dev/null || true; die "could not fetch Kafka $KAFKA_VERSION from Maven Central (is MERIDIAN_KAFKA_VERSION a released version?)"; }
  ls "$LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || die "kafka_2.13-$KAFKA_VERSION.jar missing in $LIBS"
  touch "$LIBS_DONE"
  ok "$(find "$LIBS" -name '*.jar' | wc -l) jars, $(du -sh "$LIBS" | cut -f1)"
}

# ensure_tls: the local CA and the broker's certificate (IP:127.0.0.1, DNS:localhost), made once
# in $TLS_DIR; sets TLS_NEW=1 when it made them (a running broker must then be restarted).
TLS_NEW=
ensure_tls() {
  [ -s "$TLS_DIR/server.pem" ] && [ -s "$TLS_DIR/ca.crt" ] && return 0
  step "generating a local CA and a certificate for 127.0.0.1/localhost in $TLS_DIR"
  # Kafka's PEM keystore: the key (PKCS#8, no password) and the certificate chain in one file.
  local_tls "$TLS_DIR" Kafka "$MERIDIAN_LOG_DIR/$NAME.tools.log" \
    sh -c 'cat server.key server.crt ca.crt >server.pem && rm server.key'
  TLS_NEW=1
  ok "CA $TLS_DIR/ca.crt (valid 10 years), broker keystore $TLS_DIR/server.pem"
}

# render_config FILE: the template plus the SASL_SSL fragment, placeholders replaced. The admin
# password ends up in a quoted JAAS string in a properties file: refuse what would need escaping.
render_config() {
  case $ADMIN_PASSWORD in
    '' | *[\"\\]* | *$'\n'*) die "MERIDIAN_KAFKA_ADMIN_PASSWORD must be non-empty, without \", \\ or newlines" ;;
  esac
  local password
  password=$(printf '%s' "$ADMIN_PASSWORD" | sed 's/[|&]/\\&/g')   # literal in a sed replacement
  sed -e "s|@LISTEN_HOST@|127.0.0.1|g" -e "s|@ADVERTISED_HOST@|127.0.0.1|g" -e "s|@CONTROLLER_HOST@|127.0.0.1|g" \
    -e "s|@KAFKA_PORT@|$PORT|g" -e "s|@SASL_PORT@|$SASL_PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" \
    -e "s|@SSL_LISTENER@|,SASL_SSL://127.0.0.1:$SSL_PORT|g" -e "s|@ADMIN_PASSWORD@|$password|g" \
    -e "s|@TLS_DIR@|$TLS_DIR|g" -e "s|@LOG_DIRS@|$DATA|g" \
    "$DEV_DIR/kafka/server.properties" "$DEV_DIR/kafka/server-ssl.properties" >"$1"
}

format_storage() {
  [ -f "$DATA/meta.properties" ] && return 0
  if [ ! -s "$CLUSTER_ID_FILE" ]; then
    kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$CLUSTER_ID_FILE.tmp"
    grep -qE '^[A-Za-z0-9_-]{22}$' "$CLUSTER_ID_FILE.tmp" || die "could not generate a Kafka cluster id"
    mv "$CLUSTER_ID_FILE.tmp" "$CLUSTER_ID_FILE"
  fi
  # A directory without meta.properties was never formatted successfully: start clean.
  rm -rf "$DATA"
  spin "kafka storage format" kafka_tool kafka.tools.StorageTool format --standalone \
    --cluster-id "$(cat "$CLUSTER_ID_FILE")" --config "$PROPS" || die "kafka storage format failed"
  ok "formatted $DATA (cluster id $(cat "$CLUSTER_ID_FILE"), single-node dynamic quorum)"
}

# The topics' first partition directories exist in the log dir once a topic was created:
# a cheap check that needs no JVM.
topics_present() {
  local t
  for t in "${TOPICS[@]}"; do [ -d "$DATA/$t-0" ] || return 1; done
}

ensure_topics() {
  local existing t created=()
  # Also the readiness probe: the broker answers metadata requests, not just TCP connects.
  existing=$(topic_cmd --list 2>>"$MERIDIAN_LOG_DIR/$NAME.tools.log") ||
    die "the Kafka broker accepts connections but does not answer the topic list; see $MERIDIAN_LOG_DIR/$NAME.log"
  # One JVM per topic (TopicCommand creates one at a time), run in parallel.
  local pids=() failed=() i
  for t in "${TOPICS[@]}"; do
    grep -qxF -- "$t" <<<"$existing" && continue
    topic_cmd --create --if-not-exists --topic "$t" --partitions "$TOPIC_PARTITIONS" \
      --replication-factor 1 >>"$MERIDIAN_LOG_DIR/$NAME.tools.log" 2>&1 &
    pids+=($!)
    created+=("$t")
  done
  for i in "${!pids[@]}"; do wait "${pids[i]}" || failed+=("${created[i]}"); done
  [ ${#failed[@]} -eq 0 ] || die "could not create topics ${failed[*]}; see $MERIDIAN_LOG_DIR/$NAME.tools.log"
  if [ ${#created[@]} -gt 0 ]; then
    ok "created topics: ${created[*]} ($TOPIC_PARTITIONS partitions, replication factor 1)"
  else
    ok "topics present: ${TOPICS[*]}"
  fi
}

ports_open() { port_open "$PORT" && port_open "$SASL_PORT" && port_open "$SSL_PORT" && port_open "$CONTROLLER_PORT"; }
# Start-up probe: done once the broker listens, or as soon as the JVM has died.
port_open_or_exited() { ports_open || ! kafka_pid >/dev/null; }

NEW_PROPS=
up() {
  local pid p owner
  mkdir -p "$KAFKA_DIR"
  ensure_tls
  # The configuration this start would use; a running broker with another one is restarted.
  NEW_PROPS=$(mktemp "$PROPS.XXXXXX")   # mode 600: it holds the admin password
  trap 'rm -f "$NEW_PROPS"' EXIT
  render_config "$NEW_PROPS"
  if pid=$(kafka_pid); then
    if [ -n "$TLS_NEW" ] || ! cmp -s "$NEW_PROPS" "$PROPS"; then
      step "kafka's configuration changed (dev/kafka/*.properties, MERIDIAN_KAFKA_* or the TLS files); restarting it (pid $pid; data kept)"
      echo "    changed: $(diff "$PROPS" "$NEW_PROPS" | sed -n 's/^[<>] \([^#=]*\)=.*/\1/p' | sort -u | paste -sd ' ')"
      stop_bg "$NAME" 60
    elif ports_open; then
      if topics_present; then
        ok "kafka already running on 127.0.0.1:$PORT (pid $pid)"
        return 0
      fi
      ensure_java
      ensure_topics
      return 0
    # Started less than two minutes ago (e.g. by a concurrent `up`): let it finish starting.
    elif [ $(( $(date +%s) - $(stat -c %Y "$(pidfile "$NAME")") )) -lt 120 ]; then
      step "kafka (pid $pid) is starting; waiting for 127.0.0.1:$PORT"
    else
      warn "kafka (pid $pid) is running but not listening on $PORT/$SASL_PORT/$SSL_PORT/$CONTROLLER_PORT; restarting it"
      stop_bg "$NAME" 60
    fi
  fi

  if ! kafka_pid >/dev/null; then
    for p in "$PORT:MERIDIAN_KAFKA_PORT" "$SASL_PORT:MERIDIAN_KAFKA_SASL_PORT" \
      "$SSL_PORT:MERIDIAN_KAFKA_SSL_PORT" "$CONTROLLER_PORT:MERIDIAN_KAFKA_CONTROLLER_PORT"; do
      if port_open "${p%%:*}"; then
        owner=$(port_owner "${p%%:*}")
        die "port ${p%%:*} is already in use by ${owner:-another process} (not our kafka); stop it or set ${p#*:} to a free port"
      fi
    done

    ensure_java
    fetch_libs
    step "kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$PORT, SASL :$SASL_PORT, SASL_SSL :$SSL_PORT, controller :$CONTROLLER_PORT (data: $DATA)"
    mv "$NEW_PROPS" "$PROPS"
    format_storage
    echo "$KAFKA_VERSION" >"$VERSION_FILE"
    start_bg "$NAME" "$JAVA" -Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" kafka.Kafka "$PROPS"
  else
    ensure_java
  fi
  pid=$(cat "$(pidfile "$NAME")")
  if ! wait_for "$NAME" 120 port_open_or_exited; then
    stop_bg "$NAME" 30
    die "kafka did not open 127.0.0.1:$PORT/$SASL_PORT/$SSL_PORT/$CONTROLLER_PORT; see $MERIDIAN_LOG_DIR/$NAME.log"
  fi
  if ! kafka_pid >/dev/null; then
    tail -n 30 "$MERIDIAN_LOG_DIR/$NAME.log" >&2
    die "kafka exited during start-up; see $MERIDIAN_LOG_DIR/$NAME.log"
  fi
  ok "started (pid $pid, log $MERIDIAN_LOG_DIR/$NAME.log)"
  ensure_topics
  ok "ready: 127.0.0.1:$PORT (PLAINTEXT), :$SASL_PORT (SASL_PLAINTEXT), :$SSL_PORT (SASL_SSL, CA $TLS_DIR/ca.crt)"
}

down() {
  local pid
  if ! pid=$(kafka_pid); then
    rm -f "$(pidfile "$NAME")"
    ok "kafka is not running"
    return 0
  fi
  step "stopping kafka (pid $pid; controlled shutdown)"
  stop_bg "$NAME" 60
  ok "stopped (data kept in $DATA)"
}

status() {
  local pid ver
  ver=$(cat "$VERSION_FILE" 2>/dev/null || echo "$KAFKA_VERSION")
  if pid=$(kafka_pid) && ports_open; then
    printf '%-11s%-5s%s\n' kafka up "127.0.0.1:$PORT (Kafka $ver KRaft, SASL :$SASL_PORT, SASL_SSL :$SSL_PORT, controller :$CONTROLLER_PORT, topics: ${TOPICS[*]})"
    return 0
  fi
  local why="not running"
  if [ -n "${pid:-}" ] && port_open "$PORT"; then
    why="pid $pid listens on :$PORT but not on all of :$SASL_PORT :$SSL_PORT :$CONTROLLER_PORT (starting? or an older configuration: \`up\` restarts it)"
  elif [ -n "${pid:-}" ]; then
    why="pid $pid alive but not listening (starting?)"
  elif port_open "$PORT"; then
    why="port taken by $(port_owner "$PORT" | grep . || echo 'another process')"
  fi
  printf '%-11s%-5s%s\n' kafka down "127.0.0.1:$PORT ($why)"
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  # Stop, delete the log directory and the cluster id (every topic, ACL and SCRAM user), start a
  # fresh broker. The TLS files stay.
  reset) down && rm -rf "$DATA" "$CLUSTER_ID_FILE" && up ;;
  libs) fetch_libs >&2 && echo "$LIBS" ;;
  *) die "usage: $0 up|down|status|reset|libs" ;;
esac
