"""A weight peer in its own process: load a checkpoint from disk, serve its arena, print the address.

    python weight_peer.py MODEL_DIR [--bind HOST] [--share S] [--corrupt 3,5]

Prints one JSON line {"address", "key", "num_blocks"} once serving; runs until killed.
Tests start it with `start_peer` (below)
Tests kill it mid-stream; `ip netns exec NS python weight_peer.py ...` makes it another host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path


async def serve(args: argparse.Namespace) -> None:
    import torch

    from dyn.engine.torch_runner import TorchModelRunner
    from dyn.weights.manifest import build_manifest, weights_key
    from dyn.weights.server import WeightServer

    torch.set_num_threads(1)
    runner = TorchModelRunner.from_pretrained(args.model, dtype="float32", num_blocks=4)
    key = weights_key(args.model, engine="torch", dtype="float32")
    manifest = build_manifest(runner.model.arena, key=key, engine="torch")
    corrupt = frozenset(int(x) for x in args.corrupt.split(",") if x)
    async with WeightServer(runner.model.arena, manifest, share=args.share, bind_host=args.bind,
                            corrupt_once=corrupt) as server:
        print(json.dumps({"address": server.address, "key": key, "num_blocks": manifest.num_blocks}), flush=True)
        await asyncio.Event().wait()


def start_peer(model_dir: Path, *extra: str, prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, dict]:
    """A weight peer process (weight_peer.py); returns it and its JSON hello."""
    proc = subprocess.Popen([*prefix, sys.executable, __file__, str(model_dir), *extra],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"weight peer exited with {proc.returncode} before serving")
    return proc, json.loads(line)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--share", type=float, default=1.0)
    parser.add_argument("--corrupt", default="")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
