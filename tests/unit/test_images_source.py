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

    def build(which: list[str], source: Path, log: Any = print) -> dict[str, str]:
        given["source"] = source
        return {}

    monkeypatch.setattr(images, "build", build)
    assert main(["images", "build", "--only", "app"]) == 0
    source = given["source"]
    for package in images.PACKAGES:  # app_context copies each from source/<package>
        assert (source / package).is_dir(), f"{source / package} is missing: the app image cannot be built"
    assert source == ROOT
