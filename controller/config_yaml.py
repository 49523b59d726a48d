"""YAML for the config file and env overrides: PyYAML's safe loader, bounded so a broken or hostile file
is a ConfigError, never a traceback or minutes of work.

Aliases are references to one composed node, so a "billion laughs" file is small until something walks
it (the env substitution, then validation) and copies every reference. The composed graph is measured
first, as it will be expanded: at most MAX_NODES nodes, nested at most MAX_DEPTH deep, no alias to a
node that contains it. The composer itself recurses once per level, so depth is bounded while composing.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from common.errors import ConfigError

MAX_DEPTH = 64  # a config nests 6 levels deep; lists in a model's kubernetes settings a few more
MAX_NODES = 100_000  # after expanding aliases: a thousand models with every setting is a tenth of it
MAX_INT_TEXT = 40  # characters of one integer; 2**63 has 19 digits


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # YAML lets a later key replace an earlier one silently: a second `server:` block dropped the first's
        # data_dir without a word. Merge keys (`<<`) may still be overridden, as YAML means them to be.
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    problem = f"the key {key.value!r} is given twice (the second would replace the first)"
                    raise ConstructorError("while reading a mapping", node.start_mark, problem, key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _refuse_binary(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise ConstructorError(None, None, "!!binary values have no place in a config", node.start_mark)


def _bounded_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    # int() refuses more than 4,300 digits with a ValueError, not a YAMLError; the size a setting may
    # have is checked by field path later (config._out_of_range).
    if len(str(node.value)) > MAX_INT_TEXT:
        raise ConstructorError(None, None, f"an integer of more than {MAX_INT_TEXT} digits", node.start_mark)
    return loader.construct_yaml_int(node)


def _text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_yaml_str(node)
    try:  # a "\ud800" escape gives half a surrogate pair, which no file, log or terminal can take
        value.encode()
    except UnicodeEncodeError:
        raise ConstructorError(None, None, "a \\u escape is half a surrogate pair", node.start_mark) from None
    if "\0" in value:  # a "\0" escape: no path, name or address holds one (os calls raise ValueError)
        raise ConstructorError(None, None, "a NUL character has no place in a config", node.start_mark)
    return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:binary", _refuse_binary)
_BoundedLoader.add_constructor("tag:yaml.org,2002:str", _text)
_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Raise ComposerError when ``root`` with every alias expanded is too large or too deep."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height), each node measured once
    open_nodes: set[int] = set()

    def too(problem: str, node: yaml.Node) -> ComposerError:
        return ComposerError(None, None, problem, node.start_mark)

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise too(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded", node)
        known = measured.get(id(node))
        if known is None:
            if id(node) in open_nodes:
                raise too("an alias refers to a node that contains it", node)
            open_nodes.add(id(node))
            nodes, height = 1, 1
            for child in _children(node):
                child_nodes, child_height = measure(child, depth + 1)
                nodes, height = nodes + child_nodes, max(height, child_height + 1)
                if nodes > MAX_NODES:
                    raise too(f"more than {MAX_NODES} values once its aliases are expanded", node)
            open_nodes.discard(id(node))
            known = measured[id(node)] = (nodes, height)
        if depth + known[1] - 1 > MAX_DEPTH:
            raise too(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded", node)
        return known

    measure(root, 1)


def _parse(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expansion(root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML, or a ConfigError that names ``source`` (the file or env var) and the place."""
    try:
        return _parse(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from exc
    except yaml.YAMLError as exc:  # the reader's errors (a control character) carry no mark
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
