"""config/llamacontroller.example.yaml says it holds every key with its default: every key of the schema
(controller/config_schema.py), walked recursively, and no key the schema does not know.

A dict of models (``models:``) is walked by its value model where the example has entries: each of the value
model's keys must appear in one entry at least, and no entry may hold a key the schema does not know.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from controller.config import Config, load_config, substitute_env, validate_config
from controller.config_yaml import load_yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "llamacontroller.example.yaml"
# Keys whose example value is an illustration rather than the default.
ILLUSTRATED = {"models_dir", "models"}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's value may be: ``X`` or ``X | None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [model for arg in get_args(annotation) for model in _models_in(arg)]
    if get_origin(annotation) is None and inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _value_models(annotation: Any) -> list[type[BaseModel]]:
    """The models of a ``dict[str, X]`` field's values (none for any other field)."""
    if get_origin(annotation) is dict:
        return _models_in(get_args(annotation)[1])
    return []


def _merged(values: list[Any]) -> Any:
    """The entries of a dict of models as one, their keys (and their sections' keys) together."""
    mappings = [value for value in values if isinstance(value, Mapping)]
    if not mappings:
        return values[0] if values else None
    keys = dict.fromkeys(key for mapping in mappings for key in mapping)
    return {key: _merged([mapping[key] for mapping in mappings if key in mapping]) for key in keys}


def differences(model: type[BaseModel], example: Any, where: str = "") -> tuple[list[str], list[str]]:
    """(the keys of ``model`` that ``example`` lacks, the keys of ``example`` that ``model`` does not know), as
    dotted paths. A section the example lacks is named once, not key by key."""
    given: Mapping[str, Any] = example if isinstance(example, Mapping) else {}
    missing: list[str] = []
    unknown: list[str] = []
    known: set[str] = set()
    for name, field in model.model_fields.items():
        key = field.alias or name
        known.add(key)
        path = f"{where}{key}"
        if key not in given:
            missing.append(path)
            continue
        value = given[key]
        for section in _models_in(field.annotation):
            lacks, extra = differences(section, value, f"{path}.")
            missing += lacks
            unknown += extra
        entries = value if isinstance(value, Mapping) else {}
        for entry_model in _value_models(field.annotation):
            if not entries:
                continue  # nothing to walk: the example shows no entry
            missing += differences(entry_model, _merged(list(entries.values())), f"{path}.<name>.")[0]
            for entry, body in entries.items():
                unknown += differences(entry_model, body, f"{path}.{entry}.")[1]
    unknown += [f"{where}{key}" for key in given if key not in known]
    return missing, unknown


def _example() -> Any:
    return load_yaml(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE))


def test_config_example_holds_every_key_of_the_schema() -> None:
    missing, _ = differences(Config, _example())
    assert not missing, "config/llamacontroller.example.yaml lacks: " + ", ".join(missing)


def test_config_example_holds_no_key_the_schema_does_not_know() -> None:
    _, unknown = differences(Config, _example())
    assert not unknown, "config/llamacontroller.example.yaml has keys the schema does not know: " + ", ".join(unknown)


def test_config_example_validates() -> None:
    assert isinstance(load_config(EXAMPLE, {}), Config)


def test_config_example_shows_the_defaults() -> None:
    """Every section's value in the example is the schema's default (the models are examples)."""
    shown = validate_config(substitute_env(_example(), {})).model_dump(exclude=ILLUSTRATED)
    defaults = Config().model_dump(exclude=ILLUSTRATED)
    differ = sorted(key for key in defaults if shown[key] != defaults[key])
    assert not differ, f"the example's values differ from the defaults in: {', '.join(differ)}"


def test_config_example_walk_names_what_is_missing_and_what_is_unknown() -> None:
    """The walk itself: sections, nested sections, entries of a dict of models."""
    example = {
        "server": {"listen": "127.0.0.1:11434", "lisen": "x"},
        "runtime": {"docker": {"image": "x"}},
        "models": {
            "a": {"path": "a.gguf", "kubernetes": {"resources": {"limits": {}}}},
            "b": {"pinnned": True, "container": None},
        },
    }
    missing, unknown = differences(Config, example)
    assert {"server.data_dir", "runtime.kind", "runtime.docker.network", "runtime.kubernetes", "edge"} <= set(missing)
    assert {"models.<name>.aliases", "models.<name>.kubernetes.resources.requests"} <= set(missing)
    assert "models.<name>.path" not in missing and "server.listen" not in missing
    assert "models.<name>.container.image" in missing, "a section given as null is walked as an empty one"
    assert unknown == ["server.lisen", "models.b.pinnned"]
    without_entries = differences(Config, {**example, "models": {}})[0]
    assert not [path for path in without_entries if path.startswith("models.")], "no entry: nothing to walk"
