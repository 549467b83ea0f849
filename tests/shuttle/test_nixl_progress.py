"""NIXL agents made in a dyn process poll for UCX events instead of spinning a core.

NIXL's Python agent starts its progress thread with a poll timeout of 0 (a busy loop);
dyn.shuttle.transports.nixl_progress sets the timeout where the config reaches the bindings.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from cpu_ticks import TICKS_PER_S, thread_ticks

from dyn.shuttle.transports import nixl
from dyn.shuttle.transports.nixl_progress import PROGRESS_POLL_US, quiet_progress_threads


class _Config:
    useProgThread: bool
    pthrDelay: int = 0  # (a property of the class, as in the bindings)

    def __init__(self, prog_thread: bool = True, delay_us: int = 0) -> None:
        self.useProgThread = prog_thread
        self.pthrDelay = delay_us


def _fake_api() -> tuple[SimpleNamespace, list]:
    made: list = []
    bindings = SimpleNamespace(nixlAgentConfig=_Config, nixlAgent=lambda name, config: made.append((name, config)))
    return SimpleNamespace(__name__="fake_nixl._api", nixlBind=bindings), made


def test_agents_made_after_it_poll_with_the_timeout_unless_their_caller_chose_one():
    api, made = _fake_api()
    assert quiet_progress_threads(api)
    assert quiet_progress_threads(api)  # once per process: a second call does not wrap again
    for config in (_Config(), _Config(delay_us=250), _Config(prog_thread=False)):
        api.nixlBind.nixlAgent("agent", config)
    assert [c.pthrDelay for _, c in made] == [PROGRESS_POLL_US, 250, 0]


def test_a_nixl_build_without_the_expected_bindings_is_left_alone():
    api = SimpleNamespace(__name__="other_nixl._api", nixlBind=SimpleNamespace(nixlAgent=lambda *a: None))
    agent = api.nixlBind.nixlAgent
    assert not quiet_progress_threads(api)
    assert api.nixlBind.nixlAgent is agent


@pytest.mark.skipif(not nixl.is_available(), reason="the nixl package is not installed")
def test_an_idle_real_agent_does_not_spin():
    before = set(thread_ticks())
    agent = nixl._new_agent("dyn-test")
    new = set(thread_ticks()) - before  # NIXL's threads, the progress thread among them
    assert new, "the agent started no thread"
    start = thread_ticks()
    time.sleep(1.0)
    end = thread_ticks()
    # A spinning progress thread takes all the CPU it is given (a second a second on an idle
    # core); a polling one wakes on UCX events and otherwise every PROGRESS_POLL_US.
    busiest = max(end.get(t, 0) - start.get(t, 0) for t in new) / TICKS_PER_S
    assert busiest <= 0.1, f"a NIXL thread used {busiest:.2f} s of CPU in 1 s while the agent was idle"
    del agent
