"""Ollama API surface of the gateway: request validation, conversion to llama-server, NDJSON streaming."""
