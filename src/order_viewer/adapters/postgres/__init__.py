"""The PostgreSQL adapters (migrations, writer, readers); domain, ports and adapters only."""
