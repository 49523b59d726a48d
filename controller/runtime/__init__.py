"""Ways of running llama-server: the Runtime protocol, local processes, and an in-package fake."""
