"""Orders from Kafka into PostgreSQL, served by id over HTTP."""
