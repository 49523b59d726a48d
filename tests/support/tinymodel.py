"""Write a tiny random-weights llama GGUF that the real llama-server loads in ~0.1 s.

Its text is gibberish by design: tests that use it assert on protocol, lifecycle and shape. The
realistic checks use Gemma 3 270M. Run as a script to write one: ``python -m tests.support.tinymodel out.gguf``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_LAYER = 2
N_CTX = 2048
WORDS = [
    "the",
    "a",
    "and",
    "model",
    "llama",
    "hello",
    "world",
    "yes",
    "no",
    "sky",
    "blue",
    "red",
    "green",
    "cat",
    "dog",
    "one",
    "two",
    "three",
    "is",
    "of",
    "to",
    "in",
    "it",
    "you",
    "that",
    "for",
    "on",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# A Hermes-style template (tools listed in the system turn, calls inside <tool_call> tags): llama-server
# recognises the format, so it can parse and grammar-constrain tool calls even from random weights.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    '</tools>\nCall a function with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\n'
    "{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_model(
    path: Path,
    seed: int = 0,
    name: str = "tiny",
    chat_template: str = CHAT_TEMPLATE,
    context_length: int = N_CTX,
    endless: bool = False,
) -> Path:
    """Write the model to ``path`` (parent folders created) and return the path.

    ``endless``: the end-of-sequence token gets a zero output row while every other row is scaled up, so
    its probability is negligible and a generation runs to its token limit (for crash/cancel tests).
    """
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{i:02X}>".encode() for i in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += [("\u2581" + word).encode() for word in WORDS]
    types += [TokenType.NORMAL] * len(WORDS)
    vocab = len(tokens)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([-float(i) for i in range(vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(chat_template)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", vocab, N_EMBD)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = (rng.standard_normal((vocab, N_EMBD)) * 0.02).astype(np.float32)
    if endless:
        output *= 100.0
        output[2] = 0.0  # </s>
    writer.add_tensor("output.weight", output)
    for block in range(N_LAYER):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"{prefix}.{part}.weight", N_EMBD, N_EMBD)
        tensor(f"{prefix}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"{prefix}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"{prefix}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    print(write_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
