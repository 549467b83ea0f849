"""Rich renderables for `dyn top`, drawn from a DashboardView as it is.

Only the rows that fit the terminal are turned into table rows (a 576-worker
rack draws ~40), so a frame costs the same at any scale. With no height
(`--once`, a pipe) every row is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from dyn.dashboard.view import DashboardView, Header, WorkerRow, visible_window

STATE_STYLE = {"ready": "green", "loading": "yellow", "starting": "yellow", "launching": "cyan",
               "failed": "bold red", "gave_up": "bold red", "stopping": "magenta", "draining": "magenta"}
_MAX_DOMAINS = 8


@dataclass(frozen=True, slots=True)
class Screen:
    """What the operator is looking at: selection and, after enter, one worker's details."""

    selected: int = 0
    height: int | None = None
    """Terminal rows; None draws every worker (no terminal)."""
    detail: Mapping[str, Any] | None = None
    """The selected worker's raw status entry (enter), shown instead of the domain list."""
    detail_log: str = ""


def render_frame(view: DashboardView, screen: Screen = Screen()) -> RenderableType:
    parts: list[RenderableType] = [header_text(view.header)]
    side = _side_panels(view, screen)
    side_lines = _lines(side)
    if screen.height is None:
        window = range(len(view.rows))
    else:
        budget = screen.height - 3 - side_lines - 2 * len(view.roles()) - 1
        window = visible_window(len(view.rows), screen.selected, max(budget, 3))
    parts += worker_tables(view.rows, window, screen.selected if screen.height is not None else None)
    if screen.height is not None and len(window) < len(view.rows):
        parts.append(Text(f"  rows {window.start + 1}-{window.stop} of {len(view.rows)}  "
                          "(arrows/tab select, enter details, q quit)", style="dim"))
    parts += side
    return Group(*parts)


def header_text(h: Header) -> Text:
    text = Text()
    text.append(f"{h.name}", style="bold")
    text.append(f"  {h.state}", style="green" if h.state == "running" else "yellow")
    text.append(f"  up {_duration(h.uptime_s)}  ready {h.num_ready}/{h.num_processes}\n")
    text.append(f"req/s {_num(h.requests_per_s)}  tok/s {_num(h.tokens_per_s)}  "
                f"hit {_pct(h.hit_rate)}  ")
    text.append("TTFT ")
    _latency(text, h.ttft_p50_s, h.ttft_p99_s, h.ttft_target_s)
    text.append("  ITL ")
    _latency(text, h.itl_p50_s, h.itl_p99_s, h.itl_target_s)
    text.append("  (1 min)", style="dim")
    if h.error:
        text.append(f"\n{h.error}", style="red")
    return text


def worker_tables(rows: tuple[WorkerRow, ...], window: range, selected: int | None) -> list[Table]:
    tables: list[Table] = []
    current: Table | None = None
    role = None
    for idx in window:
        row = rows[idx]
        if row.role != role:
            role = row.role
            total = sum(1 for r in rows if r.role == role)
            current = _table(f"{role} ({total})")
            tables.append(current)
        style = STATE_STYLE.get(row.state, "")
        util = "-" if row.util is None else (f"{100 * row.util:.0f}%" + ("" if row.util_source == "gpu" else " cpu"))
        current.add_row(escape(row.id), escape(row.node), row.gpus, Text(row.state, style=style), util,
                        _kv(row),
                        _int(row.queue), _int(row.running), _num(row.tokens_per_s), _pct(row.hit_rate),
                        str(row.restarts), style="reverse" if idx == selected else None)
    return tables


def detail_panel(entry: Mapping[str, Any], log_text: str) -> list[RenderableType]:
    out: list[RenderableType] = [Text(f"{entry.get('id')}  {entry.get('role')} on {entry.get('node')}  "
                                      f"pid {entry.get('pid')}  {entry.get('state')}", style="bold")]
    metrics = dict(entry.get("metrics") or {})
    items = [f"{k}={_short(v)}" for k, v in sorted(metrics.items())]
    for i in range(0, len(items), 4):
        out.append(Text("  " + "  ".join(items[i:i + 4])))
    for key in ("addresses", "error", "last_failure"):
        if entry.get(key):
            out.append(Text(f"  {key}: {entry[key]}"))
    tail = log_text or entry.get("log_tail") or ""
    if tail:
        out.append(Text("last log lines:", style="bold"))
        out += [Text("  " + line, style="dim") for line in tail.splitlines()[-8:]]
    return out


def _side_panels(view: DashboardView, screen: Screen) -> list[RenderableType]:
    if screen.detail is not None:
        return detail_panel(screen.detail, screen.detail_log)
    out: list[RenderableType] = []
    if view.domains:
        table = _domain_table()
        shown = view.domains if screen.height is None else view.domains[:_MAX_DOMAINS]
        for d in shown:
            table.add_row(escape(d.name), str(d.num_workers), str(d.num_gpus), _pct(d.mean_util),
                          f"{d.intra_gbps:.2f}", f"{d.out_gbps:.2f}")
        if len(shown) < len(view.domains):
            table.caption = f"{len(view.domains) - len(shown)} more domains"
        out.append(table)
    out.append(Text("planner: " + ("; ".join(view.decisions[-3:]) if view.decisions else "no decisions yet"),
                    style="dim" if not view.decisions else ""))
    if view.errors:
        out.append(Text("errors:", style="bold red"))
        out += [Text("  " + e, style="red") for e in view.errors]
    return out


def _table(title: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False,
                  expand=False)
    for name, justify in (("worker", "left"), ("node", "left"), ("gpus", "left"), ("state", "left"),
                          ("util", "right"), ("kv", "left"), ("queue", "right"), ("run", "right"),
                          ("tok/s", "right"), ("hit", "right"), ("rst", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    return table


def _domain_table() -> Table:
    table = Table(title="NVLink domains (shuttle GB/s)", title_justify="left", title_style="bold", box=None,
                  pad_edge=False)
    for name in ("domain", "workers", "gpus", "util", "inside", "out"):
        table.add_column(name, justify="left" if name == "domain" else "right", no_wrap=True)
    return table


def _kv(row: WorkerRow) -> Text:
    if row.kv_usage is None:
        return Text("-")
    text = Text(row.kv_bar, style="cyan")
    text.append(f"{_pct(row.kv_usage):>5}")
    return text


def _lines(parts: list[RenderableType]) -> int:
    n = 0
    for part in parts:
        if isinstance(part, Table):
            n += 2 + part.row_count + (1 if part.caption else 0)
        else:
            n += 1 + str(part).count("\n")
    return n


def _latency(text: Text, p50: float | None, p99: float | None, target: float | None) -> None:
    text.append(f"p50 {_ms(p50)} p99 ")
    over = target is not None and p99 is not None and p99 > target
    text.append(_ms(p99), style="bold red" if over else ("green" if p99 is not None and target else ""))
    if target is not None:
        text.append(f" / {_ms(target)}", style="dim")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}k" if value >= 10000 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


UNCUT_WIDTH = 10_000
"""Room for a table's natural width where output is not a terminal."""


def print_whole(console: Console, renderable: RenderableType) -> None:
    """Print a table uncut. On a terminal at its width; elsewhere (a pipe, a file, ssh without a
    tty) Rich assumes 80 columns and would cut cells with an ellipsis, lost to grep and logs, so
    there it is as wide as its rows need."""
    if console.is_terminal:
        console.print(renderable)
        return
    natural = Measurement.get(console, console.options.update_width(UNCUT_WIDTH), renderable).maximum
    width = console.width  # (print's own width argument is capped at the console's)
    console.width = max(width, natural)
    try:
        console.print(renderable)
    finally:
        console.width = width
