from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import InvalidModelName
from common.names import canonical, name_from_filename, validate_model_name


@pytest.mark.parametrize("name", ["gemma3", "gemma3:270m", "Qwen2.5-7B:q4_k_m", "tiny_1:latest", "a"])
def test_names_accepts_ollama_style(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../x", "a/b", "a\\b", "x..y", "$(reboot)", "a;b", "a b", "a:b:c", ":tag", "name:", "-x", "x" * 101, "a\x00"],
)
def test_names_rejects_anything_else(name: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_model_name(name)


def test_names_canonical_is_case_insensitive_with_latest() -> None:
    assert canonical("Gemma3") == "gemma3:latest"
    assert canonical("gemma3:LATEST") == "gemma3:latest"
    assert canonical("gemma3:270m") == "gemma3:270m"


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("gemma-3-270m-q4_k_m", "gemma-3-270m:q4_k_m"),
        ("Llama-3.2-1B-Instruct-Q8_0", "llama-3.2-1b-instruct:q8_0"),
        ("tiny", "tiny:latest"),
        ("my model (copy)", "my-model-copy:latest"),
        ("mistral.f16", "mistral:f16"),
    ],
)
def test_names_from_file_names(stem: str, expected: str) -> None:
    assert name_from_filename(stem) == expected


@given(st.text(max_size=120))
def test_names_validation_never_lets_a_separator_through(text: str) -> None:
    try:
        validate_model_name(text)
    except InvalidModelName:
        return
    assert "/" not in text and ".." not in text and "\\" not in text and " " not in text
    assert len(text) <= 100
