"""`dyn profile`: measure an engine and write the recipe's profile file for the planner and `dyn sim`."""

from __future__ import annotations

from typing import Optional

import typer

from dyn.cli.render import errors_to_exit


def profile(
    recipe: str = typer.Option(..., "-r", "--recipe", help="Recipe file or shipped name."),
    topology: Optional[str] = typer.Option(None, "-t", "--topology", help="Topology (names the hardware)."),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="Output file (default: next to the recipe)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Measure prefill and decode step times and KV capacity; write NAME.profile.json.

    Example: dyn profile -r mock-local -t local
    """
    from dyn.config.loader import load_recipe, load_topology, resolve_file
    from dyn.engine.profile import profile_path, save_profile
    from dyn.engine.profiling import profile_recipe

    with errors_to_exit():
        recipe_file = resolve_file("recipe", recipe)
        rec = load_recipe(recipe_file)
        topo = load_topology(resolve_file("topology", topology)) if topology else None
        result = profile_recipe(rec, topo, device=device)
        path = save_profile(result, out or profile_path(recipe_file))
    for role, r in result.roles.items():
        t = r.timing
        typer.echo(f"{role}: prefill {t.prefill_base_s * 1e3:.2f} ms + {t.prefill_s_per_token * 1e6:.2f} us/token "
                   f"({r.prefill_tokens_per_s:,.0f} tokens/s at {r.max_num_batched_tokens}); decode "
                   f"{t.decode_base_s * 1e3:.2f} ms + {t.decode_s_per_seq * 1e6:.2f} us/seq + "
                   f"{t.decode_s_per_ctx_token * 1e9:.2f} ns/ctx token; KV {t.num_kv_blocks} blocks")
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
