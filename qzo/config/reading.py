"""Reading YAML and showing values without letting a hostile file or value run away.

A config file (or a ``--set`` value, or a run's ``config.yaml``) is read only up to
:data:`MAX_CONFIG_BYTES` and parsed by :class:`BoundedLoader`, which refuses YAML whose aliases
expand past :data:`MAX_NODES` values (a 341-byte nest of aliases stands for hundreds of millions)
and numbers longer than any setting needs. Every value an error shows goes through
:func:`short_repr` and :func:`clip`: one line, bounded, whatever the value.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_NODES", "short_repr", "clip", "read_config", "load_yaml", "BoundedLoader"]

#: the largest config file (and ``--set`` value) read, in bytes: the shipped recipes are 1-3 KB, and the pure-Python
#: YAML parser takes about 0.6 s a MiB (35 s for a 55 MB file)
MAX_CONFIG_BYTES = 1 << 20
#: the most values a config's YAML may stand for, aliases expanded (the shipped recipes have under 200); a
#: 341-byte nest of aliases stands for hundreds of millions, which every walk of the config would then visit
MAX_NODES = 10_000


def short_repr(value) -> str:
    """How :func:`_brief` shows a value: the first few items of a container, a few levels deep, never all of it."""
    import reprlib

    short = reprlib.Repr()  # (its keyword arguments are Python 3.12's)
    short.maxlevel, short.maxstring, short.maxlong, short.maxother = 3, 70, 40, 70
    short.maxtuple = short.maxlist = short.maxarray = short.maxdict = short.maxset = short.maxfrozenset = 6
    short.maxdeque = 6
    return short.repr(value)


def clip(text, limit: int = 300) -> str:
    """``text`` (or an error) as one line of at most ``limit`` characters."""
    line = " ".join(str(text).split("\n"))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_config(path: Path) -> str:
    """The text of a config file, refused (:class:`ConfigError`) past :data:`MAX_CONFIG_BYTES` before it is read
    whole, naming the value that makes it so large when a quick look finds it (:func:`_largest_value`)."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is {size / 2**20:.1f} MiB, over the {MAX_CONFIG_BYTES >> 20} MiB qzo reads "
                          f"(a config is a few KB){_largest_value(path)}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({clip(exc, 120)}); save it as UTF-8") from None


def _largest_value(path: Path) -> str:
    """``": its value data.system_prompt alone is N characters; shorten it"`` for an oversized config, from libyaml's
    event stream (C, about 0.5 s for 50 MB; nothing is composed or built). The look gives up, saying nothing, without
    libyaml, past 256 MiB, 5 s, or 64 levels of nesting (where libyaml's parser slows down quadratically)."""
    import time

    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None or path.stat().st_size > 256 << 20:
        return ""
    stack: list[list] = []  # per open collection: [is a mapping, its current key, a key comes next]
    best, where, end = 0, "", time.monotonic() + 5
    try:
        with open(path, "rb") as f:
            for i, event in enumerate(yaml.parse(f, Loader=loader)):
                if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                    stack.append([isinstance(event, yaml.MappingStartEvent), None, True])
                    if len(stack) > 64:
                        return ""
                    continue
                if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                    stack.pop()
                elif isinstance(event, yaml.ScalarEvent):
                    if stack and stack[-1][0] and stack[-1][2]:
                        stack[-1][1] = event.value[:40]
                    elif len(event.value) > best:
                        best = len(event.value)
                        where = ".".join(str(s[1]) for s in stack if s[0] and s[1] is not None)
                elif not isinstance(event, yaml.AliasEvent):
                    continue
                if stack and stack[-1][0]:  # a key or a value of the mapping is complete: the other comes next
                    stack[-1][2] = not stack[-1][2]
                if i % 1024 == 0 and time.monotonic() > end:
                    return ""
    except (yaml.YAMLError, OSError):
        return ""
    if best < MAX_CONFIG_BYTES // 2 or not where:
        return "; shorten its long values"
    return f": its value {clip(where, 80)} alone is {best:,} characters; shorten it"


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a document that stands for more than :data:`MAX_NODES` values.

    An alias (``*a``) makes the constructor reuse its anchor's value, so a few hundred bytes of
    nested aliases stand for billions of values: anything that walks the result (a repr in an
    error message, a copy, a dump) then runs for minutes and fills memory. The composed node graph
    (aliases still shared) is measured as construction would expand it, before anything is built.
    """

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_nodes(node) > MAX_NODES:
            raise ConfigError(f"{self.name}: its YAML stands for over {MAX_NODES:,} values once its aliases (*name) "
                              "are expanded (a config holds a few hundred); write the values out instead of nesting "
                              "aliases")
        return node

    def construct_yaml_int(self, node):
        # an int longer than any setting needs: float() of it (an lr, an eps) would overflow, and past 4300 digits
        # even int() refuses
        if len(node.value) > 64:
            raise ConfigError(f"{self.name}: the number {node.value[:20]}... is {len(node.value):,} characters long; "
                              "no config value needs a number that long")
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def _expanded_nodes(root) -> int:
    """How many values ``root`` stands for with every alias expanded (counting stops past :data:`MAX_NODES`);
    a node that contains itself (``&a [*a]``) counts as over the limit. Iterative: no recursion limit to meet."""
    over = MAX_NODES + 1

    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return iter(node.value)
        if isinstance(node, yaml.MappingNode):
            return (n for pair in node.value for n in pair)
        return iter(())

    sizes: dict[int, int] = {}
    on_path = {id(root)}
    stack = [(root, children(root), [1])]
    while stack:
        node, todo, count = stack[-1]
        child = next(todo, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            sizes[id(node)] = count[0]
            if stack:
                stack[-1][2][0] += count[0]
                if stack[-1][2][0] >= over:
                    return over
            continue
        if id(child) in on_path:
            return over  # an alias inside its own anchor: endless
        if id(child) in sizes:
            count[0] += sizes[id(child)]
            if count[0] >= over:
                return over
            continue
        on_path.add(id(child))
        stack.append((child, children(child), [1]))
    return sizes[id(root)]


def load_yaml(text: str, where: str):
    """``yaml.safe_load(text)`` through :class:`BoundedLoader`; nesting past Python's recursion limit is a
    :class:`ConfigError` naming ``where`` (a :class:`yaml.YAMLError` is the caller's)."""
    loader = BoundedLoader(text)
    loader.name = where
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{where}: its YAML nests too deep for qzo to read (a config is a few levels deep); "
                          "flatten it") from None
    finally:
        loader.dispose()
