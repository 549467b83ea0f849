"""The sampling a request gets for the fields it leaves out: the model's, then the recipe's.

A checkpoint's generation_config.json carries the sampling its authors recommend (Llama 3.1
Instruct: temperature 0.6, top_p 0.9; Qwen2.5: top_k 20 and repetition_penalty 1.05 too). vLLM's OpenAI server and
transformers apply it, so a model served by dyn without it would answer differently from the
same model under `vllm serve`. Every key the file sets is taken, as vLLM does (transformers 5
writes no defaults into the file); `max_new_tokens` becomes chat's default max_tokens.
Sampling controls dyn does not implement (typical_p, ...) are named in the
frontend's log rather than dropped silently. A value out of the API's range is an error naming
the file and key: `model.sampling_defaults.from_model: false` serves without the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dyn.config.recipe import DEFAULTABLE, SamplingDefaultsSpec, sampling_default_problem
from dyn.engine.loader import CheckpointError
from dyn.frontend.protocol import SamplingDefaults

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
_FROM_FILE = {**{field: field for field in DEFAULTABLE if field != "max_tokens"}, "max_new_tokens": "max_tokens"}
"""generation_config.json key -> the request field it is the default of (the same names but one)."""
NOT_APPLIED = ("typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size")
"""Sampling controls a generation config may set that dyn's engines do not implement."""


@dataclass(frozen=True, slots=True)
class ResolvedDefaults:
    defaults: SamplingDefaults
    origin: dict[str, str]
    """Field -> where its value came from (the file's path, or "recipe"), for the log."""
    not_applied: dict[str, object]
    """Controls the model's file sets that dyn does not implement."""

    def describe(self) -> str:
        if not self.origin:
            return "sampling defaults: OpenAI's (temperature 1, top_p 1, no top-k)"
        by_origin: dict[str, list[str]] = {}
        for name in DEFAULTABLE:
            if name in self.origin:
                by_origin.setdefault(self.origin[name], []).append(f"{name} {getattr(self.defaults, name)}")
        return "sampling defaults for requests that leave them out: " + "; ".join(
            f"{', '.join(values)} from {'the recipe' if origin == 'recipe' else origin}"
            for origin, values in by_origin.items())


def resolve_sampling_defaults(spec: SamplingDefaultsSpec, directory: Path | None) -> ResolvedDefaults:
    """The model's generation_config.json (if `spec.from_model` and the checkpoint has one) under
    the recipe's own values. Raises CheckpointError for a file dyn cannot read or a value out of range."""
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    not_applied: dict[str, object] = {}
    path = directory / GENERATION_CONFIG if directory is not None else None
    if spec.from_model and path is not None and path.is_file():
        config = _read(path)
        for key, field in _FROM_FILE.items():
            value = config.get(key)
            if value is None:
                continue
            problem = sampling_default_problem(field, value)
            if problem is not None:
                raise CheckpointError(f"{key} {problem} (set the recipe's model.sampling_defaults.from_model: "
                                      "false to serve without the model's sampling defaults)", path=path)
            values[field], origin[field] = _typed(field, value), str(path)
        not_applied = {key: config[key] for key in NOT_APPLIED if config.get(key) is not None}
    for field in DEFAULTABLE:
        value = getattr(spec, field)
        if value is not None:
            values[field], origin[field] = _typed(field, value), "recipe"
    return ResolvedDefaults(SamplingDefaults(**values), origin, not_applied)  # type: ignore[arg-type]


def log_sampling_defaults(resolved: ResolvedDefaults) -> None:
    log.info(resolved.describe())
    if resolved.not_applied:
        log.warning("the model's %s also sets %s, which dyn does not apply", GENERATION_CONFIG,
                    ", ".join(f"{k} {v}" for k, v in resolved.not_applied.items()))


def _typed(field: str, value: object) -> object:
    """A checked value as SamplingDefaults holds it (YAML and JSON write 1 for 1.0)."""
    return value if field in ("top_k", "max_tokens") else float(value)  # type: ignore[arg-type]


def _read(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read: {exc}", path=path) from None
    except ValueError as exc:
        raise CheckpointError(f"not valid JSON: {exc}", path=path) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"expected a JSON object, got {type(config).__name__}", path=path)
    return config
