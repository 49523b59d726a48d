"""``llamacontroller images build`` copies the project's packages from the source tree it hands the builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamacontroller import images
from llamacontroller.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_images_build_is_given_the_tree_that_holds_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    given: dict[str, Path] = {}

    def build(which: list[str], source: Path, log: Any = print, tag: str = "local") -> dict[str, str]:
        given["source"] = source
        return {}

    monkeypatch.setattr(images, "build", build)
    assert main(["images", "build", "--only", "app"]) == 0
    source = given["source"]
    for package in images.PACKAGES:  # app_context copies each from source/<package>
        assert (source / package).is_dir(), f"{source / package} is missing: the app image cannot be built"
    assert source == ROOT


def test_images_build_takes_a_tag_so_two_stacks_share_an_engine(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tag`` names all three images (``:local`` of another stack on the engine stays as it was)."""
    asked: dict[str, Any] = {}

    def build(which: list[str], source: Path, log: Any = print, tag: str = "local") -> dict[str, str]:
        asked.update(which=which, tag=tag)
        return {}

    monkeypatch.setattr(images, "build", build)
    assert main(["images", "build", "--tag", "team-b.1"]) == 0
    assert asked == {"which": ["llama-server", "edge", "app"], "tag": "team-b.1"}
    assert images.tagged(images.APP_IMAGE, "team-b.1") == "llamacontroller/app:team-b.1"
    assert images.tagged(images.LLAMA_SERVER_IMAGE, "local") == images.LLAMA_SERVER_IMAGE
    with pytest.raises(SystemExit) as refused:
        main(["images", "build", "--tag=-x"])
    assert refused.value.code == 2 and "invalid image tag '-x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="invalid image tag"):
        images.tagged(images.EDGE_IMAGE, "a" * 129)
