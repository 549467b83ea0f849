"""Engine profiles: how fast one worker of a role prefills and decodes, and how much KV it holds.

The planner sizes the deployment from a profile; the simulator steps its
workers with one. A profile per role holds a linear step-time model with the
same coefficients as the mock engine's `MockTiming` (so the mock's profile
IS its timing model), plus the raw samples it was fitted from:

    prefill step  = prefill_base_s + prefill_s_per_token * batch_tokens
    decode step   = decode_base_s + decode_s_per_seq * batch
                    + decode_s_per_ctx_token * context_tokens_in_batch

Profiles are JSON files next to the recipe (`recipes/NAME.profile.json`),
versioned, and name the hardware they describe and where each figure comes
from (measured, the mock's model, or public figures). Measuring one
(`dyn profile`) is dyn.engine.profiling.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from dyn.config.recipe import MockTiming, Recipe
from dyn.config.topology import Topology
from dyn.errors import DynError

PROFILE_VERSION = 1
Method = Literal["measured", "mock-model", "public-figures"]
_ROLES = ("prefill", "decode", "both")


class ProfileError(DynError):
    """A profile file is missing, malformed or does not match the recipe."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.path, self.field = path, field
        where = f"{path}: " if path else ""
        super().__init__(where + (f"{field}: " if field else "") + message)


@dataclass(frozen=True)
class Hardware:
    gpu_model: str
    """e.g. "GB200", "H100-80GB", "cpu"."""
    gpus_per_worker: int
    gpu_memory_gib: float = 0.0


@dataclass(frozen=True)
class RoleProfile:
    """One worker of one role: step-time model, batch limits, KV capacity."""

    timing: MockTiming
    hardware: Hardware
    max_batch_size: int
    max_num_batched_tokens: int
    prefill_samples: tuple[tuple[int, float], ...] = ()
    """(batch tokens, step seconds) the prefill model was fitted from."""
    decode_samples: tuple[tuple[int, int, float], ...] = ()
    """(batch size, context tokens in batch, step seconds)."""

    @property
    def num_kv_blocks(self) -> int:
        return self.timing.num_kv_blocks

    def prefill_step_s(self, batch_tokens: int) -> float:
        t = self.timing
        return t.prefill_base_s + t.prefill_s_per_token * batch_tokens if batch_tokens > 0 else 0.0

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        t = self.timing
        if batch_size <= 0:
            return 0.0
        return t.decode_base_s + t.decode_s_per_seq * batch_size + t.decode_s_per_ctx_token * context_tokens

    def prompt_prefill_s(self, num_tokens: int) -> float:
        """Time to prefill one prompt alone, in chunks of the step token budget."""
        budget = self.max_num_batched_tokens
        full, rest = divmod(max(num_tokens, 0), budget)
        return full * self.prefill_step_s(budget) + self.prefill_step_s(rest)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Throughput with every step filled to the token budget."""
        budget = self.max_num_batched_tokens
        return budget / self.prefill_step_s(budget)

    def max_decode_batch(self, itl_s: float, context_per_seq: float, block_size: int) -> int:
        """Largest batch whose step fits `itl_s` and whose KV fits the pool (0: none fits)."""
        t = self.timing
        per_seq = t.decode_s_per_seq + t.decode_s_per_ctx_token * context_per_seq
        room = itl_s - t.decode_base_s
        by_time = self.max_batch_size if per_seq <= 0 else int(room / per_seq) if room > 0 else 0
        by_kv = int(self.num_kv_blocks // max(1.0, math.ceil(context_per_seq / block_size)))
        return max(0, min(by_time, self.max_batch_size, by_kv))


@dataclass(frozen=True)
class EngineProfile:
    recipe: str
    model: str
    engine: str
    block_size: int
    method: Method
    roles: dict[str, RoleProfile]
    sources: dict[str, str] = field(default_factory=dict)
    """Figure (e.g. "decode.decode_base_s") -> where it comes from."""
    created_at: str = ""
    kv_bytes_per_token: int = 0
    """KV bytes of one token over all layers (prices a prefill -> decode handoff; 0: free)."""
    version: int = PROFILE_VERSION

    def role(self, name: str) -> RoleProfile:
        """The profile of `name`; decode falls back to both and back (aggregated recipes)."""
        for candidate in (name, "both", "decode", "prefill"):
            if candidate in self.roles:
                return self.roles[candidate]
        raise ProfileError(f"no profile for role {name!r} (has {', '.join(self.roles)})", field="roles")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["roles"] = {name: asdict(role) for name, role in self.roles.items()}
        return out

    @classmethod
    def from_dict(cls, doc: Any, path: str | None = None) -> "EngineProfile":
        return _from_dict(doc, path)


def mock_profile(recipe: Recipe, topology: Topology | None = None) -> EngineProfile:
    """The profile of the mock engine: its timing model, for every role of the recipe."""
    gpu = gpu_of(topology)
    roles = {g.role: RoleProfile(recipe.model.mock, Hardware(gpu[0], g.tp, gpu[1]), g.max_batch_size,
                                 g.max_num_batched_tokens) for g in recipe.workers}
    return EngineProfile(recipe.name, recipe.model.served_name, "mock", recipe.model.block_size,
                         "mock-model", roles, {"*": "the recipe's model.mock timing model"})


def profile_path(recipe_path: str | Path) -> Path:
    """Where the profile of a recipe file lives: recipes/NAME.yaml -> recipes/NAME.profile.json."""
    path = Path(recipe_path)
    return path.with_name(path.name.rsplit(".", 1)[0] + ".profile.json")


def load_profile(path: str | Path, recipe: Recipe | None = None) -> EngineProfile:
    """Read and validate a profile; with `recipe`, check that it describes that recipe."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise ProfileError(f"cannot read profile: {err.strerror}", path=str(path)) from None
    except json.JSONDecodeError as err:
        raise ProfileError(f"not JSON (line {err.lineno}: {err.msg})", path=str(path)) from None
    profile = _from_dict(doc, str(path))
    if recipe is not None:
        check_matches(profile, recipe, str(path))
    return profile


def save_profile(profile: EngineProfile, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path


def check_matches(profile: EngineProfile, recipe: Recipe, path: str | None = None) -> None:
    """A profile describes the recipe's block size and every role it deploys."""
    if profile.block_size != recipe.model.block_size:
        raise ProfileError(f"block_size {profile.block_size} differs from the recipe's "
                           f"{recipe.model.block_size} (re-run `dyn profile`)", path=path, field="block_size")
    for group in recipe.workers:
        role = profile.roles.get(group.role)
        if role is None:
            raise ProfileError(f"no profile for role {group.role!r} of recipe {recipe.name!r}",
                               path=path, field="roles")
        if role.hardware.gpus_per_worker != group.tp:
            raise ProfileError(f"measured with {role.hardware.gpus_per_worker} GPUs per worker but the "
                               f"recipe uses tp={group.tp}", path=path, field=f"roles.{group.role}.hardware")


def gpu_of(topology: Topology | None) -> tuple[str, float]:
    if topology is None or not topology.num_gpus:
        return "cpu", 0.0
    gpu = next(g for n in topology.nodes for g in n.gpus)
    return gpu.model, gpu.memory_gib


def _from_dict(doc: Any, path: str | None) -> EngineProfile:
    if not isinstance(doc, dict):
        raise ProfileError("must be a JSON object", path=path)
    version = doc.get("version")
    if version != PROFILE_VERSION:
        raise ProfileError(f"unsupported version {version!r} (this dyn reads {PROFILE_VERSION}; "
                           f"re-run `dyn profile`)", path=path, field="version")
    for key in ("recipe", "model", "engine"):
        if not isinstance(doc.get(key), str):
            raise ProfileError("must be a string", path=path, field=key)
    block_size = doc.get("block_size")
    if type(block_size) is not int or block_size < 1:
        raise ProfileError(f"must be an int >= 1, got {block_size!r}", path=path, field="block_size")
    if doc.get("method") not in ("measured", "mock-model", "public-figures"):
        raise ProfileError(f"must be measured, mock-model or public-figures, got {doc.get('method')!r}",
                           path=path, field="method")
    roles_doc = doc.get("roles")
    if not isinstance(roles_doc, dict) or not roles_doc:
        raise ProfileError("must be a non-empty object of role -> profile", path=path, field="roles")
    roles = {name: _role(value, path, f"roles.{name}") for name, value in roles_doc.items()
             if name in _ROLES or _bad_role(name, path)}
    sources = doc.get("sources", {})
    if not isinstance(sources, dict):
        raise ProfileError("must be an object", path=path, field="sources")
    kv_bytes = doc.get("kv_bytes_per_token", 0)
    if type(kv_bytes) is not int or kv_bytes < 0:
        raise ProfileError(f"must be an int >= 0, got {kv_bytes!r}", path=path, field="kv_bytes_per_token")
    return EngineProfile(doc["recipe"], doc["model"], doc["engine"], block_size, doc["method"], roles,
                         {str(k): str(v) for k, v in sources.items()}, str(doc.get("created_at", "")),
                         kv_bytes)


def _bad_role(name: str, path: str | None) -> bool:
    raise ProfileError(f"unknown role {name!r} (expected prefill, decode or both)", path=path, field="roles")


def _role(doc: Any, path: str | None, where: str) -> RoleProfile:
    if not isinstance(doc, dict):
        raise ProfileError("must be an object", path=path, field=where)
    timing_doc = doc.get("timing")
    if not isinstance(timing_doc, dict):
        raise ProfileError("must be an object", path=path, field=f"{where}.timing")
    values: dict[str, Any] = {}
    for f in fields(MockTiming):
        value = timing_doc.get(f.name)
        ok = (type(value) is int and value >= 1) if f.name == "num_kv_blocks" else \
            (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0)
        if not ok:
            raise ProfileError(f"must be a {'positive int' if f.name == 'num_kv_blocks' else 'number >= 0'}, "
                               f"got {value!r}", path=path, field=f"{where}.timing.{f.name}")
        values[f.name] = value
    hw = doc.get("hardware")
    if not isinstance(hw, dict) or not isinstance(hw.get("gpu_model"), str) \
            or type(hw.get("gpus_per_worker")) is not int or hw["gpus_per_worker"] < 0:
        raise ProfileError("needs gpu_model (string) and gpus_per_worker (int >= 0)", path=path,
                           field=f"{where}.hardware")
    limits = []
    for key in ("max_batch_size", "max_num_batched_tokens"):
        value = doc.get(key)
        if type(value) is not int or value < 1:
            raise ProfileError(f"must be an int >= 1, got {value!r}", path=path, field=f"{where}.{key}")
        limits.append(value)
    try:
        prefill = tuple((int(n), float(s)) for n, s in doc.get("prefill_samples", ()))
        decode = tuple((int(b), int(c), float(s)) for b, c, s in doc.get("decode_samples", ()))
    except (TypeError, ValueError):
        raise ProfileError("samples must be [tokens, seconds] / [batch, context, seconds] lists",
                           path=path, field=f"{where}.samples") from None
    return RoleProfile(MockTiming(**values),
                       Hardware(hw["gpu_model"], hw["gpus_per_worker"], float(hw.get("gpu_memory_gib", 0.0))),
                       limits[0], limits[1], prefill, decode)
