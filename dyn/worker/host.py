"""Several mock workers in one process (recipe model.mock_workers_per_process).

A mock worker stands in for a GPU in benchmarks; its engine takes no time. Seventy-two of them
as 72 Python processes on a small box measure the processes (interpreters, a ZMQ I/O thread
each, idle heartbeats, context switches between them), not the router in front: NVIDIA Dynamo's
mocker runs all its engines in one process for the same reason. Here each hosted worker is still
a whole worker (its own config, request plane, KV events, heartbeats, metrics and log file, in
its own logging context); only the process, its event loop and its ZMQ context (one I/O
thread, one ZAP handler) are shared.

Fate is shared, and said so: when one hosted worker ends (its engine loop died, the daemon went
silent, an essential task ended, it was stopped), the host stops the others (they drain) and
exits, so the daemon sees every one of them gone and relaunches each in a process of its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from dyn.config.process import ProcessConfig
from dyn.control.sockets import SharedContext
from dyn.errors import ConfigError
from dyn.logs import hosted_context
from dyn.worker.process import WorkerProcess

log = logging.getLogger(__name__)


def check_hosted(configs: list[ProcessConfig]) -> None:
    """Refuse a set of workers that may not share a process, naming the first that may not."""
    first = configs[0]
    for cfg in configs[1:]:
        if (cfg.deployment, cfg.node) != (first.deployment, first.node):
            raise ConfigError(f"{cfg.process_id} ({cfg.deployment} on {cfg.node}) cannot share a process with "
                              f"{first.process_id} ({first.deployment} on {first.node})")
        if not cfg.log_path:
            raise ConfigError(f"{cfg.process_id}: a hosted worker needs log_path in its config (its own log file)")


async def run_hosted(configs: list[ProcessConfig]) -> int:
    """Run every worker on this event loop until one ends, then stop the rest; the worst exit code."""
    detokenizers: dict = {}  # one tokenizer load for them all (else ~0.13 s each, serially)
    shared = SharedContext()
    workers = [WorkerProcess(cfg, own_signals=False, detokenizers=detokenizers, shared=shared)
               for cfg in configs]

    def stop_all() -> None:
        for worker in workers:
            worker.stop()

    aio = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio.add_signal_handler(sig, stop_all)
    tasks = [asyncio.create_task(worker.run(), name=worker.config.process_id,
                                 context=hosted_context(worker.config.process_id))
             for worker in workers]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    ended = next(iter(done)).get_name()
    log.info("worker %s ended: stopping the %d others this process hosts (they share its fate)", ended,
             len(tasks) - 1)
    stop_all()
    codes = []
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    shared.close()
    for task, outcome in zip(tasks, outcomes):
        if isinstance(outcome, BaseException):
            log.error("hosted worker %s failed: %r", task.get_name(), outcome, exc_info=outcome)
            outcome = 1
        codes.append(outcome)
    return max(codes)
