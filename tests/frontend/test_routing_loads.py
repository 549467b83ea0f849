"""The frontend's per-worker loads: kept between requests, rebuilt when their inputs change."""

from pathlib import Path

from dyn.config.loader import load_recipe
from dyn.frontend.breaker import BreakerBoard
from dyn.frontend.hints import Hints
from dyn.frontend.routing import Routing, _load
from dyn.frontend.workers import WorkerHandle, WorkerLimits

ROOT = Path(__file__).resolve().parents[2]
ROLES = frozenset({"both"})


class _Pool:
    def __init__(self, handles: list[WorkerHandle]) -> None:
        self.workers = {h.id: h for h in handles}


def _handle(wid: str, **metrics: float) -> WorkerHandle:
    return WorkerHandle(wid, "both", "", "", WorkerLimits(max_batch_size=4), metrics=dict(metrics))


def test_loads_follow_in_flight_counts_heartbeats_and_departures():
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
    handles = [_handle(f"w{i}", num_running=1.0) for i in range(3)]
    pool = _Pool(handles)
    routing = Routing(recipe, pool, seed=1)  # type: ignore[arg-type]
    bs = routing.block_size

    def fresh() -> list:
        return [_load(h, bs) for h in pool.workers.values()]

    first = routing._loads(ROLES, frozenset())
    assert first == fresh()
    assert routing._loads(ROLES, frozenset())[0] is first[0]  # nothing changed: the same object

    handles[0].in_flight, handles[0].in_flight_tokens = 9, 9 * bs  # a request opened here
    handles[1].metrics = {"num_running": 1.0, "waiting_prefill_tokens": 500.0}  # a heartbeat
    handles[2].peer_in_flight = 6  # another replica's requests
    now = routing._loads(ROLES, frozenset())
    assert now == fresh() and now[0].num_running == 4 and now[0].num_waiting == 5
    assert now[1].waiting_prefill_tokens == 500 and now[2].num_waiting == 2

    assert [ld.worker_id for ld in routing._loads(ROLES, frozenset({"w1"}))] == ["w0", "w2"]
    del pool.workers["w2"]
    assert [ld.worker_id for ld in routing._loads(ROLES, frozenset())] == ["w0", "w1"]
    choice = routing.choose_workers(list(range(64)), Hints())
    assert choice.decode in {"w0", "w1"}


def test_breakers_block_only_workers_of_the_pool_with_an_open_breaker():
    board = BreakerBoard(failure_threshold=1, cooldown_s=60.0, clock=lambda: 0.0)
    board.on_failure("w1")
    board.on_failure("gone")
    assert board.blocked({"w0": 1, "w1": 2}) == frozenset({"w1"})
    assert BreakerBoard(failure_threshold=1, cooldown_s=1.0).blocked({"w0": 1}) == frozenset()


def test_a_prompt_that_runs_whole_counts_no_workers_cache():
    """prompt_logprobs requests skip the prefix cache on the worker, so routing must not send them
    after a cache they will not use (nor count it as prefill saved)."""
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
    routing = Routing(recipe, _Pool([_handle("w0"), _handle("w1")]), seed=1)  # type: ignore[arg-type]
    prompt = list(range(64))
    first = routing.choose_workers(prompt, Hints())
    assert routing.choose_workers(prompt, Hints()).overlap_blocks > 0  # predicted from the first choice
    assert routing.choose_workers(prompt, Hints(), cached=False).overlap_blocks == 0
    assert first.decode in {"w0", "w1"}
