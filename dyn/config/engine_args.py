"""Check a recipe's free-form `model.engine_args` against vLLM's EngineArgs, without importing vLLM.

Importing vllm pulls torch and takes seconds; every process parses the recipe
(CLI, daemon, frontend, workers), so the field list is read from the
installed `vllm/engine/arg_utils.py` with `ast` instead (a few milliseconds).
Where vLLM is not installed (a head node that only plans), names cannot be
checked here; the worker then checks them when it builds the engine
(EngineArgs(**kwargs) raises on an unknown name) and fails with a clear error.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any, Iterator

from dyn.config.schema import suggest

OWNED_BY_RECIPE = {
    "model": "model.path",
    "served_model_name": "model.name",
    "tensor_parallel_size": "workers.<role>.tp",
    "block_size": "model.block_size",
    "max_num_seqs": "workers.<role>.max_batch_size",
    "max_num_batched_tokens": "workers.<role>.max_num_batched_tokens",
    "max_model_len": "model.max_context",
    "dtype": "model.dtype",
    "enable_prefix_caching": "model.enable_prefix_caching",
    "gpu_memory_utilization": "model.gpu_memory_utilization",
    "kv_cache_memory_bytes": "workers.<role>.kv_memory_gib",
    "kv_events_config": "dyn (it subscribes the router to every worker's KV events)",
    "kv_transfer_config": "dyn (mode: disaggregated sets the NIXL connector)",
    "enable_lora": "model.lora_adapters",
    "nnodes": "the placement (a group wider than one tray)",
    "node_rank": "the placement (a group wider than one tray)",
    "master_addr": "the placement (a group wider than one tray)",
    "master_port": "the placement (a group wider than one tray)",
}
"""EngineArgs that dyn derives from the recipe and placement: naming them in engine_args is an error."""

_SIMPLE = {"bool": bool, "int": int, "float": (int, float), "str": str}


def vllm_engine_arg_fields() -> dict[str, str] | None:
    """EngineArgs field name -> annotation text, or None when vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return None


def check_engine_args(args: dict[str, Any],
                      fields: dict[str, str] | None = None) -> Iterator[tuple[str, str, str | None]]:
    """(key, message, hint) for each bad entry; vLLM's fields are read when not given."""
    for key in args:
        if not isinstance(key, str) or not key.isidentifier():
            yield str(key), "engine argument names are Python identifiers (use underscores)", None
            return
        if key in OWNED_BY_RECIPE:
            yield key, f"'{key}' is set by dyn", f"use {OWNED_BY_RECIPE[key]} instead"
    if fields is None:
        fields = vllm_engine_arg_fields()
    if fields is None:
        return  # vLLM is not installed here: the worker checks when it builds the engine
    for key, value in args.items():
        if key in OWNED_BY_RECIPE:
            continue
        if key not in fields:
            yield key, "not an argument of vLLM's EngineArgs", suggest(key, sorted(fields), "arguments")
            continue
        expected = _simple_type(fields[key])
        if expected is not None and value is not None and (
                not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)):
            yield key, f"expected {fields[key]}, got {type(value).__name__} {value!r}", None


def _simple_type(annotation: str):
    """The Python type of a plain annotation (`int`, `bool | None`); None when not plain."""
    parts = [p.strip() for p in annotation.split("|")]
    plain = [p for p in parts if p != "None"]
    return _SIMPLE.get(plain[0]) if len(plain) == 1 else None
