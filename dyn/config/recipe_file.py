"""Recipe files: YAML -> `Recipe`, with every error located.

Types and unknown keys are checked by the schema walker over the recipe
dataclasses; this module adds what types cannot say: ranges, the mode/role
contract, and cross-field limits. Fit against a topology is placement's job.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

from dyn.config.recipe import (DEFAULTABLE, AuthSpec, FrontendSpec, KvTiersSpec, ModelSpec, PlannerSpec,
                               Recipe, RouterSpec, ShuttleSpec, WeightsSpec, WorkerGroup,
                               sampling_default_problem)
from dyn.config.schema import build, check_keys, join
from dyn.config.yamlmap import LocatedDoc, type_name

ROLES = ("prefill", "decode", "both")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
"""A LoRA adapter's served name (what a request sends as `model`)."""
_SECTIONS = {"router": RouterSpec, "planner": PlannerSpec, "frontend": FrontendSpec,
             "kv_tiers": KvTiersSpec, "auth": AuthSpec, "shuttle": ShuttleSpec,
             "weights": WeightsSpec}


def recipe_from_doc(doc: LocatedDoc) -> Recipe:
    data = doc.data
    check_keys(data, ("name", "model", "mode", "workers", *_SECTIONS), "", doc)
    if not isinstance(data.get("name"), str) or not NAME_RE.match(data["name"]):
        raise doc.error("name" if "name" in data else "",
                        "recipe needs `name:` made of letters, digits, '.', '_' or '-'")
    if "model" not in data:
        raise doc.error("", "missing required key 'model'", hint="add a model: section with path and engine")
    model = _model(doc, data["model"])
    sections = {key: build(cls, data[key], key, doc) for key, cls in _SECTIONS.items() if key in data}
    mode = data.get("mode", "aggregated")
    if mode not in ("aggregated", "disaggregated"):
        raise doc.error("mode", f"must be aggregated or disaggregated; got {mode!r}")
    workers = _workers(doc, data.get("workers"), mode)
    recipe = Recipe(name=data["name"], model=model, mode=mode, workers=workers, source=doc.source,
                    lines=tuple(sorted(doc.lines.items())), **sections)
    _check_sections(doc, recipe)
    if recipe.auth.api_keys_file:
        recipe = _replace_auth(recipe)
    return recipe


def _model(doc: LocatedDoc, raw: Any) -> ModelSpec:
    if not isinstance(raw, dict):
        raise doc.error("model", f"expected a mapping with path and engine, got {type_name(raw)}")
    engine = raw.get("engine", "torch")
    path = raw.get("path")
    if path is None:
        if engine != "mock":
            raise doc.error("model", "missing required key 'path'",
                            hint="point it at a Hugging Face checkpoint directory; only engine: mock may omit it")
        path = raw.get("name") if isinstance(raw.get("name"), str) else "mock"
    elif not isinstance(path, str) or not path.strip():
        raise doc.error("model.path", f"expected a directory path, got {type_name(path)} {path!r}")
    engine_args = _engine_args(doc, raw.get("engine_args"), engine)
    adapters = _lora_adapters(doc, raw.get("lora_adapters"), engine)
    fields = {k: v for k, v in raw.items() if k not in ("engine_args", "lora_adapters")}
    model = build(ModelSpec, fields, "model", doc,
                  extra={"path": os.path.expanduser(path), "engine_args": engine_args, "lora_adapters": adapters})
    _positive(doc, "model.block_size", model.block_size)
    _positive(doc, "model.max_context", model.max_context)
    if model.block_size > model.max_context:
        raise doc.error("model.block_size", f"block_size {model.block_size} exceeds max_context {model.max_context}")
    if not 0.0 < model.gpu_memory_utilization <= 1.0:
        raise doc.error("model.gpu_memory_utilization",
                        f"must be in (0, 1], got {model.gpu_memory_utilization:g}")
    if model.engine == "trtllm" and model.device == "cpu":
        raise doc.error("model.device", "engine trtllm runs on GPUs only; device cpu is impossible",
                        hint="use engine: torch for CPU, or device: cuda")
    timing = model.mock
    for key in ("prefill_base_s", "prefill_s_per_token", "decode_base_s", "decode_s_per_seq",
                "decode_s_per_ctx_token"):
        _at_least(doc, f"model.mock.{key}", getattr(timing, key), 0.0)
    _positive(doc, "model.mock.num_kv_blocks", timing.num_kv_blocks)
    _positive(doc, "model.mock_workers_per_process", model.mock_workers_per_process)
    for key in DEFAULTABLE:
        value = getattr(model.sampling_defaults, key)
        if value is not None and (problem := sampling_default_problem(key, value)) is not None:
            raise doc.error(f"model.sampling_defaults.{key}", problem)
    if model.mock_workers_per_process > 1 and model.engine != "mock":
        raise doc.error("model.mock_workers_per_process",
                        f"only engine mock hosts several workers in one process (engine is {model.engine!r})",
                        hint="remove mock_workers_per_process: a real engine's worker has a process of its own")
    if model.name is not None and not model.name.strip():
        raise doc.error("model.name", "served model name must not be blank")
    if model.served_name in dict(adapters):
        raise doc.error(f"model.lora_adapters.{model.served_name}", "an adapter cannot take the served model's name",
                        hint="rename the adapter")
    return model


def _engine_args(doc: LocatedDoc, raw: Any, engine: Any) -> tuple[tuple[str, Any], ...]:
    """`model.engine_args`: a free-form mapping for vLLM, checked against its EngineArgs."""
    if raw is None:
        return ()
    _vllm_mapping(doc, "engine_args", raw, engine, "vLLM engine arguments")
    from dyn.config.engine_args import check_engine_args  # reads vLLM's fields without importing it

    for key, message, hint in check_engine_args(raw):
        raise doc.error(f"model.engine_args.{key}", message, hint=hint)
    return tuple(sorted(raw.items()))


def _vllm_mapping(doc: LocatedDoc, key: str, raw: Any, engine: Any, what: str) -> None:
    """`model.<key>` must be a mapping of `what`, in a recipe whose engine is vllm."""
    if engine != "vllm":
        raise doc.error(f"model.{key}", f"{key} only apply to engine vllm (engine is {engine!r})",
                        hint=f"remove {key} or set engine: vllm")
    if not isinstance(raw, dict):
        raise doc.error(f"model.{key}", f"expected a mapping of {what}, got {type_name(raw)}")


def _lora_adapters(doc: LocatedDoc, raw: Any, engine: Any) -> tuple[tuple[str, str], ...]:
    """`model.lora_adapters`: {served name: adapter directory}, for engine vllm."""
    if raw is None:
        return ()
    _vllm_mapping(doc, "lora_adapters", raw, engine, "adapter names to directories")
    for name, path in raw.items():
        if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
            raise doc.error("model.lora_adapters", f"adapter name {name!r} must be 1-128 letters, digits or . _ : / -")
        if not isinstance(path, str) or not path.strip():
            raise doc.error(f"model.lora_adapters.{name}", f"expected the adapter's directory, got {type_name(path)}")
    return tuple((name, os.path.expanduser(path)) for name, path in raw.items())


def _workers(doc: LocatedDoc, raw: Any, mode: str) -> tuple[WorkerGroup, ...]:
    if not isinstance(raw, dict) or not raw:
        raise doc.error("workers" if raw is not None else "",
                        "`workers:` must map roles to groups, e.g. {prefill: {replicas: 1}, decode: {replicas: 1}}")
    check_keys(raw, ROLES, "workers", doc)
    wanted = ("prefill", "decode") if mode == "disaggregated" else ("both",)
    for role in raw:
        if role not in wanted:
            raise doc.error(f"workers.{role}", f"role '{role}' does not belong in mode {mode}",
                            hint=f"mode {mode} uses {' and '.join(wanted)} workers")
    required = "decode" if mode == "disaggregated" else "both"
    if required not in raw:
        raise doc.error("workers", f"mode {mode} needs a `{required}` group")
    groups = []
    for role in ROLES:
        if role not in raw:
            continue
        path = f"workers.{role}"
        body = raw[role] if raw[role] is not None else {}
        group = build(WorkerGroup, body, path, doc, skip=frozenset({"role"}), extra={"role": role})
        group = _per_unit_counts(doc, path, body, group)
        _at_least(doc, join(path, "replicas"), group.replicas, 0 if role == "prefill" else 1)
        for key in ("tp", "max_batch_size", "max_num_batched_tokens", "max_queue"):
            _positive(doc, join(path, key), getattr(group, key))
        if group.kv_memory_gib is not None and group.kv_memory_gib <= 0:
            raise doc.error(join(path, "kv_memory_gib"), "must be > 0 (or omit it to size from free memory)")
        if group.cpu_threads is not None:
            _positive(doc, join(path, "cpu_threads"), group.cpu_threads)
        groups.append(group)
    return tuple(groups)


def _check_sections(doc: LocatedDoc, r: Recipe) -> None:
    """What types cannot say about the optional sections, one checker per section, in file order."""
    _check_router(doc, r.router)
    _check_planner(doc, r)
    _check_frontend(doc, r.frontend, r.model.max_context)
    _check_kv_tiers(doc, r.kv_tiers)
    _positive(doc, "shuttle.max_inflight_mib", r.shuttle.max_inflight_mib)
    _positive(doc, "shuttle.pull_timeout_s", r.shuttle.pull_timeout_s)
    _check_weights(doc, r.weights)


def _check_router(doc: LocatedDoc, router: RouterSpec) -> None:
    _at_least(doc, "router.prefill_weight", router.prefill_weight, 0.0)
    for key in ("host_hit_credit", "disk_hit_credit"):
        value = getattr(router, key)
        if not 0.0 <= value <= 1.0:
            raise doc.error(f"router.{key}", f"must be between 0 and 1, got {value:g}")
    _at_least(doc, "router.temperature", router.temperature, 0.0)
    _at_least(doc, "router.disagg_threshold_tokens", router.disagg_threshold_tokens, 0)
    _at_least(doc, "router.session_affinity_slack", router.session_affinity_slack, 0.0)
    for key in ("session_ttl_s", "prediction_ttl_s"):
        if not 0 < getattr(router, key) <= 7 * 86400:
            raise doc.error(f"router.{key}", f"must be > 0 and at most 604800 seconds (a week), "
                            f"got {getattr(router, key):g}")
    _at_least(doc, "router.max_migrations", router.max_migrations, 0)
    if router.stall_timeout_s <= 0:
        raise doc.error("router.stall_timeout_s", f"must be > 0 seconds, got {router.stall_timeout_s:g}")
    if router.relaunch_wait_s is not None and not 0 < router.relaunch_wait_s <= 3600:
        raise doc.error("router.relaunch_wait_s", f"must be > 0 and at most 3600 seconds (or null: from the "
                        f"measured relaunch time), got {router.relaunch_wait_s:g}")
    if not 1 <= router.breaker_failures <= 1000:
        raise doc.error("router.breaker_failures", f"must be 1..1000, got {router.breaker_failures}")
    if not 0 < router.breaker_cooldown_s <= 3600:
        raise doc.error("router.breaker_cooldown_s", f"must be > 0 and at most 3600 seconds, "
                        f"got {router.breaker_cooldown_s:g}")
    if not 0 <= router.max_migrations <= 100:
        raise doc.error("router.max_migrations", f"must be 0..100, got {router.max_migrations}")


def _check_planner(doc: LocatedDoc, r: Recipe) -> None:
    planner = r.planner
    for key in ("ttft_ms", "itl_ms", "interval_s"):
        if getattr(planner, key) <= 0:
            raise doc.error(f"planner.{key}", f"must be > 0, got {getattr(planner, key):g}")
    _at_least(doc, "planner.cooldown_s", planner.cooldown_s, 0.0)
    if not 0 <= planner.max_restarts <= 10000:
        raise doc.error("planner.max_restarts", f"must be 0..10000 (0: never relaunch), got {planner.max_restarts}")
    if not 0 < planner.restart_window_s <= 7 * 86400:
        raise doc.error("planner.restart_window_s", f"must be > 0 and at most 604800 seconds (a week), "
                        f"got {planner.restart_window_s:g}")
    if planner.enabled and r.model.mock_workers_per_process > 1:
        raise doc.error("model.mock_workers_per_process",
                        "the planner starts and stops single workers; co-hosted mock workers share a process",
                        hint="set mock_workers_per_process: 1, or planner.enabled: false")
    raw_planner = doc.data.get("planner") or {}
    for role in ("prefill", "decode"):
        _check_planner_bounds(doc, planner, raw_planner, role, r.group(role))


def _check_planner_bounds(doc: LocatedDoc, planner: PlannerSpec, raw_planner: dict, role: str,
                          group: WorkerGroup | None) -> None:
    """One role's min/max (absolute or per NVLink domain), and the group's start count inside them."""
    low, high = getattr(planner, f"min_{role}"), getattr(planner, f"max_{role}")
    per_low, per_high = getattr(planner, f"min_{role}_per_domain"), getattr(planner, f"max_{role}_per_domain")
    for bound in ("min", "max"):
        key = f"{bound}_{role}"
        if f"{key}_per_domain" in raw_planner and key in raw_planner:
            raise doc.error(f"planner.{key}_per_domain", f"set {key} or {key}_per_domain, not both",
                            hint=f"{key}_per_domain multiplies by the topology's NVLink domains")
    for key, value in ((f"min_{role}_per_domain", per_low), (f"max_{role}_per_domain", per_high)):
        if value is not None:
            _at_least(doc, f"planner.{key}", value, 0)
    if per_low is not None and per_high is not None and per_low > per_high:
        raise doc.error(f"planner.max_{role}_per_domain",
                        f"max_{role}_per_domain {per_high} is below min_{role}_per_domain {per_low}")
    _at_least(doc, f"planner.min_{role}", low, 0)
    per_group = group.replicas_per_domain if group else None
    if (planner.enabled and per_group is not None and per_low is not None and per_high is not None
            and not per_low <= per_group <= per_high):
        raise doc.error(f"workers.{role}.replicas_per_domain",
                        f"{per_group} per domain is outside the planner's {per_low}..{per_high} per domain",
                        hint=f"start inside planner.min_{role}_per_domain..max_{role}_per_domain")
    if per_low is not None or per_high is not None or (group and _per_unit(group)):
        return  # absolute bounds and counts are checked once scaled to a topology
    if low > high:
        raise doc.error(f"planner.max_{role}", f"max_{role} {high} is below min_{role} {low}")
    if planner.enabled and group and not low <= group.replicas <= high:
        raise doc.error(f"workers.{role}.replicas",
                        f"{group.replicas} replicas is outside the planner's range {low}..{high}",
                        hint=f"start inside planner.min_{role}..max_{role}")


def _check_frontend(doc: LocatedDoc, front: FrontendSpec, max_context: int) -> None:
    if not 0 <= front.port <= 65535:
        raise doc.error("frontend.port", f"port must be 0-65535 (0: any free port), got {front.port}")
    _at_least(doc, "frontend.replicas", front.replicas, 1)
    if len(set(front.nodes)) != len(front.nodes):
        raise doc.error("frontend.nodes", "names a node twice (replicas are dealt round-robin over the list)")
    if not front.host.strip():
        raise doc.error("frontend.host", "must be an address such as 127.0.0.1")
    if front.max_prompt_tokens is not None and not 1 <= front.max_prompt_tokens <= max_context:
        raise doc.error("frontend.max_prompt_tokens",
                        f"must be 1..{max_context} (model.max_context), got {front.max_prompt_tokens}")


def _check_kv_tiers(doc: LocatedDoc, tiers: KvTiersSpec) -> None:
    _at_least(doc, "kv_tiers.host_memory_gib", tiers.host_memory_gib, 0.0)
    _at_least(doc, "kv_tiers.disk_gib", tiers.disk_gib, 0.0)
    for key in ("ttl_s", "retention_ttl_s"):
        value = getattr(tiers, key)
        if value is not None and value <= 0:
            raise doc.error(f"kv_tiers.{key}", "must be > 0 seconds (or null: no expiry)")
    if not 0 <= tiers.max_retention_priority <= 1000:
        raise doc.error("kv_tiers.max_retention_priority", f"must be 0..1000, got {tiers.max_retention_priority}")
    if not 0 <= tiers.retention_priority <= tiers.max_retention_priority:
        raise doc.error("kv_tiers.retention_priority",
                        f"must be 0..{tiers.max_retention_priority} (kv_tiers.max_retention_priority), "
                        f"got {tiers.retention_priority}")


def _check_weights(doc: LocatedDoc, weights: WeightsSpec) -> None:
    if weights.source not in ("auto", "disk", "peer"):
        raise doc.error("weights.source", f"must be auto, disk or peer; got {weights.source!r}")
    share = weights.peer_bandwidth_share
    if not 0.0 < share <= 1.0:
        raise doc.error("weights.peer_bandwidth_share",
                        f"must be in (0, 1], got {share:g}",
                        hint="the share of its path's bandwidth a serving worker gives a starting one; "
                             "use weights.source: disk to never stream from peers")


def _per_unit_counts(doc: LocatedDoc, path: str, body: dict, group: WorkerGroup) -> WorkerGroup:
    """At most one of replicas / replicas_per_domain / replicas_per_rack; until the recipe is
    scaled to a topology (dyn.config.scaling), `replicas` holds the count of one unit."""
    given = [k for k in ("replicas", "replicas_per_domain", "replicas_per_rack") if k in body]
    if len(given) > 1:
        raise doc.error(join(path, given[1]), f"set one of {', '.join(given)}, not several",
                        hint="replicas_per_domain grows with the topology; replicas is a fixed total")
    per = _per_unit(group)
    if per is None:
        return group
    _at_least(doc, join(path, given[0]), per, 0 if group.role == "prefill" else 1)
    return replace(group, replicas=per)


def _per_unit(group: WorkerGroup) -> int | None:
    return group.replicas_per_domain if group.replicas_per_domain is not None else group.replicas_per_rack


def _replace_auth(recipe: Recipe) -> Recipe:
    from dataclasses import replace

    auth = replace(recipe.auth, api_keys_file=os.path.expanduser(recipe.auth.api_keys_file))
    return replace(recipe, auth=auth)


def _positive(doc: LocatedDoc, path: str, value: int) -> None:
    if value < 1:
        raise doc.error(path, f"must be at least 1, got {value}")


def _at_least(doc: LocatedDoc, path: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise doc.error(path, f"must be at least {minimum:g}, got {value:g}")
