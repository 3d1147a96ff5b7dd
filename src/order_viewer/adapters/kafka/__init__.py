"""The Kafka adapters (consumer, producers); domain, service and the other adapters only."""
