"""Recipe: what the operator wants deployed, as frozen data.

Loaded and validated once from `recipes/*.yaml` (see dyn.config.loader).
Defaults here are the defaults of the file format; the README documents them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

EngineKind = Literal["torch", "vllm", "trtllm", "mock"]
Mode = Literal["aggregated", "disaggregated"]
Role = Literal["prefill", "decode", "both"]
RouterPolicy = Literal["kv", "round-robin", "least-loaded", "random"]
ReasoningParser = Literal["none", "deepseek_r1", "qwen3"]
ToolCallParser = Literal["none", "hermes", "llama3_json"]
Transport = Literal["auto", "cuda_ipc", "shm", "tcp", "nixl"]


@dataclass(frozen=True)
class SamplingDefaultsSpec:
    """What a request that leaves sampling fields out (temperature, top_p, top_k, min_p, penalties, chat's
    max_tokens) gets.

    A checkpoint's generation_config.json names the sampling its authors recommend (Llama 3.1
    Instruct: temperature 0.6, top_p 0.9); vLLM's OpenAI server and transformers apply it, so a
    model moved behind dyn answers as it did there. `from_model: false` starts from OpenAI's
    defaults (temperature 1, top_p 1, no top-k, chat up to the context end) instead; the fields
    set here override either."""

    from_model: bool = True
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """0: no top-k cut."""
    min_p: float | None = None
    max_tokens: int | None = None
    """Chat requests without max_tokens (completions keep OpenAI's 16)."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None


DEFAULTABLE = tuple(f.name for f in fields(SamplingDefaultsSpec) if f.name != "from_model")
"""The fields a deployment may give a default (recipe model.sampling_defaults, the model's
generation_config.json) for requests that leave them out."""


MAX_REPETITION_PENALTY = 10.0
"""Far above any useful value (1.0-1.5); the engines need only > 0."""


def sampling_default_problem(name: str, value: object) -> str | None:
    """Why `value` cannot be the default of `name` (the ranges the HTTP API accepts), or None."""
    if name not in ("top_k", "max_tokens"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if name == "temperature" and not 0.0 <= value <= 2.0:
            return f"must be in [0, 2], got {value:g}"
        if name == "top_p" and not 0.0 < value <= 1.0:
            return f"must be in (0, 1], got {value:g}"
        if name == "min_p" and not 0.0 <= value <= 1.0:
            return f"must be in [0, 1], got {value:g}"
        if name in ("presence_penalty", "frequency_penalty") and not -2.0 <= value <= 2.0:
            return f"must be in [-2, 2], got {value:g}"
        if name == "repetition_penalty" and not 0.0 < value <= MAX_REPETITION_PENALTY:
            return f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {value:g}"
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if name == "top_k" and value < 0:
        return f"must be at least 0 (0: no top-k cut), got {value}"
    if name == "max_tokens" and value < 1:
        return f"must be at least 1, got {value}"
    return None


@dataclass(frozen=True)
class MockTiming:
    """Timing model of the mock engine (seconds). Also its planner profile.

    prefill step time = prefill_base_s + prefill_s_per_token * batch_tokens
    decode step time  = decode_base_s + decode_s_per_seq * batch_size
                        + decode_s_per_ctx_token * total_context_tokens
    """

    prefill_base_s: float = 0.002
    prefill_s_per_token: float = 0.00002
    decode_base_s: float = 0.005
    decode_s_per_seq: float = 0.0001
    decode_s_per_ctx_token: float = 0.0
    num_kv_blocks: int = 4096
    """KV pool size in blocks (the mock holds no tensors)."""


@dataclass(frozen=True)
class ModelSpec:
    path: str
    """Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json), a `.gguf` file, or
    `pkg:MODULE` (the GGUF inside an installed Python package); see dyn/engine/sources.py."""
    engine: EngineKind = "torch"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    block_size: int = 16
    """Tokens per KV block; also the granularity of block hashes and routing."""
    max_context: int = 4096
    name: str | None = None
    """Served model name (OpenAI `model` field); default: the directory name."""
    mock: MockTiming = field(default_factory=MockTiming)
    mock_stream: Literal["coalesced", "per_step"] = "coalesced"
    """engine mock: how a worker hands its tokens over. coalesced: the tokens of back-to-back
    zero-time steps go out together (a message per request per burst of at most 2 ms, as the event
    loop wakes once for them); per_step: each step's tokens on their own, as an engine whose steps
    take real time streams them (and NVIDIA Dynamo's mocker): for like-for-like streaming benchmarks.
    Steps and tokens are the same either way; a mock step with modelled time always goes out alone."""
    mock_workers_per_process: int = 1
    """engine mock: workers hosted by one process on a node (dyn.worker.host), as NVIDIA Dynamo's
    mocker runs its engines, so a bench of many zero-time workers measures the router rather than
    many interpreters. Each stays a whole worker (request plane, KV events, heartbeats, log); they
    share the process's fate: one that ends stops the others, and each comes back on its own."""
    gpu_memory_utilization: float = 0.9
    """engine vllm: share of each GPU's memory vLLM may take (weights + activations + KV)."""
    enable_prefix_caching: bool = True
    """engine vllm: automatic prefix caching (the torch engine always caches)."""
    sampling_defaults: SamplingDefaultsSpec = field(default_factory=SamplingDefaultsSpec)
    reasoning_parser: ReasoningParser = "none"
    """Chat answers of a thinking model split into `reasoning_content` (inside <think>...</think>)
    and `content`, as vLLM's --reasoning-parser of the same name does (dyn.frontend.reasoning)."""
    tool_call_parser: ToolCallParser = "none"
    """Chat requests with `tools` get the calls the model writes as `tool_calls`, read as vLLM's
    --tool-call-parser of the same name reads them (dyn.frontend.tool_calls); none: a request
    with tools (tool_choice other than none) is refused."""
    engine_args: tuple[tuple[str, Any], ...] = ()
    """engine vllm: further vLLM EngineArgs (name, value) pairs, from the recipe's free-form
    `engine_args:` mapping; checked against vLLM's EngineArgs fields."""
    lora_adapters: tuple[tuple[str, str], ...] = ()
    """engine vllm: LoRA adapters served beside the base model, (name, adapter directory on every
    worker node: adapter_config.json + weights, as PEFT writes them), from the recipe's
    `lora_adapters:` mapping (vLLM's --lora-modules). A request names one as its `model`."""

    @property
    def served_name(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class WorkerGroup:
    """A set of identical workers of one role."""

    role: Role
    replicas: int = 1
    """Workers in the deployment; with a per-domain/per-rack count, that count times the units
    (set when the recipe is scaled to a topology, dyn.config.scaling)."""
    replicas_per_domain: int | None = None
    """Workers in each NVLink domain (a GPU node without NVLink peers is its own domain, a node
    of a CPU topology too): the recipe grows with the topology. Excludes `replicas`."""
    replicas_per_rack: int | None = None
    """Workers in each rack. Excludes `replicas` and `replicas_per_domain`."""
    tp: int = 1
    """Tensor-parallel size: GPUs per worker."""
    max_batch_size: int = 64
    max_num_batched_tokens: int = 2048
    """Per-step token budget (chunked prefill + decodes)."""
    kv_memory_gib: float | None = None
    """KV pool budget per worker; None: engine picks from free memory."""
    max_queue: int = 256
    """Waiting requests beyond which the frontend pushes back (429/503)."""
    cpu_threads: int | None = None
    """torch threads per worker on CPU nodes (None: cores / workers on the node)."""


@dataclass(frozen=True)
class RouterSpec:
    policy: RouterPolicy = "kv"
    prefill_weight: float = 8.0
    """Cost weight of uncached prefill blocks against queued prefill and active decode blocks.

    8 measured best on the first 2,000 Mooncake requests over 8 mock workers
    (hit rate 28.7% vs 21.7% at 1.0, against a 30% ideal; TTFT p99 lower too):
    decode blocks are cheap per step next to recomputing a block."""
    host_hit_credit: float = 0.75
    disk_hit_credit: float = 0.25
    temperature: float = 0.0
    """0: lowest cost wins; >0: softmax sampling to spread ties."""
    disagg_threshold_tokens: int = 256
    """Uncached prompt tokens above which a prefill worker is used."""
    session_affinity_slack: float = 0.2
    """A session stays on its worker while that worker's cost is within (1 + slack) x the best."""
    session_ttl_s: float = 600.0
    """Seconds a session's worker affinity lasts after its last request (agent hint session_id;
    a request's nvext.session_control.timeout_seconds overrides it)."""
    prediction_ttl_s: float = 120.0
    """Seconds the router trusts its own prediction of a worker's cache when the worker publishes
    no KV events."""
    max_migrations: int = 3
    """Times one request may move to another worker after its worker dies or stalls mid-stream;
    past it the client gets an error (0: never migrate)."""
    stall_timeout_s: float = 5.0
    """Seconds of silence past the expected prefill/decode step time after which a worker is
    presumed stalled and its requests migrate."""
    relaunch_wait_s: float | None = None
    """Seconds a request waits for a worker to come back when every worker it could use is
    relaunching, before it fails with 503. None: derived from the relaunch time the daemon
    measures (1.5x the slowest recent launch-to-ready, plus detection), never below
    stall_timeout_s."""
    breaker_failures: int = 3
    """Failures in a row (lost stream, stall, internal error) that open a worker's circuit
    breaker: it gets no new requests until breaker_cooldown_s has passed."""
    breaker_cooldown_s: float = 10.0
    """Seconds an open breaker waits before one probe request may test the worker again."""
    admission: bool = True
    """Refuse (429 + Retry-After) requests whose estimated TTFT exceeds planner.ttft_ms,
    using the engine profile; no profile: no admission control."""


@dataclass(frozen=True)
class PlannerSpec:
    enabled: bool = False
    ttft_ms: float = 1000.0
    itl_ms: float = 100.0
    min_prefill: int = 0
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    interval_s: float = 10.0
    cooldown_s: float = 30.0
    max_restarts: int = 3
    """Relaunches of one process allowed within restart_window_s; past it the process is left
    down (`gave_up`) and the deployment is degraded. Applies with the scaling planner off too."""
    restart_window_s: float = 600.0
    """Sliding window of the restart budget."""
    min_prefill_per_domain: int | None = None
    """Bounds per NVLink domain: min_prefill = this x domains when scaled to a topology.
    Each excludes its absolute twin (min_prefill here)."""
    max_prefill_per_domain: int | None = None
    min_decode_per_domain: int | None = None
    max_decode_per_domain: int | None = None


@dataclass(frozen=True)
class FrontendSpec:
    host: str = "127.0.0.1"
    port: int = 8000
    max_prompt_tokens: int | None = None
    log_prompts: bool = False
    """Log prompt and output text per request (off: they may hold tenants' private data)."""
    replicas: int = 1
    """Frontend processes. Replicas on one node share `port` (SO_REUSEPORT: the kernel spreads
    connections over them, so one address uses several cores); each builds its own KV index."""
    nodes: tuple[str, ...] = ()
    """Topology nodes that run frontends, replicas dealt round-robin; empty: the head node."""


@dataclass(frozen=True)
class KvTiersSpec:
    host_memory_gib: float = 0.0
    disk_gib: float = 0.0
    ttl_s: float | None = None
    """Host and disk tiers drop a block this long after it was offloaded (None: never);
    expiry publishes a removal event, so the router stops counting it."""
    retention_priority: int = 1
    """Priority of blocks kept by a retention hint that names none (or a per-message mark)."""
    max_retention_priority: int = 100
    """Retention priorities above this are capped (one tenant cannot pin the cache)."""
    retention_ttl_s: float | None = 3600.0
    """TTL of retained blocks when the hint names none (None: until evicted by priority)."""


@dataclass(frozen=True)
class AuthSpec:
    curve: bool = True
    """CURVE-authenticate and encrypt every ZMQ plane."""
    api_keys_file: str | None = None
    """Bearer tokens for the HTTP API (hashed at rest); None: open API."""
    share_cache_across_tenants: bool = False
    """False: each API-key tenant's KV blocks are salted with its name, so tenants never
    share cache hits; True: one salt for everyone."""


@dataclass(frozen=True)
class ShuttleSpec:
    transport: Transport = "auto"
    max_inflight_mib: int = 512
    pull_timeout_s: float = 30.0
    """How long a decode worker waits for a prompt's KV from the prefill worker (shuttle pull, or
    vLLM's KV connector) before it prefills the prompt itself; keep it under router.stall_timeout_s
    so the decode worker recovers before the frontend gives the request up."""


WeightsSource = Literal["auto", "disk", "peer"]


@dataclass(frozen=True)
class WeightsSpec:
    """Where a starting worker gets its weights (fast replica start, dyn.weights)."""

    source: WeightsSource = "auto"
    """auto: stream from a live peer holding the same weights when there is one, else disk;
    disk: always read the checkpoint; peer: like auto, but wait for a worker that is still
    loading the same weights instead of reading the disk in parallel."""
    peer_bandwidth_share: float = 0.5
    """Share (0 < s <= 1) of its path's bandwidth a serving worker gives to a starting one
    (token bucket on the sender); bounds the server's throughput dip."""


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    mode: Mode = "aggregated"
    workers: tuple[WorkerGroup, ...] = ()
    router: RouterSpec = field(default_factory=RouterSpec)
    planner: PlannerSpec = field(default_factory=PlannerSpec)
    frontend: FrontendSpec = field(default_factory=FrontendSpec)
    kv_tiers: KvTiersSpec = field(default_factory=KvTiersSpec)
    auth: AuthSpec = field(default_factory=AuthSpec)
    shuttle: ShuttleSpec = field(default_factory=ShuttleSpec)
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    source: str | None = None
    scaled_for: str | None = None
    """The topology whose size the per-domain counts were multiplied out for (None: not yet)."""
    lines: tuple[tuple[str, int], ...] = field(default=(), compare=False, repr=False)
    """(key path, 1-based line) from the file, so later checks (placement) can name a line."""

    def group(self, role: Role) -> WorkerGroup | None:
        for group in self.workers:
            if group.role == role:
                return group
        return None

    def line_of(self, path: str) -> int | None:
        """Line of a key path such as "workers.decode.tp" (or of its parent), if known."""
        known = dict(self.lines)
        while path:
            if path in known:
                return known[path]
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return None
