"""Local brokers for the demo, the tests and the benchmarks: Tansu (embedded, light) and
Apache Kafka (KRaft, one JVM). Production brokers are the operator's."""
