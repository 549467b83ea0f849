"""`dyn sim`: replay a trace against a simulated deployment (real router and planner)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from dyn.cli.render import errors_to_exit


def sim(
    topology: str = typer.Option(..., "-t", "--topology", help="Topology file or shipped name."),
    recipe: str = typer.Option(..., "-r", "--recipe", help="Recipe file or shipped name."),
    trace: str = typer.Option(..., "--trace", help="Mooncake .jsonl or Azure .csv trace."),
    router: Optional[str] = typer.Option(None, "--router", help="Routing policy (default: the recipe's); "
                                         "kv, round-robin, least-loaded, random, dynamo, sglang, llm-d."),
    planner: Optional[str] = typer.Option(None, "--planner", help="on|off (default: the recipe's)."),
    prefill: Optional[int] = typer.Option(None, "--prefill", help="Prefill workers (a fixed split)."),
    decode: Optional[int] = typer.Option(None, "--decode", help="Decode workers (a fixed split)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Profile JSON (default: the recipe's "
                                          "NAME.profile.json, else the mock timing model)."),
    mock: bool = typer.Option(False, "--mock", help="Use the recipe's mock timing model as the profile."),
    speedup: float = typer.Option(1.0, "--speedup", help="Divide arrival times by this."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", help="Only the first N requests."),
    startup_s: float = typer.Option(30.0, "--startup-s", help="Load time of a launched worker."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write latency/replicas/hit-rate plots (PNG)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    seed: int = typer.Option(0, "--seed"),
    stream: bool = typer.Option(False, "--stream", help="Read the trace during the run (Mooncake .jsonl; "
                                "block names from its ids): constant memory for a 1M-request day."),
    domain_routing: bool = typer.Option(False, "--domain-routing", help="One router per NVLink domain behind "
                                        "a consistent-hash balancer, as a multi-rack site runs them."),
    block_tokens: Optional[int] = typer.Option(None, "--block-tokens", help="KV/routing granularity (a multiple "
                                               "of model.block_size; 512 with a Mooncake trace is ~16x cheaper)."),
) -> None:
    """Simulate a deployment on a trace in virtual time.

    Example: dyn sim -t gb200-nvl72 -r llama-3.1-70b-nvl72 --trace conversation_trace.jsonl --json
    """
    from dyn.config.loader import resolve_file
    from dyn.sim.config import SimConfig
    from dyn.sim.run import load_inputs, simulate

    if planner not in (None, "on", "off"):
        raise typer.BadParameter(f"must be on or off, got {planner!r}", param_hint="--planner")
    with errors_to_exit():
        inputs = load_inputs(resolve_file("topology", topology), resolve_file("recipe", recipe), trace,
                             profile=profile, use_mock=mock, max_requests=max_requests, stream=stream)
        config = SimConfig(router_policy=router, planner=None if planner is None else planner == "on",
                           num_prefill=prefill, num_decode=decode, startup_s=startup_s, seed=seed,
                           domain_routing=domain_routing, block_tokens=block_tokens)
        report = simulate(inputs, config, time_scale=speedup, max_requests=max_requests if stream else None)
        if plot:
            from dyn.sim.plot import plot_report
            plot_report(report, plot)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    _render(report)


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from dyn.dashboard.render import print_whole

    table = Table(title=f"dyn sim: {report['sim']['trace']} (router {report['sim']['router']}, "
                        f"planner {'on' if report['sim']['planner'] else 'off'}, profile {report['sim']['profile']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("requests", f"{report['completed']}/{report['requests']} ok"),
            ("TTFT p50/p90/p99 ms", _pcts(report["ttft_ms"])), ("ITL p50/p90/p99 ms", _pcts(report["itl_ms"])),
            ("e2e p50/p90/p99 ms", _pcts(report["e2e_ms"])),
            ("SLO attainment", f"{report['slo_attainment']:.1%} (TTFT {report['slo']['ttft_ms']} ms, "
                               f"ITL {report['slo']['itl_ms']} ms)"),
            ("goodput", f"{report['goodput_rps']:.2f} req/s"), ("GPU-seconds", f"{report['gpu_seconds']:.0f}"),
            ("goodput per GPU", f"{report['goodput_per_gpu']:.4f} req/GPU-s"),
            ("prefix hit rate", f"{(report['prefix_hit_rate'] or 0):.1%}"),
            ("hand-offs leaving a domain", f"{report['handoffs']['cross_domain']} of {report['handoffs']['total']} "
                                           f"({report['handoffs']['cross_domain_share']:.1%})"),
            ("planner decisions", str(sum(d['action'] != 'hold' for d in report['decisions']))),
            ("simulated / wall", f"{report['duration_s']:.0f} s / {report['sim']['wall_s']} s")]
    for name, value in rows:
        table.add_row(name, value)
    print_whole(Console(), table)


def _pcts(summary: dict) -> str:
    return " / ".join("-" if summary.get(k) is None else f"{summary[k]:.1f}" for k in ("p50", "p90", "p99"))


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)
