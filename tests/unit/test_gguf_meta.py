from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import InvalidModelFile
from controller.catalog.gguf_meta import read_gguf_metadata


def test_gguf_meta_matches_the_reference_reader(tiny_model: Path) -> None:
    meta = read_gguf_metadata(tiny_model)
    reference = GGUFReader(str(tiny_model))
    assert meta.parameter_count == sum(int(t.n_elements) for t in reference.tensors)
    assert meta.architecture == reference.fields["general.architecture"].contents()
    assert meta.context_length == reference.fields["llama.context_length"].contents() == 2048
    assert meta.chat_template == reference.fields["tokenizer.chat_template"].contents()
    assert meta.file_type == "F32"
    assert meta.array_lengths["tokenizer.ggml.tokens"] == len(reference.fields["tokenizer.ggml.tokens"].data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 a zip", "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00", "truncated"),
        (b"GGUF\x09\x00\x00\x00" + b"\x00" * 16, "unsupported GGUF version 9"),
    ],
)
def test_gguf_meta_rejects_non_gguf_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidModelFile, match=message):
        read_gguf_metadata(path)


def test_gguf_meta_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="cannot read model file"):
        read_gguf_metadata(tmp_path / "absent.gguf")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=4, max_value=6000), noise=st.binary(min_size=0, max_size=64))
def test_gguf_meta_truncated_or_corrupt_headers_never_crash(
    tmp_path: Path, tiny_model: Path, cut: int, noise: bytes
) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_model.read_bytes()[:cut] + noise)
    try:
        read_gguf_metadata(path)
    except InvalidModelFile:
        pass
