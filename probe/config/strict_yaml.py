"""Strict YAML decoding with line-numbered errors, shared by the config loader and the seed lists.

A file is parsed with ``yaml.compose`` (SafeLoader rules; libyaml's `CSafeLoader` where
PyYAML has it, several times faster and with the same node tree and line numbers) into a
node tree and walked by hand through `Node` cursors, so every value keeps its line and its
dotted field path.  Whatever is wrong in a file (syntax, an unknown key, a wrong
type, a value out of range) becomes one `ConfigError` naming the file, the line
and the field; callers never see a YAML traceback.

The node tree costs most of a load, so loaders read a file first as plain data straight
from libyaml's events (`read_plain`, walked by `PlainNode` cursors: the same checks, no
lines) and read it as the node tree only when that fails (`with_positions`): every error
users see comes from the node tree's walk.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.reader import Reader

from ..model import freeze

__all__ = [
    "ConfigError",
    "KeyedNode",
    "NeedsPositions",
    "Node",
    "PlainNode",
    "YamlNode",
    "canonical_ip",
    "did_you_mean",
    "parse_file",
    "parse_text",
    "with_positions",
]

T = TypeVar("T")

# Field names for errors that concern a whole file rather than one value in it.
FILE_FIELD = "<file>"
YAML_FIELD = "<yaml>"
ROOT_FIELD = "<root>"

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_BYTES = 4 * 1024 * 1024  # a config or seed list is a few KiB; refuse anything absurd
# Values in a file once aliases are expanded: the walk visits an aliased collection once
# per reference, so a few hundred bytes of doubling aliases ("billion laughs") would
# otherwise mean 2**27 visits, hanging check-config and a running agent's reload.
_MAX_EXPANDED_NODES = 1_000_000
# Values in a file as written.  A node costs a few hundred bytes once composed, so a file
# of a million one-character list items would take most of a GiB and many seconds: count
# before composing and refuse early.  A flow-style endpoint is ~17 values, so this admits
# a list of over 10,000 endpoints.
_MAX_NODES = 250_000
_NODE_EVENTS = (ScalarEvent, AliasEvent, CollectionStartEvent)
_STR_TAG = "tag:yaml.org,2002:str"

# libyaml where PyYAML was built with it (the same node tree, marks and tags: the resolver
# is PyYAML's own Python one); None where it was not: then pure Python.
_FAST_LOADER: type[yaml.SafeLoader] | None = getattr(yaml, "CSafeLoader", None)
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# An IPv4 address already in the canonical form ipaddress gives (no leading zeros): taken
# as it is, without parsing it through ipaddress (5 us an address, more than the regex).
_CANONICAL_IPV4 = re.compile(r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                             r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")  # fmt: skip


class ConfigError(Exception):
    """A configuration or seed file is unusable.  ``str()`` is ``file:line: field: message``
    (``file: field: message`` when no line applies, e.g. a missing file)."""

    def __init__(self, file: str, line: int | None, field: str, message: str) -> None:
        super().__init__(file, line, field, message)
        self.file = file
        self.line = line  # 1-based; None when no position applies (e.g. a missing file)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


def did_you_mean(word: str, known: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known word, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _yaml_type(value: Any) -> str:
    """How a constructed YAML value is named in error messages ("got an integer")."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, date):  # datetime is a date subclass
        return "a timestamp"
    if isinstance(value, bytes):
        return "binary data"
    return f"a {type(value).__name__}"


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a single value"


def canonical_ip(value: str) -> str | None:
    """An IP literal in canonical (compressed) form, or None if ``value`` is not one.
    A dotted-quad IPv4 already canonical is taken as written (no parse: config load cost)."""
    if _CANONICAL_IPV4.fullmatch(value):
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


class Node:
    """A cursor on one value of a file: where it is (file, line, field path) and typed
    accessors.  Two kinds: `YamlNode` over PyYAML's node tree (every value has a line),
    and `PlainNode` over plain data read straight from libyaml's events (no lines: cheap
    to read, and an error on it is re-read with positions, see `with_positions`)."""

    __slots__ = ()
    file: str
    path: str

    # -- what each kind provides -----------------------------------------------------------

    @property
    def line(self) -> int:
        raise NotImplementedError

    @property
    def is_null(self) -> bool:
        raise NotImplementedError

    @property
    def is_mapping(self) -> bool:
        raise NotImplementedError

    def keyed(self) -> list[tuple[str, Node]]:
        """(key, value) of a mapping, each value a cursor whose line is its key's line;
        duplicate keys and non-string keys are errors."""
        raise NotImplementedError

    def sequence(self) -> list[Node]:
        raise NotImplementedError

    def scalar(self) -> Any:
        raise NotImplementedError

    def plain(self) -> Any:
        """The value as immutable plain data (mappings frozen, lists as tuples): for params."""
        raise NotImplementedError

    # -- position and errors ------------------------------------------------------------

    @property
    def field(self) -> str:
        return self.path or ROOT_FIELD

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(self.file, self.line, self.field, message)

    def child_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    # -- structure ----------------------------------------------------------------------

    def mapping(self, known: Collection[str], required: Collection[str] = ()) -> dict[str, Node]:
        """The mapping's values by key; unknown, duplicate or missing keys are errors."""
        out: dict[str, Node] = {}
        for key, value in self.keyed():
            if key not in known:
                raise ConfigError(
                    self.file,
                    value.line,
                    value.path,
                    f"unknown key {key!r}{did_you_mean(key, known)}",
                )
            out[key] = value
        for key in required:
            if key not in out:
                raise ConfigError(
                    self.file, self.line, self.child_path(key), "required key missing"
                )
        return out

    def free_mapping(self) -> dict[str, Node]:
        """A mapping with user-chosen string keys (no schema), duplicates still rejected."""
        return dict(self.keyed())

    # -- scalars ------------------------------------------------------------------------

    def as_str(self) -> str:
        value = self.scalar()
        if not isinstance(value, str):
            # YAML 1.1 reads NO, on, 1.10, 2024-01-01 as non-strings: tell the user to quote.
            self.fail(f"expected a string, got {_yaml_type(value)} (quote the value)")
        return value

    def nonempty_str(self) -> str:
        value = self.as_str()
        if not value.strip():
            self.fail("must not be empty")
        return value

    def as_bool(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            self.fail(f"expected true or false, got {_yaml_type(value)}")
        return value

    def as_int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"expected an integer, got {_yaml_type(value)}")
        if minimum is not None and value < minimum:
            self.fail(self._range_message(value, minimum, maximum))
        if maximum is not None and value > maximum:
            self.fail(self._range_message(value, minimum, maximum))
        return value

    @staticmethod
    def _range_message(value: int, minimum: int | None, maximum: int | None) -> str:
        if minimum is not None and maximum is not None:
            return f"{value} is out of range {minimum}..{maximum}"
        if minimum is not None:
            return f"{value} must be >= {minimum}"
        return f"{value} must be <= {maximum}"

    def seconds(self, *, allow_zero: bool = False) -> float:
        """A duration in seconds: a number > 0 (or >= 0), finite."""
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"expected a number of seconds, got {_yaml_type(value)}")
        try:
            seconds = float(value)
        except OverflowError:  # an integer too large for a float
            self.fail("must be a finite number of seconds")
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            self.fail("must be a finite number of seconds")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            self.fail(f"{value} must be {'>= 0' if allow_zero else '> 0'} seconds")
        return seconds

    def choice(self, options: Sequence[str]) -> str:
        value = self.as_str()
        if value not in options:
            self.fail(f"{value!r} is not one of {', '.join(options)}{did_you_mean(value, options)}")
        return value

    def matching(self, pattern: re.Pattern[str], what: str) -> str:
        value = self.as_str()
        if not pattern.fullmatch(value):
            self.fail(f"{value!r} is not {what}")
        return value

    def port(self) -> int:
        return self.as_int(1, 65535)

    def ip(self) -> str:
        """An IP address literal, returned in canonical (compressed) form."""
        value = self.as_str()
        canonical = canonical_ip(value)
        if canonical is None:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address")
        return canonical

    def hostname(self) -> str:
        value = self.as_str()
        if not is_hostname(value):
            self.fail(f"{value!r} is not a valid hostname")
        return value.lower()

    def host(self) -> str:
        """A hostname or an IP literal (IPs canonicalised, names lower-cased)."""
        value = self.as_str()
        canonical = canonical_ip(value)
        if canonical is not None:
            return canonical
        if not is_hostname(value):
            self.fail(f"{value!r} is neither an IP address nor a valid hostname")
        return value.lower()

    def list_of(self, item: Callable[[Node], T], *, nonempty: bool = False) -> list[T]:
        items = self.sequence()
        if nonempty and not items:
            self.fail("must not be empty")
        return [item(n) for n in items]

    def unique_list_of(self, item: Callable[[Node], T], *, nonempty: bool = False) -> list[T]:
        """Like `list_of`, rejecting a repeated value (pointing at the repeat)."""
        nodes = self.sequence()
        if nonempty and not nodes:
            self.fail("must not be empty")
        out: list[T] = []
        first_line: dict[Any, int] = {}
        for n in nodes:
            value = item(n)
            if value in first_line:
                n.fail(f"duplicate value {value!r} (first at line {first_line[value]})")
            first_line[value] = n.line
            out.append(value)
        return out


@dataclass(frozen=True)
class YamlNode(Node):
    """A cursor on one node of PyYAML's node tree: every value knows its line."""

    node: yaml.Node
    file: str
    path: str
    constructor: SafeConstructor

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == "tag:yaml.org,2002:null"

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.node, MappingNode)

    def keyed(self) -> list[tuple[str, Node]]:
        return [
            (key, KeyedNode(value_node, self.file, self.child_path(key), self.constructor, line))
            for key, line, value_node in self._pairs()
        ]

    def _pairs(self, seen: frozenset[int] = frozenset()) -> list[tuple[str, int, yaml.Node]]:
        """(key, key line, value node) of a mapping, YAML merge keys (``<<``) resolved.

        Same precedence as SafeLoader (the mapping's own keys win over merged
        ones, earlier merged mappings over later ones), but without mutating the
        node tree, and a key repeated among the mapping's own keys is an error
        (SafeLoader silently keeps the last).
        """
        self._check_tag()
        if not isinstance(self.node, MappingNode):
            self.fail(f"expected a mapping, got {self._describe()}")
        if id(self.node) in seen:  # an anchor merged into itself
            self.fail("recursive merge key (<<)")
        seen = seen | {id(self.node)}
        own: dict[str, tuple[str, int, yaml.Node]] = {}
        merges: list[YamlNode] = []
        for key_node, value_node in self.node.value:
            if key_node.tag == _MERGE_TAG:
                merges.extend(self._merge_sources(value_node))
                continue
            key = self._key(key_node)
            line = int(key_node.start_mark.line) + 1
            if key in own:
                raise ConfigError(
                    self.file,
                    line,
                    self.child_path(key),
                    f"duplicate key (first at line {own[key][1]})",
                )
            own[key] = (key, line, value_node)
        merged: dict[str, tuple[str, int, yaml.Node]] = {}
        for source in merges:
            for key, line, value_node in source._pairs(seen):
                merged.setdefault(key, (key, line, value_node))
        return list(own.values()) + [v for k, v in merged.items() if k not in own]

    def _merge_sources(self, value: yaml.Node) -> list[YamlNode]:
        items = value.value if isinstance(value, SequenceNode) else [value]
        if not all(isinstance(item, MappingNode) for item in items):
            self.fail("a merge key (<<) takes a mapping or a list of mappings")
        return [YamlNode(item, self.file, self.path, self.constructor) for item in items]

    def sequence(self) -> list[Node]:
        self._check_tag()
        if not isinstance(self.node, SequenceNode):
            self.fail(f"expected a list, got {self._describe()}")
        return [
            YamlNode(item, self.file, f"{self.path}[{i}]", self.constructor)
            for i, item in enumerate(self.node.value)
        ]

    def _check_tag(self) -> None:
        # Collections are walked, never constructed, so an explicit tag such as
        # !!python/object or !!set would otherwise be silently ignored.  (Scalar tags
        # are checked by the SafeLoader constructor.)
        if not isinstance(self.node, ScalarNode) and self.node.tag not in (_MAP_TAG, _SEQ_TAG):
            self.fail(f"unsupported YAML tag {self.node.tag!r}")

    def _key(self, key_node: yaml.Node) -> str:
        key = self._construct(key_node) if isinstance(key_node, ScalarNode) else key_node
        if not isinstance(key, str):
            kind = _yaml_type(key) if isinstance(key_node, ScalarNode) else _node_kind(key_node)
            raise ConfigError(
                self.file,
                int(key_node.start_mark.line) + 1,
                self.field,
                f"keys must be strings, got {kind}",
            )
        return key

    def _construct(self, node: yaml.Node) -> Any:
        if node.tag == _STR_TAG and isinstance(node, ScalarNode):
            return node.value  # what SafeConstructor.construct_yaml_str returns, sooner
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.fail(f"invalid YAML value: {exc.problem}")

    def _describe(self) -> str:
        if isinstance(self.node, ScalarNode):
            return _yaml_type(self._construct(self.node))
        return _node_kind(self.node)

    def scalar(self) -> Any:
        if not isinstance(self.node, ScalarNode):
            self.fail(f"expected a single value, got {_node_kind(self.node)}")
        return self._construct(self.node)

    def plain(self) -> Any:
        if isinstance(self.node, MappingNode):
            return freeze({k: v.plain() for k, v in self.free_mapping().items()})
        if isinstance(self.node, SequenceNode):
            return tuple(n.plain() for n in self.sequence())
        return self.scalar()


@dataclass(frozen=True)
class KeyedNode(YamlNode):
    """A mapping value that knows its key's line.

    Errors about a value point at its key: for a block mapping or list the
    value itself starts on the next line, but ``tls:`` is what the user wrote.
    """

    key_line: int = 0

    @property
    def line(self) -> int:
        return self.key_line


class PlainNode(Node):
    """A cursor on plain data (`read_plain`): no positions, so any error on it is only a
    signal to re-read the file with them (`with_positions`), never reported as it is."""

    __slots__ = ("file", "path", "value")

    def __init__(self, value: Any, file: str, path: str) -> None:
        self.value = value
        self.file = file
        self.path = path

    @property
    def line(self) -> int:
        return 0  # unknown: errors raised here are re-raised from the positioned re-read

    def fail(self, message: str) -> NoReturn:
        raise NeedsPositions(self.file, None, self.field, message)

    @property
    def is_null(self) -> bool:
        return self.value is None

    @property
    def is_mapping(self) -> bool:
        return type(self.value) is dict

    def keyed(self) -> list[tuple[str, Node]]:
        if type(self.value) is not dict:
            self.fail("expected a mapping")
        file, child = self.file, self.child_path
        return [(k, PlainNode(v, file, child(k))) for k, v in self.value.items()]

    def sequence(self) -> list[Node]:
        if type(self.value) is not list:
            self.fail("expected a list")
        file, path = self.file, self.path
        return [PlainNode(v, file, f"{path}[{i}]") for i, v in enumerate(self.value)]

    def scalar(self) -> Any:
        if type(self.value) in (dict, list):
            self.fail("expected a single value")
        return self.value

    def plain(self) -> Any:
        return plain_frozen(self.value)


def plain_frozen(value: Any) -> Any:
    """Plain data as `Node.plain` gives it: mappings frozen, lists as tuples."""
    if type(value) is dict:
        return freeze({k: plain_frozen(v) for k, v in value.items()})
    if type(value) is list:
        return tuple(plain_frozen(v) for v in value)
    return value


class NeedsPositions(ConfigError):
    """Raised on plain data (`PlainNode`): the value is wrong, or something this fast
    path does not read; the caller re-reads the file with positions, and that read
    raises the error users see (or accepts the file)."""


def is_hostname(value: str) -> bool:
    """RFC 1123 hostname: dot-separated labels of letters, digits and inner hyphens."""
    if not value or len(value) > 253 or value.endswith("."):
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in value.split("."))


def parse_text(text: str, file: str) -> Node:
    """Compose YAML text into a root `Node`; syntax errors become a `ConfigError`."""
    try:
        root = _compose(text, file)
        if root is not None and "*" in text:  # without an alias nothing expands or loops
            _check_expansion(root, file)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(file, _mark_line(exc), YAML_FIELD, _yaml_message(exc)) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character in the stream
        raise ConfigError(file, None, YAML_FIELD, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(file, None, YAML_FIELD, TOO_DEEP) from None
    if root is None:
        raise ConfigError(file, 1, ROOT_FIELD, "file is empty")
    return YamlNode(root, file, "", SafeConstructor())


def _compose(text: str, file: str) -> yaml.Node | None:
    """The node tree, through libyaml when possible, refusing too many values first.

    The pure-Python loader stays the reference: it reads anything libyaml cannot take
    (characters its reader refuses), and it re-reads a file libyaml rejects, so that an
    error message is the same word for word whichever parser PyYAML has here.  Except for
    a file past the value bound: re-reading that in pure Python would cost what the bound
    is there to prevent, so libyaml's own message is reported."""
    loader = _FAST_LOADER
    if loader is None or Reader.NON_PRINTABLE.search(text):
        loader = yaml.SafeLoader
    big = _node_bound(text) > _MAX_NODES
    try:
        if big:
            _count_nodes(text, file, loader)
        return yaml.compose(text, Loader=loader)
    except yaml.YAMLError:
        if loader is yaml.SafeLoader or big:
            raise
    return yaml.compose(text, Loader=yaml.SafeLoader)  # raises the reference error


def _node_bound(text: str) -> int:
    """An upper bound on the values in ``text``, in a few fast passes over it: every value
    but the root comes after one of these indicators (a key and its value share a ``:``)."""
    return 1 + 2 * sum(text.count(c) for c in ":,-[{?")


def _count_nodes(text: str, file: str, loader: type[yaml.SafeLoader]) -> None:
    """Parse events only (no tree) and refuse at the first value past `_MAX_NODES`."""
    parser = loader(text)
    try:
        count = 0
        while parser.check_event():
            event = parser.get_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            if isinstance(event, _NODE_EVENTS):
                count += 1
                if count > _MAX_NODES:
                    mark = event.start_mark
                    line = int(mark.line) + 1 if mark is not None else None
                    raise ConfigError(
                        file,
                        line,
                        YAML_FIELD,
                        f"too many values: more than {_MAX_NODES} (a config or seed list "
                        "has far fewer; split the list)",
                    )
    finally:
        parser.dispose()


TOO_DEEP = "invalid YAML: nested too deeply"


def _check_expansion(root: yaml.Node, file: str) -> None:
    """Refuse a recursive alias, and aliases expanding past `_MAX_EXPANDED_NODES` values.

    Sizes are memoised per node, so this costs one pass over the file as written.
    """
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node, merged: bool = False) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            what = "recursive merge key (<<)" if merged else "an alias refers to itself"
            line = int(node.start_mark.line) + 1
            raise ConfigError(file, line, YAML_FIELD, f"invalid YAML: {what}")
        visiting.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(item, merged) for item in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v, k.tag == _MERGE_TAG) for k, v in node.value)
        visiting.discard(key)
        sizes[key] = min(total, _MAX_EXPANDED_NODES + 1)
        return sizes[key]

    if size(root) > _MAX_EXPANDED_NODES:
        raise ConfigError(
            file,
            None,
            YAML_FIELD,
            f"invalid YAML: aliases expand to more than {_MAX_EXPANDED_NODES} values",
        )


def parse_file(path: Path, file: str | None = None, *, plain: bool = False) -> Node:
    """Read and compose a YAML file; missing, unreadable, non-regular (a FIFO would block
    forever) or non-UTF-8 files are errors.  ``plain``: a `PlainNode` where `read_plain`
    can read the file (see `with_positions`), else a `YamlNode` as without it."""
    shown = file if file is not None else str(path)
    try:
        data = _read_regular(path, shown)
    except FileNotFoundError:
        raise ConfigError(shown, None, FILE_FIELD, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(shown, None, FILE_FIELD, "is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(shown, None, FILE_FIELD, f"cannot read: {exc.strerror}") from None
    if len(data) > _MAX_BYTES:
        raise ConfigError(shown, None, FILE_FIELD, f"larger than {_MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(shown, line, FILE_FIELD, "not UTF-8 text") from None
    if plain:
        return parse_plain(text, shown)
    return parse_text(text, shown)


def parse_plain(text: str, file: str) -> Node:
    """A `PlainNode` over ``text`` where `read_plain` reads it, else `parse_text`'s node."""
    value = read_plain(text)
    if value is _UNREAD:
        return parse_text(text, file)
    return PlainNode(value, file, "")


def with_positions(decode: Callable[[bool], T]) -> T:
    """``decode(True)``, reading files as plain data (`parse_file`'s ``plain``); if that
    raises any `ConfigError`, ``decode(False)``, which reads them with positions.

    Plain data costs a third of PyYAML's node tree to read and walk, but knows no
    lines.  A valid file gives the same value either way (both walks share every check
    in `Node`); a wrong one fails the plain walk, and the positioned walk then raises
    the error as users see it: file, line and field, the same words whichever walk ran.
    """
    try:
        return decode(True)
    except (ConfigError, RecursionError):
        pass
    return decode(False)


_UNREAD: Any = object()  # read_plain's answer for a file it leaves to the node tree
_SCALAR_TAGS = frozenset(
    {
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
    }
)


class _Unread(Exception):
    """Something `read_plain` leaves to the node tree."""


def read_plain(text: str) -> Any:
    """One YAML document as plain data (dicts, lists, scalars as SafeLoader constructs
    them), read from libyaml's parse events without PyYAML's node tree; `_UNREAD` for
    anything beyond the common subset, which the node tree then reads (and judges):

    no libyaml, characters its reader refuses, more than `_MAX_NODES` values (counted as
    they are read; the node tree then refuses the file, with its line), a syntax error,
    more or less than one document, anchors and aliases, merge keys, explicit tags, keys
    that are not strings or are repeated, and scalars other than strings, null, booleans,
    integers and floats.  What it reads, it reads as
    ``yaml.compose`` and `YamlNode.scalar` would (the same resolver and constructors).
    """
    loader_class = _FAST_LOADER
    if loader_class is None or Reader.NON_PRINTABLE.search(text):
        return _UNREAD
    loader = loader_class(text)
    try:
        return _read_events(loader)
    except (_Unread, yaml.YAMLError):
        return _UNREAD
    finally:
        loader.dispose()


def _read_events(loader: yaml.SafeLoader) -> Any:
    # The hot loop of a config load (a value per event): the open collection, the key
    # awaiting its value (in a mapping) and the enclosing ones are kept in locals.
    get: Callable[[], Any] = loader.get_event
    scalars: dict[str, Any] = {}  # plain scalar text -> value: most values repeat
    stack: list[Any] = []  # the enclosing collections
    container: Any = None  # the open collection: a dict, a list, or None (none yet)
    key: str | None = None
    left = _MAX_NODES  # values still admitted
    if type(get()) is not StreamStartEvent or type(get()) is not DocumentStartEvent:
        raise _Unread
    while True:
        event = get()
        kind = type(event)
        if kind is ScalarEvent:
            left -= 1
            if event.tag is not None or event.anchor is not None or left < 0:
                raise _Unread
            value: Any = event.value
            if event.implicit[0]:  # plain: resolved (quoted and block scalars are strings)
                text = value
                value = scalars.get(text, _UNREAD)
                if value is _UNREAD:
                    value = scalars[text] = _plain_scalar(loader, text)
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            left -= 1
            if event.tag is not None or event.anchor is not None or left < 0:
                raise _Unread
            value = {} if kind is MappingStartEvent else []
            if container is not None:
                _attach(container, key, value)
                stack.append(container)
            container, key = value, None
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            if not stack:
                value = container
                break
            container, key = stack.pop(), None  # the closed one was the value of its key
            continue
        else:  # an alias, or a document end where a value should be
            raise _Unread
        if container is None:
            break  # a document that is one scalar
        if type(container) is list:
            container.append(value)
        elif key is None:
            if type(value) is not str or value in container:
                raise _Unread  # a key not a string, or repeated: the node tree's error
            key = value
        else:
            container[key] = value
            key = None
    if type(get()) is not DocumentEndEvent or type(get()) is not StreamEndEvent:
        raise _Unread  # a second document: the node tree's error
    return value


def _attach(container: Any, key: str | None, value: Any) -> None:
    """A collection just opened, put where it goes in ``container``."""
    if type(container) is list:
        container.append(value)
    elif key is None:
        raise _Unread  # a collection as a key: the node tree's error
    else:
        container[key] = value


def _plain_scalar(loader: yaml.SafeLoader, text: str) -> Any:
    """An unquoted scalar as the composer tags it and SafeConstructor builds it."""
    implicit = loader.yaml_implicit_resolvers
    if text[:1] not in implicit and None not in implicit:
        return text  # no implicit type starts with this character: resolve() says str
    tag = loader.resolve(ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    if tag == _STR_TAG:
        return text
    if tag not in _SCALAR_TAGS:  # a timestamp, a merge key, a value key (=)
        raise _Unread
    node = ScalarNode(tag, text)
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise _Unread from None


def _read_regular(path: Path, shown: str) -> bytes:
    """Up to `_MAX_BYTES` + 1 bytes of a regular file.  Opened without blocking and checked
    before reading: a FIFO or a device would hang check-config and a reload."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):
            raise ConfigError(shown, None, FILE_FIELD, "not a regular file")
        return fh.read(_MAX_BYTES + 1)


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return int(mark.line) + 1 if mark is not None else None


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or "syntax error"
    if exc.context:
        return f"invalid YAML: {problem} ({exc.context})"
    return f"invalid YAML: {problem}"
