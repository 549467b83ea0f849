#!/usr/bin/env python
"""Bring-up at rack scale on one machine: an NVL72-shaped topology of 18 "trays"
(real sshd instances on loopback, 4 GPUs each) running 72 mock workers.

Measures `dyn up` time to ready, daemon CPU and memory while 72 workers
heartbeat, control-plane messages/s the daemon sustains (CLI pings and
status requests from concurrent clients), and `dyn down` time; checks that
no process of the deployment survives. Every process started is killed by
pid at the end, even on failure.

    .venv/bin/python scripts/bench_bringup.py [--trays 18] [--gpus-per-tray 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DYN = str(Path(sys.executable).with_name("dyn"))

from dyn.launch.local import pid_alive  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trays", type=int, default=18)
    ap.add_argument("--gpus-per-tray", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=15.0, help="how long to watch the idle daemon")
    ap.add_argument("--load-s", type=float, default=5.0, help="length of each control-plane load phase")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    from sshd import free_port, start_sshd_hosts, write_known_hosts

    results: dict[str, float | int | str] = {"trays": args.trays, "workers": args.trays * args.gpus_per_tray}
    with tempfile.TemporaryDirectory(prefix="dyn-bench-") as tmp, contextlib.ExitStack() as stack:
        tmpdir = Path(tmp)
        t0 = time.monotonic()
        hosts = stack.enter_context(start_sshd_hosts(tmpdir / "sshd", args.trays))
        results["sshd_start_s"] = round(time.monotonic() - t0, 2)
        known = write_known_hosts(tmpdir / "known_hosts", hosts)
        topology = _topology(tmpdir, hosts, known, args.gpus_per_tray)
        recipe = _recipe(tmpdir, free_port(), args.trays * args.gpus_per_tray)
        env = {**os.environ, "DYN_STATE_DIR": str(tmpdir / "state"), "DYN_NODE_STATE_DIR": str(tmpdir / "nodes"),
               "DYN_TIMEOUTS": "register_s=240,load_s=120,stop_s=30"}
        pids: set[int] = set()
        stack.callback(_kill_all, pids)

        results["load_avg_1m_at_start"] = os.getloadavg()[0]
        t0, wall0 = time.monotonic(), time.time()
        up = subprocess.run([DYN, "up", "-t", topology, "-r", recipe, "--dyn-command", DYN], env=env,
                            capture_output=True, text=True, timeout=600)
        results["up_s"] = round(time.monotonic() - t0, 2)
        status = _status(env)
        pids.update(w["pid"] for w in status.get("workers", []) if w.get("pid"))
        if up.returncode != 0:
            print(up.stdout[-3000:], up.stderr[-3000:], file=sys.stderr)
            log = tmpdir / "state" / "dyn-bench-nvl72" / "daemon.log"
            if log.exists():
                Path("/tmp/dyn-bench-daemon.log").write_text(log.read_text())
                print("daemon log kept in /tmp/dyn-bench-daemon.log", file=sys.stderr)
            return 1
        results["load_avg_1m_before_down"] = -1.0
        results.update(_phases(tmpdir / "state" / "dyn-bench-nvl72" / "daemon.log", wall0))
        daemon_pid = status["daemon"]["pid"]
        pids.add(daemon_pid)
        results["num_ready"] = status["num_ready"]

        cpu0, msgs0, t0 = _cpu_s(daemon_pid), status["daemon"]["messages_total"], time.monotonic()
        time.sleep(args.sample_s)
        status = _status(env)
        elapsed = time.monotonic() - t0
        results["daemon_idle_cpu_percent"] = round(100 * (_cpu_s(daemon_pid) - cpu0) / elapsed, 1)
        results["daemon_rss_mib"] = round(_rss(daemon_pid) / 2**20, 1)
        results["heartbeat_msgs_per_s"] = round((status["daemon"]["messages_total"] - msgs0) / elapsed, 1)
        results["all_ready_after_sample"] = status["num_ready"] == status["num_processes"]
        results["daemon_max_loop_lag_s"] = status["daemon"].get("max_loop_lag_s", -1)

        store = tmpdir / "state" / "dyn-bench-nvl72"
        for action in ("ping", "status"):
            rate, cpu = _load(store, action, args.load_s, daemon_pid)
            results[f"cli_{action}_replies_per_s"] = round(rate, 1)
            results[f"daemon_cpu_percent_under_{action}_load"] = round(cpu, 1)

        results["load_avg_1m_before_down"] = os.getloadavg()[0]
        t0 = time.monotonic()
        down = subprocess.run([DYN, "down", "--name", "dyn-bench-nvl72"], env=env, capture_output=True,
                              text=True, timeout=300)
        results["down_s"] = round(time.monotonic() - t0, 2)
        results["down_ok"] = down.returncode == 0
        survivors = [p for p in pids if pid_alive(p)]
        results["alive_after_down"] = len(survivors)
        if survivors:
            results["survivors"] = "; ".join(f"{p}: {_cmdline(p)}" for p in survivors)
        if down.returncode != 0:
            print(down.stdout[-2000:], down.stderr[-2000:], file=sys.stderr)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if results["down_ok"] and not results["alive_after_down"] else 1


def _topology(tmp: Path, hosts, known: str, gpus: int) -> str:
    lines = ["name: bench-nvl72", "head: head", "racks:", "  - name: nvl72", "    nvlink: per-rack", "    nodes:",
             "      - name: head", "        address: local"]
    for i, h in enumerate(hosts):
        lines += [f"      - name: tray{i:02d}", f"        address: {h.host}", f"        port: {h.port}",
                  f"        user: {h.user}", f"        identity_file: {h.client_key_path}",
                  f"        known_hosts: {known}", f"        gpus: {gpus}", "        gpu_model: GB200",
                  "        gpu_memory_gib: 186"]
    path = tmp / "topology.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _recipe(tmp: Path, port: int, num_gpus: int) -> str:
    prefill = num_gpus // 3
    path = tmp / "recipe.yaml"
    path.write_text(f"""name: dyn-bench-nvl72
model: {{engine: mock, name: mock-llama}}
mode: disaggregated
workers:
  prefill: {{replicas: {prefill}}}
  decode: {{replicas: {num_gpus - prefill}}}
frontend: {{host: 127.0.0.1, port: {port}}}
shuttle: {{max_inflight_mib: 4}}   # the shuttle pre-allocates this much shared memory per worker
""")
    return str(path)


def _phases(log_path: Path, wall0: float) -> dict[str, float]:
    """When, after `dyn up` began, the daemon started, launched, saw registrations and readiness."""
    marks: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        at, msg = round(entry["ts"] - wall0, 2), entry.get("msg", "")
        marks.setdefault("t_daemon_listening_s", at) if "listening on" in msg else None
        if ": started on " in msg:
            marks.setdefault("t_first_launch_s", at)
            marks["t_last_launch_s"] = at
        if ": registered from " in msg:
            marks["t_last_registered_s"] = at
        if "processes ready" in msg:
            marks["t_all_ready_s"] = at
    return marks


def _status(env) -> dict:
    out = subprocess.run([DYN, "status", "--name", "dyn-bench-nvl72", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _load(store: Path, action: str, seconds: float, daemon_pid: int, num_clients: int = 4) -> tuple[float, float]:
    """Replies/s from `num_clients` DEALERs sending `action` back to back; daemon CPU% meanwhile."""
    import zmq

    from dyn.control.keys import load_process_keys
    from dyn.control.messages import CONTROL_CODEC, CliRequest

    keys = load_process_keys(store / "cli.keys.json")
    address = json.loads((store / "processes.json").read_text())["daemon"]["address"]
    frame = CONTROL_CODEC.encode(CliRequest(action=action))
    counts = [0] * num_clients
    stop = time.monotonic() + seconds

    def client(idx: int) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.curve_serverkey, sock.curve_publickey = keys.server_public.encode(), keys.public.encode()
        sock.curve_secretkey, sock.linger = keys.secret.encode(), 0
        sock.connect(address)
        window = 8  # requests in flight per client
        for _ in range(window):
            sock.send(frame)
        while time.monotonic() < stop:
            if sock.poll(1000):
                sock.recv()
                counts[idx] += 1
                sock.send(frame)
        sock.close()

    cpu0, t0 = _cpu_s(daemon_pid), time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(num_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return sum(counts) / elapsed, 100 * (_cpu_s(daemon_pid) - cpu0) / elapsed


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
