"""libyaml and pure-Python PyYAML read a config the same way (issue 13 item 4).

`probe.config.strict_yaml` composes with libyaml's `CSafeLoader` where PyYAML has it and falls
back to the pure-Python `SafeLoader` only where it does not, and to re-read a file libyaml
rejects.  Both must give the same node tree (tags, values,
lines) and the same error, word for word.  The cost per endpoint is printed by
``bench/config_load.py`` (a smoke of it runs here).
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from yaml.nodes import MappingNode, SequenceNode

import probe.config.strict_yaml
from probe.agent_config import load_config
from probe.config.loader import ConfigError

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).parent / "testdata"
HAS_LIBYAML = probe.config.strict_yaml._FAST_LOADER is not None
needs_libyaml = pytest.mark.skipif(not HAS_LIBYAML, reason="PyYAML built without libyaml")

# Texts whose errors come from the YAML layer itself (syntax, reader, composer).
BROKEN = [
    "a: [1, 2\n",
    "a: b: c\n",
    "a:\n  - 1\n b: 2\n",
    "a: *nope\n",
    "a: &x 1\nb: &x 2\nc: *x\n",
    "a: 'unterminated\n",
    "a: \x07bell\n",
    "a: \ufeffb\n",
    "\t- x\n",
    "a: {b: 1, b: 2}\n",
    "- [" * 50 + "]" * 49 + "\n",
    "%YAML 9.9\n---\na: 1\n",
    "a: !!python/object:os.system ls\n",
    "--- a\n--- b\n",
]


def shape(node: yaml.Node) -> Iterator[tuple[object, ...]]:
    """Every node as (kind, tag, scalar value, line, column), depth first."""
    yield (type(node).__name__, node.tag, node.start_mark.line, node.start_mark.column)
    if isinstance(node, MappingNode):
        for key, value in node.value:
            yield from shape(key)
            yield from shape(value)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            yield from shape(item)
    else:
        yield (node.value,)


def yaml_files() -> list[Path]:
    seeds = [Path(str(p)) for p in (files("probe") / "seeds").iterdir() if p.name.endswith("yaml")]
    return sorted(TESTDATA.glob("*.yaml")) + seeds + [REPO / "configs" / "agent.yaml"]


def _is_yaml(path: Path) -> bool:
    try:
        yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return False  # an error file: compared by message in the tests below
    return True


@needs_libyaml
@pytest.mark.parametrize("path", [p for p in yaml_files() if _is_yaml(p)], ids=lambda p: p.name)
def test_libyaml_composes_the_same_tree_as_pure_python(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    reference = yaml.compose(text, Loader=yaml.SafeLoader)
    assert probe.config.strict_yaml._FAST_LOADER is not None
    fast = yaml.compose(text, Loader=probe.config.strict_yaml._FAST_LOADER)
    if reference is None:
        assert fast is None
    else:
        assert list(shape(fast)) == list(shape(reference))


def error_with(text: str, tmp_path: Path, fast: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(probe.config.strict_yaml, "_FAST_LOADER", None)
        with pytest.raises(ConfigError) as info:
            load_config(path)
    return str(info.value)


@needs_libyaml
@pytest.mark.parametrize("text", BROKEN)
def test_a_yaml_error_reads_the_same_with_or_without_libyaml(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = error_with(text, tmp_path, True, monkeypatch)
    assert fast == error_with(text, tmp_path, False, monkeypatch)


@needs_libyaml
@pytest.mark.parametrize("path", sorted(TESTDATA.glob("invalid-*.yaml")), ids=lambda p: p.name)
def test_every_invalid_testdata_error_is_the_same_without_libyaml(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def error() -> str:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        return str(info.value)

    fast = error()
    monkeypatch.setattr(probe.config.strict_yaml, "_FAST_LOADER", None)
    assert error() == fast


def test_the_config_load_bench_runs() -> None:
    """bench/config_load.py --smoke: the script keeps working and prints its figures."""
    done = subprocess.run(
        [sys.executable, "bench/config_load.py", "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "us/endpoint" in done.stdout and "pure Python" in done.stdout
    if HAS_LIBYAML:  # every figure: the load, with positions, pure Python, the parse alone
        for figure in ("plain data:", "with positions", "in pure Python", "parse alone"):
            assert figure in done.stdout, done.stdout


def _reference_host(value: str) -> str | None:
    """What `Node.host` gave before its IPv4 shortcut: ipaddress's canonical form."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


@example([5, 1, 2, 3], "0", 0)  # 05.1.2.3: leading zero
@example([1, 2, 3, 4], "0", 3)  # 1.2.3.04
@example([256, 1, 1, 1], "", 0)
@example([10, 0, 0, 1], "", 0)
@example([1, 2, 3], "", 0)
@given(
    st.lists(st.integers(0, 300), min_size=3, max_size=5),
    st.sampled_from(["", "0", "00"]),
    st.integers(0, 4),
)
def test_ipv4_shortcut_gives_what_ipaddress_gives(octets: list[int], pad: str, at: int) -> None:
    """`Node.ip` / `Node.host` take a canonical dotted quad as it is: the result, and which
    texts are refused, are ipaddress's (leading zeros, octets over 255, 3 or 5 parts)."""
    parts = [str(o) for o in octets]
    parts[at % len(parts)] = pad + parts[at % len(parts)]
    value = ".".join(parts)
    node = probe.config.strict_yaml.parse_text(f"h: '{value}'\n", "t.yaml").mapping(["h"])["h"]
    expected = _reference_host(value)
    if expected is None:
        with pytest.raises(ConfigError):
            node.ip()
    else:
        assert node.ip() == expected
        assert node.host() == expected
