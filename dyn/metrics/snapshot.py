"""Heartbeat figures -> Prometheus families, from one table of names.

Workers already gather a flat `{key: value}` dict for their heartbeats (see
`dyn.worker.telemetry` for the keys). The same dict, read at scrape time,
feeds Prometheus through `SnapshotCollector`, so the daemon, `dyn top` and a
Prometheus server all see the same numbers under documented names.

Keys come in two shapes:

    num_running              -> plain key, one sample
    gpu.3.memory_used_bytes  -> "<prefix>.<label value>.<field>" or
    shuttle_bytes.nvlink        "<prefix>.<label value>": one sample per label value
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One heartbeat key exposed as one Prometheus family."""

    key: str
    """Heartbeat key; for labelled specs the prefix ("gpu", "shuttle_bytes")."""
    name: str
    """Prometheus name; counters without `_total` (the family adds it)."""
    kind: Kind
    help: str
    scale: float = 1.0
    """Multiplier from the heartbeat unit to the exposed one (percent -> ratio: 0.01)."""
    label: str | None = None
    """Label filled from the key's middle part; None for plain keys."""
    field: str | None = None
    """For "<prefix>.<label>.<field>" keys: the field this spec exposes."""


Snapshot = Callable[[], Mapping[str, float]]
Labels = Callable[[], Mapping[str, str]]


class SnapshotCollector(Collector):
    """Yields the families of `specs` from the latest snapshot, labelled with `labels()`."""

    def __init__(self, specs: tuple[MetricSpec, ...], snapshot: Snapshot, labels: Labels) -> None:
        names = [s.name for s in specs]
        assert len(names) == len(set(names)), "duplicate metric names"
        self._specs = specs
        self._snapshot = snapshot
        self._labels = labels

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        values = self._snapshot()
        base = dict(self._labels())
        base_names, base_values = list(base), list(base.values())
        for spec in self._specs:
            label_names = base_names + ([spec.label] if spec.label else [])
            family = (CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily)(
                spec.name, spec.help, labels=label_names)
            for label_value, value in _matches(spec, values):
                extra = [label_value] if spec.label else []
                family.add_metric(base_values + extra, float(value) * spec.scale)
            if family.samples:
                yield family


def _matches(spec: MetricSpec, values: Mapping[str, float]) -> Iterator[tuple[str, float]]:
    if spec.label is None:
        if spec.key in values:
            yield "", values[spec.key]
        return
    prefix = spec.key + "."
    for key, value in values.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if spec.field is None:
            if "." not in rest:
                yield rest, value
        else:
            label_value, _, field = rest.rpartition(".")
            if field == spec.field and label_value:
                yield label_value, value
