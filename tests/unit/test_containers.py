"""Container plans (pure): names and labels the docker runtime gives each backend."""

from __future__ import annotations

from controller.runtime.containers import container_name


def test_models_whose_slugs_agree_get_distinct_container_names() -> None:
    """``a:b-c`` and ``a-b:c`` both slug to ``a-b-c``: one name for both made the second load fail with 409."""
    assert container_name("0123456789ab", "a:b-c") != container_name("0123456789ab", "a-b:c")
    assert container_name("0123456789ab", "a:b-c").startswith("llamacontroller-01234567-a-b-c-")


def test_a_container_name_is_stable_and_keyed_by_the_canonical_name() -> None:
    """The same model, however spelled, keeps one name (a stale container of its own is found and replaced)."""
    assert container_name("i", "Tiny") == container_name("i", "tiny:latest")
    assert container_name("i", "tiny") != container_name("j", "tiny")
