"""The HTTP adapters (API, access guard, credentials); domain, service and adapters only."""
