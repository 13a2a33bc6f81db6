"""The Prometheus text format (0.0.4) for our own collector, several times faster than
`prometheus_client.generate_latest`.

``generate_latest`` validates and escapes every label *name* of every sample (they are
constants of our code) and formats each sample through several layers of calls: at 5,000
endpoints (60,000 series) a scrape took 8 s of CPU on a busy 2-core machine.  This writes
byte-for-byte the same exposition (tested against ``generate_latest``) for the metric
families our collector yields: no timestamps, no OpenMetrics-only samples (``_created``).
"""

from __future__ import annotations

import re

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["escape_label", "family_lines", "format_value", "text_exposition"]

_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "info": "gauge"}
_SUFFIX = {"counter": "_total", "info": "_info"}
_SPECIAL = re.compile(r'[\\"\n]')


def escape_label(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def format_value(v: float) -> str:
    # The common cases first: counts and 0/1 gauges are whole numbers.
    if v == 0:
        return "0.0"
    if v == 1:
        return "1.0"
    return str(floatToGoString(v))


def _template(keys: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    order = tuple(sorted(keys))
    return order, ",".join(f'{k}="{{}}"' for k in order)


def family_lines(metric: Metric, out: list[str], *, header: bool = True) -> None:
    """Append the lines of one metric family to ``out``; ``header=False``: samples only."""
    if header:
        name = metric.name + _SUFFIX.get(metric.type, "")
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES.get(metric.type, 'untyped')}\n")
    # Every sample of a family has one of a few label sets (a histogram adds "le" to its
    # buckets): one format template per label set, in sorted label order.
    templates: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {}
    for s in metric.samples:
        if s.timestamp is not None or s.exemplar is not None:
            raise ValueError(f"{s.name}: timestamps and exemplars are not written here")
        labels = s.labels
        if not labels:
            out.append(f"{s.name} {format_value(s.value)}\n")
            continue
        keys = tuple(labels)
        found = templates.get(keys)
        if found is None:
            found = templates[keys] = _template(keys)
        order, template = found
        values = [labels[k] for k in order]
        if _SPECIAL.search("".join(values)):
            values = [escape_label(v) for v in values]
        out.append(f"{s.name}{{{template.format(*values)}}} {format_value(s.value)}\n")


def text_exposition(collector: Collector) -> bytes:
    """The exposition of ``collector`` (a registry or a collector)."""
    out: list[str] = []
    for metric in collector.collect():
        family_lines(metric, out)
    return "".join(out).encode()
