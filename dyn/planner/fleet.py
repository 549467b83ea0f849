"""The fleet: every desired process of a deployment, and the actions on them.

The daemon's loops call these methods; the fleet decides nothing about
timing (that is `health`) and speaks no protocol (that is `daemon`). It
writes each process's ProcessConfig and key file on its node, starts it
detached, probes pids per node, and kills what must die.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING, Callable, Sequence

from dyn.config.process import ProcessConfig
from dyn.errors import DynError, LaunchError
from dyn.logs import STACK_DUMP_SIGNAL
from dyn.planner.health import Deadlines, ProcessSlot, RestartBudget
from dyn.planner.nodes import Nodes
from dyn.planner.stack_dump import hung_stack_report
from dyn.planner.state import Deployment, ProcessRecord

if TYPE_CHECKING:
    from dyn.config.topology import Topology
    from dyn.control.keys import DeploymentKeys

log = logging.getLogger(__name__)

Clock = Callable[[], float]

STACK_DUMP_WAIT_S = 1.0
"""How long a hung process gets to write its stacks before its log is read (faulthandler writes
from the signal handler: milliseconds, plus the signal's trip over SSH)."""


class Fleet:
    def __init__(self, deployment: Deployment, topology: "Topology", keys: "DeploymentKeys" | None,
                 nodes: Nodes, deadlines: Deadlines, *, daemon_address: str = "",
                 heartbeat_interval_s: float = 1.0, daemon_grace_s: float = 30.0,
                 clock: Clock = time.monotonic) -> None:
        self.deployment = deployment
        self.topology = topology
        self.keys = keys
        self.nodes = nodes
        self.deadlines = deadlines
        self.daemon_address = daemon_address
        self.heartbeat_interval_s = heartbeat_interval_s
        self.daemon_grace_s = daemon_grace_s
        self.clock = clock
        self.extra: dict[str, dict[str, str]] = {}
        """Per-slot ProcessConfig.extra (a frontend replica's http_host and reuse_port)."""
        self.slots: dict[str, ProcessSlot] = {}
        self.events: list[str] = []
        """Recent notable events, newest last (shown by `dyn status`)."""

    def add(self, slot: ProcessSlot, *, max_restarts: int = 3, window_s: float = 600.0) -> None:
        assert slot.id not in self.slots, slot.id
        slot.budget = RestartBudget(max_restarts, window_s)
        slot.state_since = self.clock()
        self.slots[slot.id] = slot

    def adopt(self, record: ProcessRecord) -> None:
        """Take over a process a previous daemon launched; it must re-register or be relaunched."""
        slot = self.slots.get(record.id)
        if slot is None:
            return
        slot.pid, slot.run_dir, slot.log_path = record.pid, record.run_dir, record.log_path
        slot.config_path, slot.num_restarts = record.config_path, record.num_restarts
        slot.addresses = dict(record.addresses)
        if record.pid is not None and record.state not in ("exited", "gave_up", "pending"):
            slot.set_state("starting", self.clock())
            slot.adopted_state = record.state
            self.note(f"{slot.id}: adopting pid {record.pid} on {slot.node}")

    def note(self, text: str) -> None:
        log.info("%s", text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-50]

    def records(self) -> tuple[ProcessRecord, ...]:
        return tuple(ProcessRecord(id=s.id, role=s.role, node=s.node, gpus=s.gpus, pid=s.pid,
                                   run_dir=s.run_dir, log_path=s.log_path, config_path=s.config_path,
                                   state=s.state, addresses=dict(s.addresses), num_restarts=s.num_restarts)
                     for s in self.slots.values())

    async def write_files(self, node: str, slots: list[ProcessSlot]) -> None:
        """Write the ProcessConfig and key file of every slot on `node` in one command."""
        root = await self.nodes.run_root(node)
        files: dict[str, str] = {}
        for slot in slots:
            slot.run_dir = root
            slot.config_path = f"{root}/{slot.id}.json"
            slot.log_path = f"{root}/{slot.id}.log"
            keys_path = None
            if self.keys is not None:
                if slot.id not in self.keys.clients:
                    raise LaunchError(f"no CURVE key pair for {slot.id!r} in the deployment's keys.json",
                                      node=node, process=slot.id)
                keys_path = f"{root}/{slot.id}.keys.json"
                files[keys_path] = self.keys.for_process(slot.id).to_json()
            files[slot.config_path] = self._config(slot, keys_path).to_json()
        await self.nodes.put_files(node, files)

    async def launch(self, slot: ProcessSlot, *, files_written: bool = False,
                     hosted: Sequence[ProcessSlot] = ()) -> None:
        """Start the process (writing its files first unless done in bulk); failures mark the slot failed.
        `hosted`: workers on the same node that this one's process also runs (mock workers,
        dyn.worker.host); they share its pid, and its fate."""
        group = (slot, *hosted)
        now = self.clock()
        for member in group:
            member.set_state("launching", now)
            member.registered, member.last_heard, member.error, member.log_tail = False, None, "", ""
            member.metrics, member.addresses, member.adopted_state = {}, {}, None
        sent_start = False
        try:
            if not files_written:
                await self.write_files(slot.node, list(group))
            command = "frontend" if slot.role == "frontend" else "worker"
            argv = (*self._dyn_command(slot.node), command,
                    *(arg for member in group for arg in ("--config", member.config_path)))
            sent_start = True
            pid = await self.nodes.start(slot.node, f"{self.deployment.name}-{slot.id}", argv,
                                         slot.log_path, {"PYTHONUNBUFFERED": "1"})
        except (DynError, OSError, asyncio.TimeoutError) as exc:
            late = sent_start and _timed_out(exc)
            for member in group:
                if not late:
                    self.fail_launch(member, exc)
                    continue
                # The start command may have run and only its answer was late (overloaded node):
                # wait for the registration deadline instead of failing a process that may be up.
                member.pid = None
                member.set_state("starting", self.clock())
                self.note(f"{member.id}: start on {slot.node} did not answer in time ({exc}); "
                          "waiting for it to register")
            return
        for member in group:
            member.pid = pid
            member.set_state("starting", self.clock())
        self.note(f"{slot.id}: started on {slot.node} as pid {pid}"
                  + (f", hosting {', '.join(m.id for m in hosted)}" if hosted else ""))

    def fail_launch(self, slot: ProcessSlot, exc: BaseException) -> None:
        slot.set_state("failed", self.clock(), f"launch on {slot.node} failed: {exc}")
        self.note(f"{slot.id}: launch on {slot.node} failed: {exc}")

    async def sweep(self) -> dict[str, str]:
        """Probe every active pid, one command per node; return {slot id: why it failed}.

        A node we cannot reach right now is skipped (heartbeats still guard it):
        a transient SSH drop must not kill a healthy deployment.
        """
        by_node: dict[str, list[ProcessSlot]] = {}
        for slot in self.slots.values():
            if slot.is_active and slot.pid is not None and slot.state != "launching":
                by_node.setdefault(slot.node, []).append(slot)
        names = list(by_node)
        results = await asyncio.gather(*(self._alive(n, [s.pid for s in by_node[n]]) for n in names),
                                       return_exceptions=True)
        dead: dict[str, str] = {}
        for node, result in zip(names, results):
            if isinstance(result, BaseException):
                self.note(f"{node}: liveness probe failed ({result}); relying on heartbeats")
                continue
            for slot in by_node[node]:
                if slot.pid not in result and slot.is_active:
                    dead[slot.id] = f"process {slot.pid} on {node} is gone"
        return dead

    async def fetch_tail(self, slot: ProcessSlot, *, hung: bool = False) -> None:
        """Keep the end of the slot's log for its failure report. `hung`: the process stopped making
        progress; first ask it where it is (a stack dump into its log) and report that."""
        if not slot.log_path:
            return
        if hung:
            await self.kill(slot, STACK_DUMP_SIGNAL, timeout_s=3.0)  # a cut-off node: do not wait long
            await asyncio.sleep(STACK_DUMP_WAIT_S)
        try:
            tail = await asyncio.wait_for(self.nodes.tail(slot.node, slot.log_path, 400 if hung else 20), 10)
            slot.log_tail = hung_stack_report(tail) if hung else tail
        except Exception as exc:  # reporting a failure must survive a failing log read
            slot.log_tail = f"(could not read {slot.log_path}: {exc})"

    async def kill(self, slot: ProcessSlot, sig: int = signal.SIGKILL, *, timeout_s: float = 10.0) -> None:
        if slot.pid is None:
            return
        try:
            await asyncio.wait_for(self.nodes.kill(slot.node, slot.pid, sig), timeout_s)
        except Exception as exc:  # the pid may be gone, the node unreachable: report, carry on
            self.note(f"{slot.id}: signal {sig} to pid {slot.pid} on {slot.node} failed: {exc}")

    async def ensure_dead(self, slot: ProcessSlot, attempts: int = 3) -> bool:
        """SIGKILL the slot's process group until its pid is gone; False when that cannot be confirmed
        (node unreachable): relaunching then could run two copies on the same GPUs."""
        if slot.pid is None:
            return True
        for _ in range(attempts):
            await self.kill(slot, signal.SIGKILL)
            try:
                if slot.pid not in await self._alive(slot.node, [slot.pid]):
                    return True
            except Exception as exc:  # unreachable node: try again, then report
                self.note(f"{slot.id}: cannot check pid {slot.pid} on {slot.node}: {exc}")
            await asyncio.sleep(0.5)
        return False

    async def remove_secrets(self, slots: list[ProcessSlot]) -> None:
        """Delete config and key files (CURVE secrets) of stopped processes; logs stay."""
        by_node: dict[str, list[str]] = {}
        for slot in slots:
            if slot.config_path:
                by_node.setdefault(slot.node, []).extend(
                    [slot.config_path, slot.config_path.removesuffix(".json") + ".keys.json"])
        results = await asyncio.gather(*(asyncio.wait_for(self.nodes.remove(n, paths), 15)
                                         for n, paths in by_node.items()), return_exceptions=True)
        for node, result in zip(by_node, results):
            if isinstance(result, BaseException):
                self.note(f"{node}: could not remove key files ({result})")

    async def alive_slots(self) -> list[ProcessSlot]:
        """Slots whose process still runs (nodes we cannot reach count as alive)."""
        by_node: dict[str, list[ProcessSlot]] = {}
        for slot in self.slots.values():
            if slot.pid is not None:
                by_node.setdefault(slot.node, []).append(slot)
        names = list(by_node)
        results = await asyncio.gather(*(self._alive(n, [s.pid for s in by_node[n]]) for n in names),
                                       return_exceptions=True)
        alive: list[ProcessSlot] = []
        for node, result in zip(names, results):
            for slot in by_node[node]:
                if isinstance(result, BaseException) or slot.pid in result:
                    alive.append(slot)
        return alive

    async def _alive(self, node: str, pids: list[int]) -> set[int]:
        return await asyncio.wait_for(self.nodes.alive(node, pids), 15)

    def _dyn_command(self, node: str) -> tuple[str, ...]:
        if self.topology.node(node).ssh.is_local:
            return self.deployment.dyn_command
        return self.deployment.remote_dyn_command

    def _config(self, slot: ProcessSlot, keys_path: str | None) -> ProcessConfig:
        d = self.deployment
        extra = {"router_policy": d.router_policy} if d.router_policy else {}
        extra.update(self.extra.get(slot.id, {}))
        return ProcessConfig(
            deployment=d.name, process_id=slot.id, role=slot.role, node=slot.node,
            daemon_address=self.daemon_address, recipe_text=d.recipe_text, topology_text=d.topology_text,
            recipe_source=d.recipe_source, topology_source=d.topology_source, keys_path=keys_path,
            bind_host=self.topology.node(slot.node).bind_address, gpus=slot.gpus,
            cpu_threads=slot.cpu_threads, run_dir=slot.run_dir, log_path=slot.log_path,
            heartbeat_interval_s=self.heartbeat_interval_s, daemon_grace_s=self.daemon_grace_s,
            drain_grace_s=self.deadlines.stop_s / 2, extra=extra)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.TimeoutError) or "timed out" in str(exc)
