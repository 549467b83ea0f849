"""`dyn status`: the deployment and each of its processes; also the rich tables `dyn up` shows."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from dyn.cli.render import errors_to_exit


_STATE_STYLE = {"ready": "green", "loading": "yellow", "starting": "yellow", "launching": "cyan",
                "failed": "red", "gave_up": "red", "stopping": "magenta", "draining": "magenta",
                "retiring": "magenta"}


def status(
    name: Optional[str] = typer.Option(None, "--name", help="Deployment (default: the only one)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a deployment's state, frontend URL and every process.

    Example: dyn status --json
    """
    from rich.console import Console
    from rich.markup import escape

    from dyn.dashboard.render import print_whole
    from dyn.deploy.inspect import resolve_name, status as get_status

    with errors_to_exit():
        payload = get_status(resolve_name(name))
    if as_json:
        typer.echo(json.dumps(payload, indent=1))
        return
    console = Console()
    console.print(f"[bold]{escape(payload['name'])}[/]: {payload['state']}  "
                  f"uptime {payload.get('uptime_s', 0):.0f} s  frontend {payload.get('frontend_url', '')}",
                  highlight=False)
    urls = payload.get("frontend_urls") or []
    replicas = payload.get("frontends") or []
    if len(urls) > 1 or len(replicas) > 1:
        console.print(f"frontends: {len(replicas)} replicas serving {', '.join(urls)}", highlight=False,
                      markup=False)
    if payload.get("error"):
        console.print(f"[red]{escape(payload['error'])}[/]", highlight=False)
    print_whole(console, progress_table(payload, detailed=True))
    for line in planner_lines(payload):
        console.print(line, highlight=False, markup=False)
    for event in payload.get("events", [])[-5:]:
        console.print(f"  {event}", highlight=False, markup=False)


def planner_lines(payload: dict[str, Any], num_decisions: int = 5) -> list[str]:
    """The planner (policy, last decisions with their inputs), open breakers and shuttle paths."""
    out: list[str] = []
    planner = payload.get("planner") or {}
    if planner:
        out.append(f"planner: {planner.get('policy', '')}")
        window = planner.get("window")
        if window:
            out.append(f"  last window: {window.get('request_rate', 0):.2f} req/s, "
                       f"{window.get('input_tokens', 0)} prompt / {window.get('output_tokens', 0)} output tokens, "
                       f"{window.get('num_waiting', 0)} waiting")
        decisions = [d for d in payload.get("decisions", []) if d.get("action") != "hold"][-num_decisions:]
        if decisions:
            out.append("  decisions:")
        for d in decisions:
            inputs = d.get("inputs") or {}
            before, after = d.get("before") or {}, d.get("after") or {}
            out.append(f"    {_clock(d.get('wall_time'))} {d.get('action')} {d.get('role')} x{d.get('num_workers')}: "
                       f"P{before.get('prefill')}/D{before.get('decode')} -> P{after.get('prefill')}/D{after.get('decode')}"
                       f" ({d.get('reason')}; rate {inputs.get('rate', '-')}/s, forecast "
                       f"{inputs.get('forecast_rate', '-')}/s)")
    breakers = {k: v for k, v in (payload.get("breakers") or {}).items() if v != "closed"}
    if breakers:
        out.append("breakers: " + ", ".join(f"{k} {v}" for k, v in sorted(breakers.items())))
    for wid, info in sorted((payload.get("kv_events_silent") or {}).items()):
        out.append(f"router: NO KV EVENTS from {wid} ({info.get('requests_total', 0):.0f} requests, "
                   f"{info.get('prefix_lookup_blocks', 0):.0f} prompt blocks cached, 0 events published): "
                   "KV-aware routing is blind to its cache")
    paths = payload.get("shuttle_paths") or {}
    if paths.get("by_transport"):
        counts = ", ".join(f"{t}: {n}" for t, n in paths["by_transport"].items())
        out.append(f"shuttle paths ({paths.get('num_pairs', 0)} prefill->decode pairs): {counts}")
        for pair in paths.get("pairs", [])[:4]:
            hop = f" over {pair['link']}, {pair['hop']}" if pair.get("hop") else ""
            out.append(f"  {pair['prefill']} -> {pair['decode']}: {pair['transport']}{hop} ({pair['reason']})")
        if paths.get("error"):
            out.append(f"  error: {paths['error']}")
        for w in payload.get("workers", []):
            used = (w.get("shuttle") or {})
            if used.get("pulls"):
                moved = ", ".join(f"{t} {_size(b)}" for t, b in used.get("bytes_by_transport", {}).items())
                out.append(f"  {w['id']} pulled: {moved or 'nothing'} ({used['pulls']:.0f} pulls, "
                           f"{used.get('pull_failures', 0):.0f} failed, {used.get('local_fallbacks', 0):.0f} "
                           f"prefilled locally)")
    return out


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def _clock(wall_time) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(wall_time)) if isinstance(wall_time, (int, float)) else "--:--:--"


def progress_table(payload: dict[str, Any], *, detailed: bool = False, max_rows: int | None = None):
    """One row per process: what `dyn up` redraws while waiting and what `dyn status` prints.

    With max_rows (the `dyn up` view of a 72-worker rack) ready processes are
    folded into a count and only the others get a row.
    """
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    workers = payload.get("workers", [])
    caption = None
    if max_rows is not None and len(workers) > max_rows:
        counts = Counter(str(w.get("state")) for w in workers)
        caption = "  ".join(f"{state}: {n}" for state, n in sorted(counts.items()))
        workers = [w for w in workers if w.get("state") != "ready"][:max_rows]
    table = Table(box=None, pad_edge=False, caption=caption, caption_justify="left")
    columns = ["process", "role", "node", "pid", "state"]
    if detailed:
        columns += ["heartbeat", "running", "waiting", "kv", "restarts", "weights"]
    for column in columns:
        table.add_column(column, no_wrap=True)
    for w in workers:
        style = _STATE_STYLE.get(str(w.get("state")), "")
        state = escape(str(w.get("state")))
        row = [escape(w["id"]), w.get("role", ""), escape(w.get("node", "")), str(w.get("pid") or "-"),
               f"[{style}]{state}[/]" if style else state]
        if detailed:
            age = w.get("heartbeat_age_s")
            kv = w.get("kv_usage")
            row += ["-" if age is None else f"{age:.1f}s", _int(w.get("num_running")),
                    _int(w.get("num_waiting")), "-" if kv is None else f"{100 * kv:.0f}%",
                    str(w.get("restarts", 0)), escape(weights_cell(w.get("weights")))]
        table.add_row(*row)
    return table


def weights_cell(weights: Any) -> str:
    """How a worker got its weights: "peer worker-0 shm 0.41s", "disk 2.30s", "-"."""
    if not isinstance(weights, dict) or not weights.get("source"):
        return "-"
    source = str(weights["source"])
    via = f" {weights.get('peer')} {weights.get('transport')}" if source.startswith("peer") else ""
    refetched = f" ({weights['refetched']} refetched)" if weights.get("refetched") else ""
    return f"{source}{via} {float(weights.get('load_s', 0.0)):.2f}s (ready {float(weights.get('ready_s', 0.0)):.1f}s)" \
        + refetched


def _int(value) -> str:
    return "-" if value is None else str(int(value))


def register(app: typer.Typer) -> None:
    app.command("status")(status)
