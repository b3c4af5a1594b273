#!/bin/sh
# java with Kafka's jars: the class to run, then its arguments. KAFKA_HEAP_OPTS and KAFKA_OPTS as
# in Kafka's own scripts; the tools log warnings to stderr, the broker (KAFKA_LOG4J_OPTS) to stdout.
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} -XX:+UseSerialGC -Djava.awt.headless=true \
    ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/opt/kafka/config/tools-log4j2.properties} \
    ${KAFKA_OPTS:-} -cp '/opt/kafka/libs/*' "$@"
