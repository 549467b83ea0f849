"""`dyn trace ...`: request traces for benchmarks and the simulator."""

from __future__ import annotations

import typer

from dyn.errors import DynError

app = typer.Typer(help="Request traces (synthetic days for long simulator runs).", no_args_is_help=True)


@app.command("synth")
def synth(requests: int = typer.Option(..., "--requests", "-n", help="Requests to write."),
          out: str = typer.Option(..., "--out", "-o", help="Output .jsonl (Mooncake format)."),
          seed: int = typer.Option(0, "--seed", help="The same seed gives the same file."),
          duration_s: float = typer.Option(86_400.0, "--duration-s",
                                           help="Length of the day (a shorter one compresses it).")) -> None:
    """Write a synthetic day of chat traffic: diurnal rate, bursts, multi-turn sessions with prefix
    reuse, calibrated on the Mooncake conversation trace.

    Example: dyn trace synth --requests 1000000 --seed 1 --out day.jsonl
    """
    from dyn.bench.daytrace import DaySpec, write_day

    try:
        count = write_day(DaySpec(requests, seed, duration_s), out)
    except DynError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        typer.echo(f"error: cannot write {out}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {count} requests over {duration_s:.0f} s to {out} (seed {seed})")
