"""Pure domain rules: no Kafka, MongoDB or Shodan imports live here."""
