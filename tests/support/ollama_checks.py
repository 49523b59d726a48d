"""What every runtime's end-to-end test asks of the real `ollama` client once Gemma is loaded."""

from __future__ import annotations

import ollama

GEMMA = "gemma3:270m"
GEMMA_EMBEDDING_WIDTH = 640


def gemma_stream_embed_and_ps(client: ollama.Client) -> None:
    """A streamed generation, embeddings (the backend restarts with --embeddings), and ps listing only Gemma."""
    parts = list(client.generate(GEMMA, prompt="The sky is", stream=True, options={"num_predict": 8}))
    assert len(parts) > 2 and parts[-1].done
    embedded = client.embed(GEMMA, input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == GEMMA_EMBEDDING_WIDTH
    assert [m.model for m in client.ps().models] == [GEMMA]
