"""RunnerPool: one connection per node, opened lazily, fanned out with a bound.

`gather` runs a function on many nodes at once and reports every node, success
or failure (asyncssh `gather_results.py`); a dropped SSH connection is
reopened on the next `get`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from dyn.config.topology import Node
from dyn.errors import LaunchError
from dyn.launch.runner import Runner
from dyn.launch.ssh import SshOptions, connect

T = TypeVar("T")


class RunnerPool:
    """Async context manager owning one Runner per node; closes them all on exit."""

    def __init__(self, nodes: Sequence[Node], options: SshOptions, max_concurrency: int = 32, *,
                 connector: Callable[[Node, SshOptions], Awaitable[Runner]] = connect) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self._nodes = {node.name: node for node in nodes}
        if len(self._nodes) != len(nodes):
            raise ValueError("node names in a RunnerPool must be unique")
        self._options = options
        self._connect = connector
        """How a node is reached: SSH/local by default, `dyn.launch.slurm.SlurmConnector` in an allocation."""
        self._limit = asyncio.Semaphore(max_concurrency)
        self._runners: dict[str, Runner] = {}
        self._locks = {name: asyncio.Lock() for name in self._nodes}

    async def __aenter__(self) -> RunnerPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get(self, node_name: str) -> Runner:
        """The node's Runner, connecting (or reconnecting after a drop) if needed."""
        node = self._nodes.get(node_name)
        if node is None:
            raise LaunchError(f"unknown node {node_name!r}; the pool has {sorted(self._nodes)}")
        async with self._locks[node_name]:
            runner = self._runners.get(node_name)
            if runner is not None and getattr(runner, "is_connected", True):
                return runner
            if runner is not None:
                await runner.close()
            async with self._limit:
                runner = await self._connect(node, self._options)
            self._runners[node_name] = runner
            return runner

    async def gather(self, fn: Callable[[Runner], Awaitable[T]],
                     node_names: Iterable[str] | None = None) -> dict[str, T | BaseException]:
        """Run `fn` on each node (all nodes when None), at most max_concurrency at
        a time; the value or the exception of every node, in the order given."""
        names = list(self._nodes if node_names is None else node_names)

        async def one(name: str) -> T:
            runner = await self.get(name)
            async with self._limit:
                return await fn(runner)

        results = await asyncio.gather(*(one(name) for name in names), return_exceptions=True)
        for result in results:
            if isinstance(result, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise result
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        """Close every connection; detached processes on the nodes keep running."""
        runners, self._runners = list(self._runners.values()), {}
        await asyncio.gather(*(runner.close() for runner in runners), return_exceptions=True)
