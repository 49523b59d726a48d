"""LlamaController gateway (data plane): Ollama and OpenAI surfaces in front of llama-server backends."""
