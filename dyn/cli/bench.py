"""`dyn bench`: replay a request trace against a running deployment's OpenAI endpoint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer

from dyn.cli.render import errors_to_exit, out


def bench(
    trace: str = typer.Option(..., "--trace", help="Mooncake .jsonl or Azure .csv trace file."),
    url: Optional[str] = typer.Option(None, "--url", help="Frontend URL (default: the deployment's)."),
    name: str = typer.Option("default", "--name", help="Deployment to target when --url is not given."),
    model: Optional[str] = typer.Option(None, "--model", help="Served model name (default: the recipe's)."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", help="Replay only the first N requests."),
    speedup: float = typer.Option(1.0, "--speedup", help="Divide arrival times by this."),
    concurrency: int = typer.Option(64, "--concurrency", help="Requests in flight at most."),
    block_tokens: Optional[int] = typer.Option(None, "--block-tokens",
                                               help="Tokens per trace block (default: the trace's, 512 for "
                                                    "Mooncake); smaller replays the same sharing with short prompts."),
    input_scale: Optional[float] = typer.Option(None, "--input-scale",
                                                help="Multiply prompt lengths by this (default: block "
                                                     "tokens / the trace's block size; 1 for Azure)."),
    output_scale: float = typer.Option(1.0, "--output-scale", help="Multiply output lengths by this."),
    max_output_tokens: Optional[int] = typer.Option(None, "--max-output-tokens", help="Cap output lengths."),
    slo_ttft_ms: Optional[float] = typer.Option(None, "--slo-ttft-ms", help="TTFT target for goodput."),
    slo_itl_ms: Optional[float] = typer.Option(None, "--slo-itl-ms", help="ITL target for goodput."),
    timeout_s: float = typer.Option(300.0, "--timeout", help="Per-request timeout in seconds."),
    max_duration_s: float = typer.Option(3600.0, "--max-duration", help="Stop sending after this many seconds."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DYN_API_KEY", help="Bearer token."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size",
                                             help="Token ids are drawn below this (default: the deployment's "
                                                  "checkpoint config.json, else 32000)."),
    retry_429: int = typer.Option(0, "--retry-429",
                                  help="Retry a 429 up to N times after its Retry-After, as the openai "
                                       "SDK does (default 0: count it as refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write latency and hit-rate plots (PNG)."),
) -> None:
    """Replay a trace and report TTFT, ITL, e2e latency, throughput, goodput and prefix hit rate.

    Example: dyn bench --trace ../shared/traces/mooncake/conversation_trace.jsonl --max-requests 200
    --block-tokens 16 --speedup 20 --slo-ttft-ms 2000 --json
    """
    from rich.progress import Progress

    from dyn.bench.runner import BenchConfig, run_bench
    from dyn.bench.trace import load_trace

    with errors_to_exit():
        base_url, served, detected_vocab = _target(url, name, model)
        loaded = load_trace(trace, max_requests)
        config = BenchConfig(base_url=base_url, model=served, max_requests=max_requests, speedup=speedup,
                             concurrency=concurrency, block_tokens=block_tokens, input_scale=input_scale,
                             output_scale=output_scale,
                             max_output_tokens=max_output_tokens, slo_ttft_ms=slo_ttft_ms,
                             slo_itl_ms=slo_itl_ms, request_timeout_s=timeout_s,
                             max_duration_s=max_duration_s, api_key=api_key,
                             vocab_size=vocab_size or detected_vocab or 32000,
                             max_retries_429=retry_429)
        with Progress(transient=True, disable=as_json, console=out()) as progress:
            task = progress.add_task("replaying", total=None)

            def on_progress(p) -> None:
                progress.update(task, total=p.total, completed=p.done,
                                description=f"sent {p.sent}  failed {p.failed}  refused {p.refused}")

            report = asyncio.run(run_bench(loaded, config, on_progress))
        result = report.to_json()
        if plot:
            from dyn.sim.plot import plot_report

            plot_report(result, plot)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _render(result)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def _target(url: str | None, name: str, model: str | None) -> tuple[str, str, int | None]:
    """Frontend URL, model name and vocabulary size: given, or read from the named deployment."""
    from dyn.planner.state import StateStore, client_urls

    store = StateStore(name)
    if not store.exists():
        if url:
            return url, model or "default", None
        from dyn.errors import DeploymentError

        raise DeploymentError(f"no deployment named {name!r} is running: pass --url, or start one with dyn up")
    from dyn.config.loader import parse_recipe

    deployment = store.load_deployment()
    recipe = parse_recipe(deployment.recipe_text, deployment.recipe_source)
    url = url or client_urls(deployment, store.load_snapshot())[0]
    return url, model or recipe.model.served_name, _vocab_size(recipe.model.path)


def _vocab_size(model_path: str | None) -> int | None:
    """The checkpoint's vocabulary (prompts must stay inside it), when it is readable here."""
    if not model_path:
        return None
    from dyn.engine.sources import source_file
    from dyn.errors import DynError

    try:
        gguf_file = source_file(model_path)
        if gguf_file is not None:
            from dyn.engine.gguf.reader import GGUFFile

            gguf = GGUFFile(gguf_file)
            return int(gguf.arch("vocab_size") or len(gguf.require("tokenizer.ggml.tokens")))
        config = json.loads((Path(model_path).expanduser() / "config.json").read_text())
        return int(config["vocab_size"])
    except (DynError, OSError, ValueError, KeyError, TypeError):
        return None


def _render(result: dict) -> None:
    from rich.table import Table

    from dyn.dashboard.render import print_whole

    table = Table(title=f"dyn bench: {result.get('requests')} requests, {result.get('failed')} failed, "
                        f"{result.get('refused', 0)} refused (429), {result.get('retried_429', 0)} retried")
    table.add_column("metric")
    for col in ("p50", "p90", "p99"):
        table.add_column(col, justify="right")
    for key, label in (("ttft_ms", "TTFT ms"), ("itl_ms", "ITL ms"), ("e2e_ms", "e2e ms")):
        stats = result.get(key) or {}
        table.add_row(label, *(_fmt(stats.get(col)) for col in ("p50", "p90", "p99")))
    console = out()
    print_whole(console, table)
    hit = result.get("prefix_hit_rate")
    console.print(f"throughput {result.get('throughput_rps', 0):.2f} req/s, "
                  f"{result.get('output_tokens_per_s', 0):.1f} output tok/s, goodput "
                  f"{result.get('goodput_rps', 0):.2f} req/s, prefix hit rate "
                  f"{'n/a' if hit is None else f'{hit:.1%}'}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"
