"""The `dyn top` view model: status payload (+ frontend latency samples) -> rows, bars, aggregates.

Pure: no I/O, no rich. `Tracker` keeps the one-minute windows between
frames; `build_view` turns one payload into a `DashboardView` the renderer
draws as it is. Everything shown is computed here, so it is unit-tested
without a terminal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from dyn.config.ranges import compact_ranges
from dyn.dashboard.history import Buckets, CounterWindow, HistogramWindow

ROLE_ORDER = ("prefill", "decode", "both", "frontend")
BAR_WIDTH = 8
_INTRA_DOMAIN_PATHS = ("nvlink", "cuda_ipc", "same_gpu", "local")
_FAILED_STATES = ("failed", "gave_up")


@dataclass(frozen=True, slots=True)
class FrontendSample:
    """What the frontend's /metrics said at one instant (cumulative)."""

    ttft: Buckets | None = None
    itl: Buckets | None = None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    id: str
    role: str
    node: str
    gpus: str
    state: str
    util: float | None
    """GPU busy share (0..1, mean over its GPUs), or None."""
    util_source: str
    """"gpu" or "cpu" (then util is cores busy, 1.0 = one core)."""
    kv_usage: float | None
    kv_bar: str
    queue: int | None
    running: int | None
    tokens_per_s: float | None
    hit_rate: float | None
    restarts: int
    heartbeat_age_s: float | None


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    state: str
    uptime_s: float
    num_ready: int
    num_processes: int
    requests_per_s: float | None
    tokens_per_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    ttft_target_s: float | None
    itl_target_s: float | None
    hit_rate: float | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class DomainRow:
    name: str
    num_workers: int
    num_gpus: int
    mean_util: float | None
    intra_gbps: float
    """Shuttle traffic staying inside the domain (NVLink / CUDA IPC)."""
    out_gbps: float
    """Shuttle traffic leaving it (shm, RDMA, TCP), by the senders in this domain."""


@dataclass(frozen=True, slots=True)
class DashboardView:
    header: Header
    rows: tuple[WorkerRow, ...]
    """Every process, grouped by role in ROLE_ORDER (the renderer windows them)."""
    domains: tuple[DomainRow, ...]
    decisions: tuple[str, ...]
    errors: tuple[str, ...]

    def roles(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for row in self.rows:
            counts[row.role] += 1
        return dict(counts)


@dataclass(slots=True)
class Tracker:
    """One-minute windows kept across frames (request rate, tokens/s, hit rate, latencies)."""

    window_s: float = 60.0
    requests: CounterWindow = field(init=False)
    tokens: CounterWindow = field(init=False)
    hits: CounterWindow = field(init=False)
    lookups: CounterWindow = field(init=False)
    ttft: HistogramWindow = field(init=False)
    itl: HistogramWindow = field(init=False)

    def __post_init__(self) -> None:
        self.requests, self.tokens = CounterWindow(self.window_s), CounterWindow(self.window_s)
        self.hits, self.lookups = CounterWindow(self.window_s), CounterWindow(self.window_s)
        self.ttft, self.itl = HistogramWindow(self.window_s), HistogramWindow(self.window_s)

    def observe(self, payload: Mapping[str, Any], frontend: FrontendSample | None, now: float) -> None:
        workers = payload.get("workers") or []
        engines = [w for w in workers if w.get("role") != "frontend"]
        fronts = [w for w in workers if w.get("role") == "frontend"]
        if fronts:
            self.requests.add(now, sum(_metric(w, "requests_total") or 0.0 for w in fronts))
        self.tokens.add(now, sum(_metric(w, "num_generated_tokens") or 0.0 for w in engines))
        self.hits.add(now, sum(_metric(w, "prefix_hit_blocks") or 0.0 for w in engines))
        self.lookups.add(now, sum(_metric(w, "prefix_lookup_blocks") or 0.0 for w in engines))
        if frontend is not None and frontend.ttft is not None:
            self.ttft.add(now, frontend.ttft)
        if frontend is not None and frontend.itl is not None:
            self.itl.add(now, frontend.itl)


def build_view(payload: Mapping[str, Any], tracker: Tracker) -> DashboardView:
    workers = list(payload.get("workers") or [])
    rank = {role: i for i, role in enumerate(ROLE_ORDER)}
    workers.sort(key=lambda w: (rank.get(str(w.get("role")), len(ROLE_ORDER)), str(w.get("role")),
                                _natural(str(w.get("id")))))
    slo = payload.get("slo") or {}
    hits, lookups = tracker.hits.rate(), tracker.lookups.rate()
    header = Header(
        name=str(payload.get("name", "?")), state=str(payload.get("state", "?")),
        uptime_s=float(payload.get("uptime_s") or 0.0),
        num_ready=sum(1 for w in workers if w.get("state") == "ready"), num_processes=len(workers),
        requests_per_s=tracker.requests.rate(), tokens_per_s=tracker.tokens.rate(),
        ttft_p50_s=tracker.ttft.quantile(0.5), ttft_p99_s=tracker.ttft.quantile(0.99),
        itl_p50_s=tracker.itl.quantile(0.5), itl_p99_s=tracker.itl.quantile(0.99),
        ttft_target_s=_ms_to_s(slo.get("ttft_ms")), itl_target_s=_ms_to_s(slo.get("itl_ms")),
        hit_rate=hits / lookups if hits is not None and lookups else None,
        error=str(payload.get("error") or ""))
    rows = tuple(worker_row(w) for w in workers)
    return DashboardView(header, rows, domain_rows(workers), _decisions(payload), _errors(payload, workers))


def worker_row(w: Mapping[str, Any]) -> WorkerRow:
    gpus = [int(g) for g in w.get("gpus") or []]
    utils = [u for g in gpus if (u := _metric(w, f"gpu.{g}.util_percent")) is not None]
    if utils:
        util, source = sum(utils) / len(utils) / 100.0, "gpu"
    else:
        cpu = _metric(w, "cpu_percent")
        util, source = (None if cpu is None else cpu / 100.0), "cpu"
    kv = _metric(w, "kv_usage")
    queue, running = _metric(w, "num_waiting"), _metric(w, "num_running")
    age = w.get("heartbeat_age_s")
    return WorkerRow(
        id=str(w.get("id")), role=str(w.get("role")), node=str(w.get("node", "")), gpus=compact_ranges(gpus) or "-",
        state=str(w.get("state")), util=util, util_source=source, kv_usage=kv,
        kv_bar=bar(kv) if kv is not None else "", queue=None if queue is None else int(queue),
        running=None if running is None else int(running), tokens_per_s=_metric(w, "tokens_per_s"),
        hit_rate=_metric(w, "prefix_hit_rate"), restarts=int(w.get("restarts") or 0),
        heartbeat_age_s=None if age is None else float(age))


def domain_rows(workers: list[Mapping[str, Any]]) -> tuple[DomainRow, ...]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for w in workers:
        if w.get("role") == "frontend":
            continue
        groups[str(w.get("domain") or f"{w.get('node', '?')} (no NVLink)")].append(w)
    out = []
    for name in sorted(groups, key=_natural):
        members = groups[name]
        utils = [r.util for r in map(worker_row, members) if r.util is not None and r.util_source == "gpu"]
        intra = out_gbps = 0.0
        for w in members:
            for key, value in (w.get("metrics") or {}).items():
                if key.startswith("shuttle_gbps."):
                    if key[len("shuttle_gbps."):] in _INTRA_DOMAIN_PATHS:
                        intra += value
                    else:
                        out_gbps += value
        out.append(DomainRow(name, len(members), sum(len(w.get("gpus") or []) for w in members),
                             sum(utils) / len(utils) if utils else None, intra, out_gbps))
    return tuple(out)


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A fixed-width bar in eighths of a cell: 0.5 -> '█████     '."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")
    return text.ljust(width)


def visible_window(num_rows: int, selected: int, height: int) -> range:
    """Rows to draw so that `selected` stays visible: only these are rendered (576 workers)."""
    if height <= 0 or num_rows <= 0:
        return range(0)
    if num_rows <= height:
        return range(num_rows)
    start = min(max(0, selected - height // 2), num_rows - height)
    return range(start, start + height)


def _decisions(payload: Mapping[str, Any]) -> tuple[str, ...]:
    decisions = payload.get("decisions")
    if decisions:
        return tuple(_decision_text(d) for d in decisions[-5:])
    events = payload.get("events") or []
    picked = [e for e in events if "role ->" in e or "policy" in e or "scal" in e]
    return tuple(picked[-5:])


def _decision_text(d: Any) -> str:
    if not isinstance(d, Mapping):
        return str(d)
    n = d.get("num_workers")
    change = f"{d.get('action', '?')} {d.get('role') or ''}" + (f" x{n}" if isinstance(n, int) and n else "")
    return f"{change}: {d.get('reason', '')}".strip()


def _errors(payload: Mapping[str, Any], workers: list[Mapping[str, Any]]) -> tuple[str, ...]:
    out = [f"{w.get('id')} on {w.get('node')}: {w.get('error') or w.get('last_failure') or w.get('state')}"
           for w in workers if w.get("state") in _FAILED_STATES or w.get("error")]
    out += [e for e in payload.get("events") or [] if "failed" in e or "error" in e.lower()]
    return tuple(out[-6:])


def _metric(w: Mapping[str, Any], key: str) -> float | None:
    metrics = w.get("metrics")
    if isinstance(metrics, Mapping) and key in metrics:
        return float(metrics[key])
    value = w.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _ms_to_s(value: Any) -> float | None:
    return float(value) / 1000.0 if isinstance(value, (int, float)) else None


def _natural(text: str) -> tuple:
    """decode-10 after decode-9."""
    head, _, tail = text.rpartition("-")
    return (head, int(tail), "") if tail.isdigit() else (text, -1, text)
