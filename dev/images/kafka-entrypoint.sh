#!/bin/sh
# A single-node Kafka (KRaft, combined broker and controller) for the kind e2e (the `kafka`
# target of the Dockerfile), configured from the same template as the local broker
# (dev/kafka/server.properties), without its TLS listener. Clients reach it as
#   $KAFKA_ADVERTISED_HOST:9092  PLAINTEXT, no credentials: User:ANONYMOUS, a super user
#                                (the development/superuser door)
#   $KAFKA_ADVERTISED_HOST:9094  SASL_PLAINTEXT: PLAIN for the super user `admin` (password
#                                $KAFKA_ADMIN_PASSWORD), SCRAM-SHA-512 for the tenants the
#                                operator creates; ACLs apply (StandardAuthorizer)
# Without KAFKA_ADMIN_PASSWORD the broker starts all the same, with a random admin password
# nobody knows (not logged): SCRAM users and ACLs are then managed through port 9092.
# The password must not contain ", \ or a newline (it is written into a JAAS string).
set -eu
: "${KAFKA_ADVERTISED_HOST:=$(hostname -f)}"
: "${KAFKA_HEAP_OPTS:=-Xms256m -Xmx512m}"
HOME_DIR=/opt/kafka
STATE=/var/lib/kafka
DATA=$STATE/data
PROPS=$STATE/server.properties

if [ -z "${KAFKA_ADMIN_PASSWORD:-}" ]; then
  KAFKA_ADMIN_PASSWORD=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  echo "kafka-entrypoint: KAFKA_ADMIN_PASSWORD is not set; the SASL user admin gets a random password" >&2
fi
case $KAFKA_ADMIN_PASSWORD in
  *[\"\\]* | *'
'*)
    echo "kafka-entrypoint: KAFKA_ADMIN_PASSWORD must not contain \", \\ or a newline" >&2
    exit 1 ;;
esac
# The password as a literal sed replacement (| is the delimiter, & the match).
admin_password=$(printf '%s' "$KAFKA_ADMIN_PASSWORD" | sed 's/[|&]/\\&/g')

umask 077 # the configuration holds the admin password
sed -e "s|@LISTEN_HOST@|0.0.0.0|g" -e "s|@ADVERTISED_HOST@|$KAFKA_ADVERTISED_HOST|g" \
  -e "s|@CONTROLLER_HOST@|127.0.0.1|g" -e "s|@KAFKA_PORT@|9092|g" -e "s|@SASL_PORT@|9094|g" \
  -e "s|@SSL_LISTENER@||g" -e "s|@ADMIN_PASSWORD@|$admin_password|g" \
  -e "s|@CONTROLLER_PORT@|9093|g" -e "s|@LOG_DIRS@|$DATA|g" \
  "$HOME_DIR/config/server.properties" >"$PROPS"
umask 022

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
