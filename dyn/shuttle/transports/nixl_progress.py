"""NIXL's progress thread, made to sleep until UCX has something for it.

NIXL's UCX backend runs a progress thread per agent that poll()s the UCX
workers' event descriptors, with the agent config's `pthrDelay` as the poll
timeout. NIXL's Python agent (`nixl_agent`) writes 0 there, so the thread
never sleeps: a core per agent while nothing moves. Measured here (2 cores,
two agents in one process): idle 2.00 cores; with a 5 ms timeout 0.02 cores,
and a 1 MiB READ p50 144 -> 99 us (the spinning threads had been taking the
cores from the transfer), over UCX_TLS=tcp 0.9 -> 1.4 ms. The thread still
wakes on every UCX event; the timeout only bounds a wake-up UCX failed to
signal (NIXL keeps the periodic wake-up for that).

The Python API offers no setting for it, and vLLM's NixlConnector builds its
agent itself, so the timeout is set where the config reaches the bindings:
their `nixlAgent` constructor, wrapped once per process. Every agent made in
the process after that (dyn's shuttle, vLLM's connector at tp=1, whose
engine runs in the worker process) gets it; an agent whose caller set a
timeout keeps it. vLLM's executor processes (tp > 1) are not reached.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

PROGRESS_POLL_US = 5_000
"""The progress thread's poll timeout, in microseconds (NIXL rounds it up to whole ms)."""

_WRAPPED = "_dyn_progress_poll_us"


def quiet_progress_threads(api: ModuleType) -> bool:
    """Make every NIXL agent created from now on in this process poll with PROGRESS_POLL_US
    instead of spinning. `api` is NIXL's `_api` module. False when this NIXL build does not
    look as expected (the agents then spin as the package made them)."""
    bindings = getattr(api, "nixlBind", None)
    real = getattr(bindings, "nixlAgent", None)
    if real is None or not hasattr(getattr(bindings, "nixlAgentConfig", None), "pthrDelay"):
        log.info("NIXL %s has no nixlBind.nixlAgent(config.pthrDelay): its progress threads stay "
                 "as the package starts them (polling without sleeping)", getattr(api, "__name__", api))
        return False
    if getattr(real, _WRAPPED, None) is not None:
        return True

    def agent(name: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        if config.useProgThread and config.pthrDelay == 0:
            config.pthrDelay = PROGRESS_POLL_US
        return real(name, config, *args, **kwargs)

    setattr(agent, _WRAPPED, PROGRESS_POLL_US)
    bindings.nixlAgent = agent
    return True
