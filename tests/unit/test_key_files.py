"""The signing and session keys: made once with mode 0600, or read where a platform put them read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.auth.secrets import load_or_create_key


def test_a_new_key_is_made_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "identity.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key


def test_a_loose_key_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    path.write_bytes(b"k" * 48)
    path.chmod(0o644)
    assert load_or_create_key(path) == b"k" * 48
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_key_whose_mode_cannot_be_changed_is_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kubernetes Secret volume with fsGroup: mode 0440 on a read-only mount, not the reader's to change."""
    path = tmp_path / "identity.key"
    path.write_bytes(b"r" * 48)
    path.chmod(0o440)

    def read_only_file_system(self: Path, mode: int) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "chmod", read_only_file_system)
    assert load_or_create_key(path) == b"r" * 48
