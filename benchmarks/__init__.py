"""`make bench`: ingest throughput against COPY and a per-order writer, and HTTP lookups."""
