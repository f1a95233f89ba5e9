#!/bin/sh
# A single-node Kafka (KRaft, combined broker and controller) for the kind e2e (the `kafka`
# target of the Dockerfile), configured from the same template as the local broker
# (dev/kafka/server.properties). Clients reach it as $KAFKA_ADVERTISED_HOST:9092.
set -eu
: "${KAFKA_ADVERTISED_HOST:=$(hostname -f)}"
: "${KAFKA_HEAP_OPTS:=-Xms256m -Xmx512m}"
HOME_DIR=/opt/kafka
STATE=/var/lib/kafka
DATA=$STATE/data
PROPS=$STATE/server.properties

sed -e "s|@LISTEN_HOST@|0.0.0.0|g" -e "s|@ADVERTISED_HOST@|$KAFKA_ADVERTISED_HOST|g" \
  -e "s|@CONTROLLER_HOST@|127.0.0.1|g" -e "s|@KAFKA_PORT@|9092|g" \
  -e "s|@CONTROLLER_PORT@|9093|g" -e "s|@LOG_DIRS@|$DATA|g" \
  "$HOME_DIR/config/server.properties" >"$PROPS"

# kafka_java [exec] CLASS ARGS...: run a class of Kafka's classpath (the broker with exec).
kafka_java() {
  how=''
  if [ "$1" = exec ]; then how='exec'; shift; fi
  # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of words
  $how java $KAFKA_HEAP_OPTS -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$HOME_DIR/config/log4j2.properties" -cp "$HOME_DIR/libs/*" "$@"
}

if [ ! -f "$DATA/meta.properties" ]; then
  cluster_id=$(kafka_java -Dmeridian.kafka.level=WARN kafka.tools.StorageTool random-uuid | tail -n 1)
  kafka_java kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" --config "$PROPS"
fi
kafka_java exec kafka.Kafka "$PROPS"
