"""Adapters: the only modules that talk to Kafka, MongoDB or Shodan."""
