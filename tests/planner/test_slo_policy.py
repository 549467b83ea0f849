"""SloPolicy: heartbeat counters -> LoadWindow -> SloPlanner -> daemon actions (pure, fake clock)."""

from __future__ import annotations

import pytest

from dyn.config.loader import parse_recipe, parse_topology
from dyn.planner.decisions import DecisionLog, PlannerCollector
from dyn.planner.policy import Counts, StaticPolicy, WorkerView
from dyn.planner.actions import counts_of
from dyn.planner.slo_policy import SloPolicy, choose_policy

TOPOLOGY = parse_topology("""name: t
head: a
racks:
  - name: r
    nodes:
      - {name: a, address: local, gpus: 4, gpu_model: TEST-GPU, gpu_memory_gib: 80}
""", "t.yaml")

RECIPE = """name: scale
model:
  engine: mock
  block_size: 4
  mock: {prefill_base_s: 0.002, prefill_s_per_token: 0.002, decode_base_s: 0.02, decode_s_per_seq: 0.02}
mode: MODE
workers:
WORKERS
planner: {enabled: ENABLED, ttft_ms: 1000, itl_ms: 100, min_prefill: 1, max_prefill: 2, min_decode: 1,
          max_decode: 2, interval_s: 1, cooldown_s: 3}
"""
DISAGG = ("disaggregated", "  prefill: {replicas: 1, max_batch_size: 8, max_num_batched_tokens: 256}\n"
                           "  decode: {replicas: 1, max_batch_size: 8, max_num_batched_tokens: 256}")


def _recipe(mode_workers=DISAGG, enabled: str = "true", engine: str = "mock"):
    text = RECIPE.replace("MODE", mode_workers[0]).replace("WORKERS", mode_workers[1]).replace("ENABLED", enabled)
    return parse_recipe(text.replace("engine: mock", f"engine: {engine}" + ("\n  path: /nowhere/ckpt" if engine != "mock" else "")), "/nowhere/scale.yaml")


class Load:
    """Cumulative heartbeat counters of a fake deployment, advanced one interval at a time."""

    def __init__(self) -> None:
        self.workers = {"prefill-0": ("prefill", "ready"), "decode-0": ("decode", "ready")}
        self.counters = {wid: {"requests_total": 0.0, "num_computed_tokens": 0.0, "num_generated_tokens": 0.0,
                               "prefix_hit_blocks": 0.0, "uptime_s": 1.0} for wid in [*self.workers, "frontend"]}

    def step(self, num_requests: int, prompt: int, output: int) -> None:
        fe = self.counters["frontend"]
        fe["requests_total"] += num_requests
        decode = [w for w, (r, _) in self.workers.items() if r in ("decode", "both")]
        prefill = [w for w, (r, _) in self.workers.items() if r == "prefill"]
        for wid in prefill or decode:
            c = self.counters[wid]
            c["num_computed_tokens"] += num_requests * prompt / len(prefill or decode)
        for wid in decode:
            c = self.counters[wid]
            c["requests_total"] += num_requests / len(decode)
            c["num_computed_tokens"] += num_requests * output / len(decode)
            c["num_generated_tokens"] += num_requests * output / len(decode)

    def views(self) -> list[WorkerView]:
        out = [WorkerView("frontend", "frontend", "head", (), "ready", dict(self.counters["frontend"]))]
        for i, (wid, (role, state)) in enumerate(self.workers.items()):
            out.append(WorkerView(wid, role, "a", (i,), state, dict(self.counters[wid])))
        return out

    def apply(self, actions) -> None:
        for a in actions:
            if a.kind == "add":
                wid = f"{a.role}-{sum(1 for w in self.workers if w.startswith(a.role or ''))}"
                self.workers[wid] = (a.role, "ready")
                self.counters[wid] = dict.fromkeys(self.counters["frontend"], 0.0)
            elif a.kind == "remove":
                del self.workers[a.worker_id]
            elif a.kind == "set_role":
                self.workers[a.worker_id] = (a.role, "ready")


def test_choose_policy_says_why_the_planner_is_on_or_off(tmp_path):
    off = choose_policy(_recipe(enabled="false"), TOPOLOGY, "/nowhere/scale.yaml")
    assert isinstance(off.policy, StaticPolicy) and "disabled in the recipe" in off.note

    on = choose_policy(_recipe(), TOPOLOGY, "/nowhere/scale.yaml")
    assert isinstance(on.policy, SloPolicy) and "mock engine's timing model" in on.note
    assert on.policy.interval_s == 1.0 and on.policy.planner.gpu_budget == 4

    torch = choose_policy(_recipe(engine="torch"), TOPOLOGY, str(tmp_path / "scale.yaml"))
    assert isinstance(torch.policy, StaticPolicy)
    assert "no engine profile at" in torch.note and "scale.profile.json" in torch.note and "dyn profile" in torch.note

    (tmp_path / "scale.profile.json").write_text("{not json")
    bad = choose_policy(_recipe(engine="torch"), TOPOLOGY, str(tmp_path / "scale.yaml"))
    assert isinstance(bad.policy, StaticPolicy) and "bad profile" in bad.note and "not JSON" in bad.note


def test_load_step_flip_and_drop_become_add_set_role_and_remove():
    policy = choose_policy(_recipe(), TOPOLOGY, "/nowhere/scale.yaml").policy
    load, now = Load(), 0.0
    assert policy.decide(load.views(), now) == []  # the first call only takes a baseline
    assert policy.take_decisions() == []

    # load step: 2 req/s with 40-token outputs needs a second decode worker (ITL target)
    now += 1.0
    load.step(2, prompt=10, output=40)
    actions = policy.decide(load.views(), now)
    assert [(a.kind, a.role) for a in actions] == [("add", "decode")]
    assert policy.last_window.num_requests == 2 and policy.last_window.output_tokens == 80
    assert policy.last_window.input_tokens == 20
    decisions = policy.take_decisions()
    assert [(d.action, d.role, d.after.decode) for d in decisions] == [("scale_up", "decode", 2)]
    assert decisions[0].inputs["rate"] == 2.0 and policy.take_decisions() == []
    load.apply(actions)

    # outputs shrink (decode has a surplus), then prompts grow: a decode worker flips to prefill
    for _ in range(3):  # the decode scale-up's cooldown (3 s) passes at the same load
        now += 1.0
        load.step(2, prompt=10, output=40)
        assert policy.decide(load.views(), now) == []
    shape = [(10, 2), (10, 2), (200, 2), (200, 2), (200, 2)]
    for prompt, output in shape:
        now += 1.0
        load.step(2, prompt=prompt, output=output)
        actions = policy.decide(load.views(), now)
        if actions:
            break
    assert [(a.kind, a.role) for a in actions] == [("set_role", "prefill")]
    assert actions[0].worker_id in ("decode-0", "decode-1")
    assert any(d.action == "flip" for d in policy.take_decisions())
    load.apply(actions)
    assert counts_of(load.views()) == Counts(2, 1)

    # the load drops: after three surplus intervals outside the cooldown, one prefill worker goes
    removed = []
    for _ in range(12):
        now += 1.0
        load.step(0, prompt=0, output=0)
        actions = policy.decide(load.views(), now)
        removed += [a for a in actions if a.kind == "remove"]
        assert all(a.kind == "remove" for a in actions)
        load.apply(actions)
        if removed:
            break
    assert [(a.role, a.worker_id.split("-")[0] in ("prefill", "decode")) for a in removed] == [("prefill", True)]
    assert counts_of(load.views()) == Counts(1, 1)


def test_no_decode_scale_down_while_the_running_sequences_fill_both_workers():
    """Long outputs from closed-loop clients arrive in bursts: windows without arrivals while the
    sequences decode are no surplus (tests/e2e/test_planner_live.py lost its flip that way: decode
    was scaled down before prefill needed the worker). Once they finish, decode scales down."""
    policy = choose_policy(_recipe(), TOPOLOGY, "/nowhere/scale.yaml").policy
    load, now = Load(), 0.0
    policy.decide(load.views(), now)
    now += 1.0
    load.step(6, prompt=10, output=40)
    actions = policy.decide(load.views(), now)
    assert [(a.kind, a.role) for a in actions] == [("add", "decode")]
    load.apply(actions)
    for _ in range(3):  # the scale-up's cooldown (3 s) passes at the same load
        now += 1.0
        load.step(6, prompt=10, output=40)
        policy.decide(load.views(), now)
    decode = [w for w, (role, _) in load.workers.items() if role == "decode"]
    for wid in decode:  # 3 sequences each: the batch that meets the ITL target (0.02 + 0.02 x 3 <= 0.09 s)
        load.counters[wid]["num_running"] = 3.0
    for _ in range(8):  # no arrivals while they decode
        now += 1.0
        load.step(0, prompt=0, output=0)
        assert policy.decide(load.views(), now) == []
        assert policy.last_window.num_decoding == 6
    for wid in decode:
        load.counters[wid]["num_running"] = 0.0
    removed = []
    for _ in range(4):
        now += 1.0
        load.step(0, prompt=0, output=0)
        removed += [a for a in policy.decide(load.views(), now) if a.kind == "remove"]
    assert [a.role for a in removed] == ["decode"]


def test_restarted_counters_count_from_zero_and_a_new_daemon_baselines():
    policy = choose_policy(_recipe(), TOPOLOGY, "/nowhere/scale.yaml").policy
    load = Load()
    load.step(500, prompt=100, output=100)  # history from before this daemon started
    assert policy.decide(load.views(), 0.0) == []
    load.counters["frontend"]["requests_total"] = 3.0  # the frontend was relaunched
    policy.decide(load.views(), 2.0)
    assert policy.last_window.num_requests == 3 and policy.last_window.duration_s == 2.0
    assert policy.last_window.output_tokens == 0  # the workers saw nothing new


def test_aggregated_recipes_scale_both_workers_and_never_prefill():
    agg = ("aggregated", "  both: {replicas: 1, max_batch_size: 8, max_num_batched_tokens: 256}")
    policy = choose_policy(_recipe(agg), TOPOLOGY, "/nowhere/scale.yaml").policy
    load = Load()
    load.workers = {"worker-0": ("both", "ready")}
    load.counters["worker-0"] = dict(load.counters.pop("decode-0"))
    assert policy.decide(load.views(), 0.0) == []
    load.step(2, prompt=300, output=40)
    actions = policy.decide(load.views(), 1.0)
    assert [(a.kind, a.role) for a in actions] == [("add", "both")]
    assert all(d.role != "prefill" for d in policy.take_decisions())


def test_decision_log_feeds_status_and_prometheus():
    log = DecisionLog(maxlen=2)
    for i in range(3):
        log.decision({"action": "scale_up", "role": "decode", "num_workers": 1, "reason": f"r{i}"})
    log.action("add", "decode-1", "decode", "ok")
    assert [d["reason"] for d in log.to_dict()["decisions"]] == ["r1", "r2"]
    families = {f.name: f for f in PlannerCollector("dep", lambda: log, lambda: True).collect()}
    (sample,) = [s for s in families["dyn_planner_decisions"].samples if s.name.endswith("_total")]
    assert sample.labels == {"deployment": "dep", "action": "scale_up", "role": "decode"} and sample.value == 3
    assert families["dyn_planner_enabled"].samples[0].value == 1.0
    assert families["dyn_planner_actions"].samples[0].labels["outcome"] == "ok"


@pytest.mark.parametrize("state,counted", [("ready", True), ("loading", True), ("failed", True),
                                           ("draining", False), ("retiring", False), ("gave_up", False)])
def test_counts_ignore_workers_on_their_way_out(state, counted):
    views = [WorkerView("decode-0", "decode", "a", (0,), state, {})]
    assert counts_of(views).decode == (1 if counted else 0)


def test_latency_samples_come_from_histogram_bucket_deltas():
    from dyn.planner.slo_policy import _samples

    deltas = {"ttft_le.0.1": 2.0, "ttft_le.0.5": 5.0, "ttft_le.1.0": 5.0, "ttft_le.inf": 6.0,
              "itl_le.0.05": 0.0, "itl_le.inf": 0.0}
    assert _samples(deltas, "ttft") == (0.1, 0.1, 0.5, 0.5, 0.5, 2.0)
    assert _samples(deltas, "itl") == ()


def test_expected_output_hints_set_the_decode_demand_before_tokens_are_generated():
    policy = choose_policy(_recipe(), TOPOLOGY, "/nowhere/scale.yaml").policy
    load = Load()
    load.counters["frontend"].update(osl_requests_total=0.0, osl_tokens_total=0.0)
    policy.decide(load.views(), 0.0)
    # 4 requests arrive, 2 of them say they will answer 500 tokens; so far each generated 10.
    load.step(4, prompt=10, output=10)
    load.counters["frontend"]["osl_requests_total"] += 2
    load.counters["frontend"]["osl_tokens_total"] += 1000
    policy.decide(load.views(), 1.0)
    assert policy.last_window.output_tokens == 1000 + 2 * 10  # hinted: 500 each; the rest: the mean


def test_expected_time_to_ready_is_the_peer_figure_only_when_a_peer_can_serve():
    from dataclasses import replace

    from dyn.planner.slo_policy import expected_time_to_ready

    def view(wid, state, **metrics):
        return WorkerView(wid, "decode", "n", (), state, {k.replace("__", "."): v for k, v in metrics.items()})

    workers = [view("decode-0", "ready", time_to_ready_seconds__disk=40.0),
               view("decode-1", "ready", time_to_ready_seconds__peer=6.0),
               view("decode-2", "ready", **{"time_to_ready_seconds__peer+disk": 30.0})]
    assert expected_time_to_ready(workers) == (6.0, "peer")
    assert expected_time_to_ready(workers, "disk") == (35.0, "disk")  # median of 40 and 30 (peer+disk)
    nobody_ready = [replace(w, state="loading") for w in workers]
    assert expected_time_to_ready(nobody_ready) == (35.0, "disk")
    assert expected_time_to_ready([view("decode-0", "ready")]) == (0.0, "")
