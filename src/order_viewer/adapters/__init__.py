"""The adapters: the ports made real; they import the domain and service, never an entrypoint."""
