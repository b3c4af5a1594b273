#!/bin/sh
# The broker: a bounded heap (KAFKA_HEAP_OPTS overrides it) and its log on stdout.
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m} \
KAFKA_LOG4J_OPTS=${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties} \
exec /opt/kafka/bin/kafka-run-class.sh kafka.Kafka "$@"
