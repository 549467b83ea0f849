"""SlurmRunner: a node of a Slurm allocation, reached through `srun` job steps instead of SSH.

    head (inside allocation J)                          node N of J
    daemon --fork--> srun --jobid J --overlap -w N  ===>  slurmstepd -> dyn worker
                     (the process's handle: its pid on the head; the step is named
                      dyn:<process>:<token> so `scancel J.<step>` can find it)

* Short commands (`run`: probes, file writes, log tails) are blocking steps:
  `srun --jobid J --overlap --nodelist N -N1 -n1 -- argv`, stdin forwarded.
* Long-running processes (`start_detached`) are steps whose `srun` client
  runs detached on the head, in its own session. Its pid is the handle the
  daemon supervises (`process_runner()` is the head), the process's output
  goes to the log on the node (`--output`, written by slurmstepd there),
  and the worker registers with the srun pid (DYN_REGISTER_PID) so the
  daemon's bookkeeping stays one pid per process.
* Signals go to the step (`scancel --signal`), never just to srun: a
  SIGKILLed srun leaves its step running (measured, Slurm 22.05).

`--overlap` lets every step share the allocation's CPUs, memory and GPUs, so
no step waits for another; GPU pinning is the placement's, applied by the
worker from the GPUs Slurm gave the step (`step_visible_devices`).
"""

from __future__ import annotations

import os
import re
import secrets
import signal as _signal
from collections.abc import Mapping, Sequence

from dyn.config.topology import Node, SshTarget
from dyn.errors import LaunchError
from dyn.launch.local import LocalRunner
from dyn.launch.runner import CommandResult, LaunchedProcess, ProcessSpec, Runner
from dyn.launch.shell import ShellRunner

STEP_PREFIX = "dyn:"
"""Every step dyn starts is named dyn:<deployment>:<process>:<token> (`squeue --steps` shows it)."""
REGISTER_PID_ENV = "DYN_REGISTER_PID"
_STEP_NAME_RE = re.compile(r"--job-name=(dyn:[^\s\x00]+)")
_KEEP_SLURM_ENV = ("SLURM_CONF",)


def srun_argv(job_id: str, host: str, argv: Sequence[str], *, name: str = "dyn:cmd",
              output: str | None = None, chdir: str | None = None, num_gpus: int = 0) -> tuple[str, ...]:
    """The srun command for one single-task step on `host` of job `job_id`.

    `num_gpus` > 0 asks for that many of the node's GPUs explicitly (`--gres=gpu:N`): a step
    gets the job's GPUs by default, but not those an `--exclusive` job holds implicitly, and
    with ConstrainDevices a step sees only what it was given. `--overlap` lets every step
    share them; which ones a worker uses is its placement's (step_visible_devices).
    """
    if not argv:
        raise ValueError("empty command")
    out = ["srun", f"--jobid={job_id}", "--overlap", f"--nodelist={host}", "--nodes=1", "--ntasks=1",
           f"--job-name={name}", "--quiet", "--kill-on-bad-exit=1"]
    if num_gpus > 0:
        out.append(f"--gres=gpu:{num_gpus}")
    if output is not None:
        # slurmstepd expands %j, %s, ... in the path; a literal % is written %%
        out += [f"--output={output.replace('%', '%%')}", "--open-mode=append", "--input=none"]
    if chdir:
        out.append(f"--chdir={chdir}")
    return (*out, "--", *argv)


def srun_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """srun reads SLURM_* variables as option defaults (SLURM_NTASKS from sbatch, ...):
    pass none of the allocation's on, only where the cluster's config is."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith("SLURM_") or k in _KEEP_SLURM_ENV}


def step_visible_devices(gpus: Sequence[int], environ: Mapping[str, str]) -> str | None:
    """CUDA_VISIBLE_DEVICES for a worker placed on node GPUs `gpus`.

    Inside a Slurm step whose GPUs Slurm already listed in CUDA_VISIBLE_DEVICES,
    placement index i means the i-th GPU Slurm gave the job on this node; elsewhere
    (or when Slurm set nothing) the indices are used as they are. None: no GPUs.
    """
    if not gpus:
        return None
    given = environ.get("CUDA_VISIBLE_DEVICES", "")
    if "SLURM_STEP_ID" in environ and given and given != "NoDevFiles":
        listed = [g for g in given.split(",") if g]
        if max(gpus) >= len(listed):
            raise LaunchError(f"placement wants GPUs {list(gpus)} but the Slurm step sees only {given}: "
                              "the allocation has fewer GPUs on this node than the topology says; "
                              "rerun `dyn topo from-slurm` or ask salloc for more GPUs")
        return ",".join(listed[i] for i in gpus)
    return ",".join(str(g) for g in gpus)


class SlurmConnector:
    """`RunnerPool` connector: every node of the allocation becomes a SlurmRunner."""

    def __init__(self, job_id: str, environ: Mapping[str, str] | None = None, *, deployment: str = "") -> None:
        self.job_id = job_id
        self.deployment = deployment
        self.env = srun_env(environ)

    async def __call__(self, node: Node, options: object = None) -> Runner:
        return SlurmRunner(node, self.job_id, env=self.env, deployment=self.deployment)


class SlurmRunner(ShellRunner):
    """A node of allocation `job_id`; its address is the node's Slurm name."""

    def __init__(self, node: Node, job_id: str, *, env: dict[str, str] | None = None,
                 deployment: str = "") -> None:
        super().__init__(node)
        self.job_id = job_id
        self.step_prefix = step_prefix(deployment)
        self._step_names: dict[int, str] = {}
        """srun pid -> step name, for steps this runner started (a dead srun's cmdline is gone)."""
        self._head = LocalRunner(Node(name=f"{node.name}@head", rack=node.rack, ssh=SshTarget("local")),
                                 env=env if env is not None else srun_env())

    @property
    def host(self) -> str:
        return self.node.ssh.address

    @property
    def num_gpus(self) -> int:
        """GPUs every step asks for: up to the highest index the topology uses on the node."""
        return max((g.index for g in self.node.gpus), default=-1) + 1

    def process_runner(self) -> Runner:
        """Where the pids from `start_detached` live: the srun clients on the head."""
        return self._head

    async def run(self, argv: Sequence[str], *, timeout_s: float = 30,
                  input: str | None = None) -> CommandResult:
        if not argv:
            raise LaunchError("empty command", node=self.node.name)
        name = f"dyn-cmd:{secrets.token_hex(4)}"
        try:
            result = await self._head.run(srun_argv(self.job_id, self.host, argv, name=name,
                                                    num_gpus=self.num_gpus), timeout_s=timeout_s, input=input)
        except LaunchError:
            # the timeout SIGKILLed srun, which leaves its step running: end the step too
            await cancel_steps(self._head, self.job_id, name, prefix=None)
            raise
        if result.exit_status != 0 and _is_srun_failure(result.stderr):
            raise LaunchError(f"srun could not start a step on {self.host} in job {self.job_id}: "
                              f"{result.stderr.strip()[-300:]}; is the allocation still running "
                              f"(`squeue -j {self.job_id}`)?", node=self.node.name)
        return result

    async def start_detached(self, spec: ProcessSpec) -> LaunchedProcess:
        step_name = f"{self.step_prefix}{_step_safe(spec.name)}:{secrets.token_hex(4)}"
        inner = ["env", *(f"{k}={v}" for k, v in spec.env), *spec.argv]
        srun = srun_argv(self.job_id, self.host, inner, name=step_name, output=spec.log_path, chdir=spec.cwd,
                         num_gpus=self.num_gpus)
        # exec keeps one pid from setsid to srun, so the pid echoed is srun's and the worker can report it
        wrapper = ("sh", "-c", f'{REGISTER_PID_ENV}=$$; export {REGISTER_PID_ENV}; exec "$@"', "sh", *srun)
        # the log's directory on the node is the run dir the daemon wrote the config into
        local = ProcessSpec(name=spec.name, argv=wrapper, log_path=_srun_log(spec.log_path))
        launched = await self._head.start_detached(local)
        self._step_names[launched.pid] = step_name
        return LaunchedProcess(node=self.node.name, name=spec.name, pid=launched.pid, log_path=spec.log_path)

    async def is_alive(self, pid: int) -> bool:
        return await self._head.is_alive(pid)

    async def signal(self, pid: int, sig: int = _signal.SIGTERM, *, group: bool = True) -> None:
        """Signal the step's task (scancel --signal); SIGKILL also ends the srun client."""
        step = await self.step_of(pid)
        if step is not None:
            name = _signal.Signals(sig).name.removeprefix("SIG")
            result = await self._head.run(("scancel", "--quiet", f"--signal={name}", step), timeout_s=15)
            if not result.ok and "does not exist" not in result.stderr and "completed" not in result.stderr:
                raise LaunchError(f"scancel --signal={name} {step} failed: {result.stderr.strip()[-300:]}",
                                  node=self.node.name)
        if step is None or sig == _signal.SIGKILL:
            await self._head.signal(pid, sig, group=group)

    async def step_of(self, pid: int) -> str | None:
        """`job.step` of the step whose srun client is `pid`, None when it is gone."""
        name = self._step_names.get(pid) or await self._step_name(pid)
        if name is None:
            return None
        for step_id, step_name in await list_steps(self._head, self.job_id):
            if step_name == name:
                return step_id
        return None

    async def _step_name(self, pid: int) -> str | None:
        result = await self._head.run(("sh", "-c", f"tr '\\0' ' ' < /proc/{int(pid)}/cmdline"), timeout_s=15)
        match = _STEP_NAME_RE.search(result.stdout)
        return match.group(1) if match else None

    async def close(self) -> None:
        return None


async def list_steps(runner: Runner, job_id: str, prefix: str | None = STEP_PREFIX) -> list[tuple[str, str]]:
    """(step id "J.S", step name) of every running step of job `job_id` (named `prefix`...)."""
    result = await runner.run(("squeue", "--steps", f"--jobs={job_id}", "--noheader", "--format=%i %j"),
                              timeout_s=15)
    if not result.ok:
        return []
    steps = []
    for line in result.stdout.splitlines():
        step_id, _, name = line.strip().partition(" ")
        if prefix is None or name.startswith(prefix):
            steps.append((step_id, name))
    return steps


async def job_state(runner: Runner, job_id: str) -> str | None:
    """The allocation's state (RUNNING, COMPLETING, CANCELLED, ...); None once Slurm forgot it."""
    result = await runner.run(("squeue", f"--jobs={job_id}", "--noheader", "--format=%T"), timeout_s=15)
    text = result.stdout.strip()
    if result.ok and text:
        return text.splitlines()[0].strip()
    if "Invalid job id" in result.stderr or (result.ok and not text):
        return None
    raise LaunchError(f"cannot ask Slurm about job {job_id}: {(result.stderr or result.stdout).strip()[-300:]}",
                      node="head")


def step_prefix(deployment: str) -> str:
    """Name prefix of a deployment's steps: `dyn down` cancels exactly these."""
    return f"{STEP_PREFIX}{_step_safe(deployment) or '-'}:"


def _is_srun_failure(stderr: str) -> bool:
    return any(marker in stderr for marker in ("srun: error: Unable to", "Invalid job id", "Job has been cancelled",
                                               "srun: fatal", "Unable to confirm allocation",
                                               "Requested node configuration is not available"))


def _srun_log(log_path: str) -> str:
    return log_path.removesuffix(".log") + ".srun.log"


def _step_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]


async def cancel_steps(runner: Runner, job_id: str, name_prefix: str, *,
                       prefix: str | None = STEP_PREFIX) -> list[str]:
    """scancel every running step of `job_id` whose name starts with `name_prefix`; the ids ended."""
    steps = [step for step, name in await list_steps(runner, job_id, prefix) if name.startswith(name_prefix)]
    if steps:
        await runner.run(("scancel", "--quiet", *steps), timeout_s=15)
    return steps
