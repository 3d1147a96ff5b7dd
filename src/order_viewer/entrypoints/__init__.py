"""The entrypoints: the commands and the server; they may import every layer and the settings."""
