"""`dyn up --slurm` in a real Slurm allocation (Debian's slurmctld/slurmd/munge, own config).

The cluster has two Slurm nodes, each its own slurmd (own port, spool dir and
NodeName) on this machine (tests/slurm_cluster.py). That is enough for what
`--slurm` changes: the allocation's node list comes from Slurm (a real
two-node SLURM_JOB_NODELIST), the placement spreads workers over both nodes,
and each process is an `srun --jobid --overlap --nodelist=N -N1 -n1` step that
slurmctld routes to node N's slurmd (checked with `squeue --steps`), watched
through its srun client on the head and ended with `scancel`. Both slurmd
share this machine's network, so a network partition between Slurm nodes is
not exercised here; the SSH tests over network namespaces cover that for the
daemon's supervision, which is the same code. Many-node node lists (hostlist
expansion, GPUs per node) are tested on recorded Slurm outputs in
tests/deploy/test_slurm_allocation.py.

Flow: salloc runs `dyn up --slurm` (the allocation's real environment), a
request is served, a worker's step is cancelled and comes back as a new step,
`dyn down` leaves no step; a second bring-up in the same allocation sees the
allocation end (`scancel JOB`) and records it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from e2e_cluster import DYN, wait_for
from slurm_cluster import slurm_unavailable, start_slurm
from sshd import free_port

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(slurm_unavailable() is not None, reason=str(slurm_unavailable()))]

NAME = "slurm-e2e"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_slurm(tmp_path_factory.mktemp("slurm"), num_nodes=2) as c:
        yield c


def _recipe(tmp: Path, port: int) -> str:
    path = tmp / "recipe.yaml"
    text = Path(__file__).resolve().parents[2].joinpath("recipes", "mock-local.yaml").read_text()
    text = text.replace("port: 8000", f"port: {port}").replace("enabled: true", "enabled: false")
    path.write_text(text)
    return str(path)


class SlurmCli:
    def __init__(self, cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.env = {**cluster.env, "DYN_STATE_DIR": str(tmp / "state"), "DYN_NODE_STATE_DIR": str(tmp / "nodes"),
                    "DYN_TIMEOUTS": "register_s=60,load_s=60,heartbeat_s=5,stop_s=10"}

    def __call__(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        result = self("status", "--name", NAME, "--json", timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def step_nodes(self, job: str) -> dict[str, str]:
        """{step id: the node it runs on}."""
        out = self.cluster.run("squeue", "--steps", f"--jobs={job}", "-h", "--format=%i %N").stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def steps(self, job: str) -> dict[str, str]:
        """{step name: step id} of dyn's running steps in `job`."""
        out = self.cluster.run("squeue", "--steps", f"--jobs={job}", "-h", "--format=%i %j").stdout
        pairs = (line.split(" ", 1) for line in out.splitlines() if " dyn:" in line)
        return {name: step for step, name in pairs}


def test_up_serve_relaunch_down_and_allocation_end(cluster, tmp_path):
    import openai

    cli = SlurmCli(cluster, tmp_path)
    port = free_port()
    recipe = _recipe(tmp_path, port)
    out = tmp_path / "salloc.out"
    # salloc runs the command in a process group of its own and outlives a SIGTERM while it runs:
    # the command names its pid (its group) so the test can end it
    script = f'echo "COMMAND pid=$$"; {DYN} up --slurm -r {recipe} --name {NAME} --wait; echo "WAIT rc=$?"; ' \
             'exec sleep 600'
    with open(out, "wb") as handle:
        salloc = subprocess.Popen(["salloc", "-N2", "-J", "dyn-e2e", "sh", "-c", script], env=cli.env,
                                  stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    job = None
    try:
        wait_for(lambda: "ready in" in out.read_text() or "WAIT rc=" in out.read_text(), 120,
                 "dyn up --slurm inside salloc")
        text = out.read_text()
        assert "ready in" in text, text
        job = text.split("Granted job allocation ")[1].split()[0]
        status = cli.status()
        assert status["state"] == "running"
        workers = {w["id"]: w for w in status["workers"]}
        assert sorted(workers) == ["decode-0", "decode-1", "frontend", "prefill-0", "prefill-1"]
        assert {w["node"] for w in workers.values()} == set(cluster.nodes)  # placed over both Slurm nodes
        for w in workers.values():  # each process is a job step whose srun client the daemon watches
            argv = Path(f"/proc/{w['pid']}/cmdline").read_bytes().split(b"\0")
            assert argv[0] == b"srun" and f"--jobid={job}".encode() in argv
            assert f"--nodelist={w['node']}".encode() in argv and b"--overlap" in argv
        steps = cli.steps(job)
        assert sorted(n.split(":")[1:3] for n in steps) == sorted([NAME, f"{NAME}-{w}"] for w in workers)
        on_node = cli.step_nodes(job)  # where slurmctld actually ran each step
        assert {n.split(":")[2].removeprefix(f"{NAME}-"): on_node[s] for n, s in steps.items()} == \
            {w["id"]: w["node"] for w in workers.values()}

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model="mock-llama", max_tokens=8,
                                               messages=[{"role": "user", "content": "hello slurm"}])
        assert reply.usage.completion_tokens == 8

        # kill decode-0's step: the daemon sees its srun client end and starts a new step
        old_step = next(s for n, s in steps.items() if f":{NAME}-decode-0:" in n)
        assert cluster.run("scancel", "--signal=KILL", old_step).returncode == 0

        def relaunched():
            w = {w["id"]: w for w in cli.status()["workers"]}["decode-0"]
            new = [s for n, s in cli.steps(job).items() if f":{NAME}-decode-0:" in n]
            return w["restarts"] >= 1 and w["state"] == "ready" and new and new != [old_step]
        wait_for(relaunched, 60, "decode-0 relaunched as a new step")
        for i in range(4):  # both decode workers serve again
            reply = client.chat.completions.create(model="mock-llama", max_tokens=4,
                                                   messages=[{"role": "user", "content": f"again {i}"}])
            assert reply.usage.completion_tokens == 4
        logs = cli("logs", "--name", NAME, "decode-0", "-n", "200")  # read on the node through a step
        assert logs.returncode == 0 and "decode-0" in logs.stdout, logs.stderr

        # the daemon dies; `dyn up --wait` (holding the salloc shell) restarts it; it adopts the same steps
        env = {**cli.env, "SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": ",".join(cluster.nodes),
               "SLURM_JOB_CPUS_PER_NODE": f"1(x{len(cluster.nodes)})"}
        before = {w["id"]: w["pid"] for w in cli.status()["workers"]}
        daemon_pid = cli.status()["daemon"]["pid"]
        os.kill(daemon_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{daemon_pid}").exists() or
                 Path(f"/proc/{daemon_pid}/stat").read_text().split(") ")[1][0] == "Z", 10, "daemon gone")
        adopted = wait_for(lambda: (s := cli.status()).get("daemon", {}).get("pid") not in (None, daemon_pid)
                           and all(w["state"] == "ready" for w in s["workers"]) and s, 60, "a restarted daemon")
        assert {w["id"]: w["pid"] for w in adopted["workers"]} == before
        again = cli("up", "--slurm", "-r", recipe, "--name", NAME, env=env)  # same files: nothing to do
        assert again.returncode == 0 and "already running" in again.stdout, again.stderr + again.stdout

        down = cli("down", "--name", NAME)
        assert down.returncode == 0, down.stderr
        assert cli.steps(job) == {}
        assert not (tmp_path / "state" / NAME / "deployment.json").exists()
        wait_for(lambda: "WAIT rc=0" in out.read_text(), 30, "`dyn up --wait` to return after dyn down")
        assert "down (removed by `dyn down`); daemon restarted 1x" in out.read_text()

        # the same allocation with an SSH-style rack file: mapped onto the Slurm nodes tray by tray
        rack = tmp_path / "rack.yaml"
        rack.write_text("name: two-trays\nhead: tray1\nracks:\n  - name: r\n    nodes:\n"
                        "      - {name: tray1, address: 10.99.0.1}\n      - {name: tray2, address: 10.99.0.2}\n")
        held_out = tmp_path / "held.out"
        with open(held_out, "wb") as handle:
            held = subprocess.Popen([DYN, "up", "--slurm", "-t", str(rack), "-r", recipe, "--name", NAME, "--wait"],
                                    env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "ready in" in held_out.read_text() or held.poll() is not None, 120, "the second bring-up")
        assert held.poll() is None, held_out.read_text()
        assert len(cli.steps(job)) == 5
        placed = {w["node"] for w in cli.status()["workers"]}
        assert placed == {"tray1", "tray2"}
        assert set(cli.step_nodes(job).values()) == set(cluster.nodes)
        # then the allocation ends
        assert cluster.run("scancel", job).returncode == 0
        ended = wait_for(lambda: (s := cli.status())["state"] == "ended" and s, 60, "the daemon to notice")
        assert f"Slurm allocation {job} ended" in ended["error"]
        assert all(w["state"].startswith("exited") for w in ended["workers"])
        assert held.wait(timeout=30) == 1  # --wait returns, non-zero: the deployment did not end by request
        assert f"ended (daemon exited, phase ended: Slurm allocation {job} ended" in held_out.read_text()
        wait_for(lambda: not cli.steps(job), 30, "every step gone with the allocation")
        down = cli("down", "--name", NAME)
        assert down.returncode == 0, down.stderr
        assert not (tmp_path / "state" / NAME / "deployment.json").exists()
    finally:
        if job is not None:
            cluster.run("scancel", job)
        cli("down", "--name", NAME, "--force", timeout=60)
        if salloc.poll() is None:  # (once salloc has exited, so has its command: its pid may be reused)
            _end_command_group(out.read_text())
            os.killpg(salloc.pid, signal.SIGTERM)
            try:
                salloc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(salloc.pid, signal.SIGKILL)
                salloc.wait(timeout=5)


def _end_command_group(salloc_output: str) -> None:
    """SIGKILL the process group of salloc's command (named in its output); then salloc exits."""
    for line in salloc_output.splitlines():
        if line.startswith("COMMAND pid="):
            pid = int(line.removeprefix("COMMAND pid="))
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_doctor_over_slurm_steps(cluster, tmp_path):
    """`dyn doctor --slurm` probes each node of the allocation through a job step."""
    cli = SlurmCli(cluster, tmp_path)
    jobs = []
    try:
        for size, gres in (("-N2", ()), ("-N1", ("--gres=gpu:2",))):
            got = cluster.run("salloc", size, "--no-shell", *gres, timeout_s=30)
            assert got.returncode == 0, got.stderr
            jobs.append(got.stderr.split("Granted job allocation ")[1].split()[0])
        plain = {**cli.env, "SLURM_JOB_ID": jobs[0], "SLURM_JOB_NODELIST": ",".join(cluster.nodes)}
        with_gpus = {**cli.env, "SLURM_JOB_ID": jobs[1], "SLURM_JOB_NODELIST": cluster.node}
        result = cli("doctor", "--slurm", "--json", env=plain)
        assert result.returncode == 0, result.stderr
        found = {(f["node"], f["check"]): f for f in json.loads(result.stdout)}
        for node in cluster.nodes:  # every node of the allocation, each through its own step
            assert found[(node, "reachable")]["result"] == "ok" and found[(node, "dyn version")]["result"] == "ok"
            assert found[(node, "GPUs")]["detail"] == "skipped: no GPU"
        # Slurm hands out 2 GPUs (gres backed by plain files): the probe finds no NVIDIA GPU -> blocking
        result = cli("doctor", "--slurm", "--json", env=with_gpus)
        assert result.returncode == 1
        gpus = next(f for f in json.loads(result.stdout) if f["check"] == "GPUs")
        assert gpus["result"] == "FAIL" and "topology gives 2" in gpus["detail"] and "nvidia-smi" in gpus["fix"]
        assert not cli.steps(jobs[0]) and not cli.steps(jobs[1])  # the probe's steps are over
    finally:
        for job in jobs:
            cluster.run("scancel", job)

