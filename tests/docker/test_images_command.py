"""`llamacontroller images build` from the command line, against the real engine."""

from __future__ import annotations

import contextlib

import docker

from llamacontroller import images
from llamacontroller.cli import main


def test_images_build_with_a_tag_leaves_the_local_images_alone(engine: docker.DockerClient, edge_image: str) -> None:
    """A second stack on one engine builds its own tag; the `:local` images the first one runs stay as they were."""
    local = engine.images.get(edge_image).id
    other = images.tagged(images.EDGE_IMAGE, "lc-second-stack")
    try:
        assert main(["images", "build", "--only", "edge", "--tag", "lc-second-stack"]) == 0
        assert other in engine.images.get(other).tags
        assert engine.images.get(edge_image).id == local and edge_image in engine.images.get(edge_image).tags
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(other)
