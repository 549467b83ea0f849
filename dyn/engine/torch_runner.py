"""TorchModelRunner: a Llama-family model over a fixed paged KV pool (CPU or CUDA).

Every SeqWork of a step goes through one forward pass as a flat run of tokens
(no padding); only the rows that sample go through the LM head. The pool is
allocated once at construction from a block count or a byte budget:

    pool[num_blocks, 2 (K,V), num_layers, block_size, num_kv_heads, head_dim]

`pool[b]` is contiguous, so `block_view(b)` is one flat byte range that the
shuttle and the lower tiers move with a single copy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dyn.engine.backend import PromptLogprobs
from dyn.engine.host_memory import host_pool
from dyn.engine.layers.attention import build_metadata
from dyn.engine.loader import Checkpoint, read_model_config
from dyn.engine.models import build_model
from dyn.engine.models.llama import LlamaModel
from dyn.engine.runner import ModelRunner, SeqWork, StepResult
from dyn.engine.sampling import sample
from dyn.errors import EngineError

SCORE_ROWS = 256
"""Prompt scoring reads the LM head over this many rows at a time: a 32k-token prompt of a
128k-vocabulary model would otherwise hold 16 GiB of float32 logits at once."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


class TorchModelRunner(ModelRunner):
    """Runs a loaded model; owns the KV pool. Set `capture_logits` to keep every step's logits (tests)."""

    scores_prompts = True
    biases_logits = True

    def __init__(self, model: LlamaModel, *, block_size: int, num_blocks: int, max_context: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        c = model.config
        if block_size < 1 or num_blocks < 1:
            raise EngineError(f"block_size ({block_size}) and num_blocks ({num_blocks}) must be >= 1")
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_context = max_context
        self.vocab_size = c.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = model.device
        self.kv_on_cuda = self.device.type == "cuda"
        shape = (num_blocks, 2, c.num_layers, block_size, c.num_kv_heads, c.head_dim)
        if self.device.type == "cpu":  # huge pages: a same-host decode worker reads blocks ~3x faster
            host = host_pool(math.prod(shape) * model.dtype.itemsize)
            self.pool = torch.frombuffer(host, dtype=torch.uint8).view(model.dtype).view(shape)
        else:
            self.pool = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.block_bytes = self.pool[0].numel() * self.pool.element_size()
        self._pool_rows = self.pool.view(-1, c.num_kv_heads, c.head_dim)
        self._pool_bytes = self.pool.view(num_blocks, -1).view(torch.uint8)
        self._pool_host = self._pool_bytes.numpy() if self.device.type == "cpu" else None
        self._generator = torch.Generator()
        self.capture_logits = False
        self.captured_logits: dict[str, list[torch.Tensor]] = {}
        """request_id -> float32 logits [n_tokens, vocab] per step, when capture_logits is on."""

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "cpu", block_size: int = 16,
                        num_blocks: int | None = None, kv_memory_bytes: int | None = None,
                        max_context: int | None = None,
                        fill_weights: Callable[[LlamaModel, Path], None] | None = None) -> "TorchModelRunner":
        """Load a Hugging Face checkpoint directory and allocate the KV pool.

        Give either `num_blocks` or `kv_memory_bytes` (the pool takes as many
        whole blocks as fit). `max_context` defaults to the model's
        max_position_embeddings. `fill_weights(model, path)` fills the model's
        weight arena some other way than reading the safetensors (a live peer,
        dyn.weights), falling back to `path` as it sees fit; config.json is
        still read from `path`.
        """
        config = read_model_config(path)
        torch_dtype = _resolve_dtype(dtype, config.torch_dtype)
        dev = _resolve_device(device)
        limit = config.max_position_embeddings if max_context is None else max_context
        if limit < 1:
            raise EngineError(f"max_context must be >= 1, got {limit}")
        model = build_model(config, dtype=torch_dtype, device=dev, max_positions=limit)
        if fill_weights is None:
            model.load(Checkpoint(path))
        else:
            fill_weights(model, Path(path))
        c = config
        block_bytes = 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * model.embed.element_size()
        if num_blocks is None:
            if kv_memory_bytes is None:
                raise EngineError("give num_blocks or kv_memory_bytes to size the KV pool")
            num_blocks = kv_memory_bytes // block_bytes
            if num_blocks < 1:
                raise EngineError(f"kv_memory_bytes={kv_memory_bytes} holds no KV block "
                                  f"(one block is {block_bytes} bytes); raise the KV memory budget")
        eos = tuple(dict.fromkeys(c.eos_token_ids + _generation_eos(Path(path))))
        return cls(model, block_size=block_size, num_blocks=num_blocks, max_context=limit, eos_token_ids=eos)

    def execute(self, work: list[SeqWork]) -> StepResult:
        """One forward pass over all of `work`; samples the next token where `sample` is set."""
        t0 = time.perf_counter()
        if not work:
            return StepResult(sampled={})
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for w in work:
            n = len(w.token_ids)
            end = w.start_pos + n
            if n == 0 or end > self.max_context or len(w.block_ids) * self.block_size < end:
                raise EngineError(f"bad SeqWork for {w.request_id!r}: {n} tokens at {w.start_pos}, "
                                  f"{len(w.block_ids)} blocks of {self.block_size}, max_context {self.max_context}")
            ids.extend(w.token_ids)
            positions.extend(range(w.start_pos, end))
            if w.sample:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        meta = build_metadata([(w.start_pos, len(w.token_ids)) for w in work], [w.block_ids for w in work],
                              num_layers=self.model.config.num_layers, block_size=self.block_size, device=dev)
        with torch.inference_mode():
            hidden = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                        meta, self._pool_rows)
            if self.capture_logits:
                all_logits = self.model.logits(hidden)
                self._capture(work, all_logits)
                logits = all_logits[sample_rows]
            else:
                logits = self.model.logits(hidden[sample_rows])
            sampling_work = [w for w in work if w.sample]
            picked = sample(logits, [w.sampling for w in sampling_work],
                            [w.num_generated + w.num_resumed for w in sampling_work], self._generator,
                            contexts=[w.all_token_ids or () for w in sampling_work],
                            mask=_step_mask(sampling_work, self.eos_token_ids))
            prompt = self._score_prompts(work, hidden)
        sampled = {w.request_id: tok for w, tok in zip(sampling_work, picked.token_ids)}
        logprobs = {w.request_id: lp for w, lp in zip(sampling_work, picked.logprobs) if lp is not None}
        top = ({w.request_id: t for w, t in zip(sampling_work, picked.top) if t is not None}
               if picked.top is not None else None)
        return StepResult(sampled=sampled, logprobs=logprobs or None, top=top or None,
                          duration_s=time.perf_counter() - t0, prompt=prompt)

    def _score_prompts(self, work: list[SeqWork], hidden: torch.Tensor) -> dict[str, PromptLogprobs] | None:
        """Prompt scores (SamplingParams.prompt_logprobs) of this step's rows: row i of a work
        scores the prompt token after it, up to the prompt's last token."""
        scores: dict[str, PromptLogprobs] = {}
        row = 0
        for w in work:
            k = w.sampling.prompt_logprobs
            num = min(len(w.token_ids), w.num_prompt_tokens - 1 - w.start_pos)
            if k is not None and num > 0 and w.all_token_ids is not None:
                nxt = w.all_token_ids[w.start_pos + 1:w.start_pos + 1 + num]
                scores[w.request_id] = self._score(hidden[row:row + num], nxt, k)
            row += len(w.token_ids)
        return scores or None

    def _score(self, hidden: torch.Tensor, next_ids: list[int], k: int) -> PromptLogprobs:
        out = PromptLogprobs([], [] if k else None, [] if k else None, [])
        targets = torch.tensor(next_ids, device=hidden.device).unsqueeze(1)
        for start in range(0, len(next_ids), SCORE_ROWS):
            lp = torch.log_softmax(self.model.logits(hidden[start:start + SCORE_ROWS]), dim=-1)
            picked = lp.gather(1, targets[start:start + SCORE_ROWS])
            out.logprobs += picked.squeeze(1).tolist()
            out.ranks += (lp >= picked).sum(dim=-1).tolist()  # type: ignore[operator]  # vLLM's rank
            if k:
                values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
                out.top_ids += ids.tolist()  # type: ignore[operator]
                out.top_logprobs += values.tolist()  # type: ignore[operator]
        return out

    def block_view(self, block_id: int) -> object:
        """memoryview over the block's bytes on CPU; a uint8 tensor view on CUDA (no copy either way)."""
        if self._pool_host is not None:
            return memoryview(self._pool_host[block_id])
        return self._pool_bytes[block_id]

    def copy_block(self, src_block_id: int, dst_block_id: int) -> None:
        self.pool[dst_block_id].copy_(self.pool[src_block_id])

    def _capture(self, work: list[SeqWork], logits: torch.Tensor) -> None:
        row = 0
        for w in work:
            n = len(w.token_ids)
            self.captured_logits.setdefault(w.request_id, []).append(logits[row:row + n].cpu())
            row += n


def _step_mask(work: list[SeqWork], eos_token_ids: tuple[int, ...]) -> Callable[[torch.Tensor], None] | None:
    """What a step may not sample, per row: outside its grammar (response_format), or an EOS or
    stop token before its min_tokens. None when no row is restricted (the usual step)."""
    grammar = [(i, w.constraint) for i, w in enumerate(work) if w.constraint is not None]
    held = [(i, [*(() if w.sampling.ignore_eos else eos_token_ids), *w.sampling.stop_token_ids])
            for i, w in enumerate(work) if w.num_generated < w.sampling.min_tokens]
    if not grammar and not held:
        return None

    def apply(logits: torch.Tensor) -> None:
        if grammar:
            grammar[0][1].grammars.apply(logits, grammar)
        for row, ids in held:
            logits[row, ids] = -math.inf
    return apply


def _resolve_dtype(dtype: str | torch.dtype, config_dtype: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise EngineError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    name = (config_dtype or "float32") if dtype == "auto" else dtype
    if name not in DTYPES:
        raise EngineError(f"dtype {name!r} is not supported; use one of float32, bfloat16, float16 or auto")
    return DTYPES[name]


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} asked for, but torch sees no CUDA GPU (use device='cpu')")
    if dev.type not in ("cpu", "cuda"):
        raise EngineError(f"device type {dev.type!r} is not supported (cpu, cuda)")
    return dev


def _generation_eos(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(e for e in eos if isinstance(e, int)) if isinstance(eos, list) else ()
