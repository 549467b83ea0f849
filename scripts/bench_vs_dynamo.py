"""dyn beside NVIDIA Dynamo on this machine: req/s and CPU-seconds per request, interleaved.

Both systems serve the same tokenizer (the peer kit's tiny Llama-3 tokenizer) with
two workers that take no time, and the peer kit's load generator (loadgen.py: OpenAI
chat, shared-prefix groups, 32 output tokens) measures both the same way, with the
CPU time of the PIDs it is given. Runs are interleaved (dyn R=1, dyn R=2, ..., Dynamo,
then again) so load from other users of the machine hits every system alike, and the
table reports CPU-seconds per request (less load-sensitive than req/s) next to req/s,
with the load average during each run. Not part of the test suite; needs the peer kit:

    cp -r /work/shared/peers /tmp/peer-dynamo && (cd /tmp/peer-dynamo && ./run_peer.sh install)
    .venv/bin/python scripts/bench_vs_dynamo.py --peer-dir /tmp/peer-dynamo --replicas 1,2 --rounds 3

Like for like: dyn's mock hands each engine step's tokens over on their own by default
(`--mock-stream per_step`), as Dynamo's mocker does (32 SSE events per streamed request, the
"stream events/req" column). `--mock-stream coalesced` lets back-to-back zero-time steps go out
together, which only an engine faster than the event loop does: a row measured that way is
not comparable with Dynamo's.

TTFT at saturation says where the in-flight requests wait: read it next to e2e. Dynamo's mocker
spreads a request's tokens out (measured here: 0.4-1.4 ms between tokens at these loads), so its
first token comes early; dyn's zero-time mock runs a request's steps back to back, so its requests
wait before their first token and then finish within ~1-3 ms.

Security differs by default: dyn authenticates and encrypts its request and event planes (CURVE),
Dynamo 1.6.1's TCP request plane and ZMQ event plane are plaintext unless its TLS variables are
set. `--plaintext` adds a dyn row with `auth: {curve: false}`, the like-for-like one on this point.

A change measured against the code before it, in the same interleaved rounds: add
`--before-dyn /path/to/other/checkout/.venv/bin/dyn` (rows "dyn before"). A rack's worth of
mock workers, where the frontend's routing over every worker is what is measured:
`--workers 72 --replicas 1` (each side runs 72 zero-time workers; ~130 MB per dyn mock worker).

No Dynamo code is part of dyn: the kit installs it into its own venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DYN = str(Path(sys.executable).with_name("dyn"))
MODEL = "tiny-llama"

RECIPE = """name: {name}
model:
  engine: mock
  path: {model}
  name: tiny-llama
  block_size: 16
  max_context: 8192
{mock_stream_line}{per_process_line}  mock: {{prefill_base_s: 0.0, prefill_s_per_token: 0.0, decode_base_s: 0.0, decode_s_per_seq: 0.0,
         num_kv_blocks: {kv_blocks}}}
mode: aggregated
workers:
  both: {{replicas: {workers}, max_batch_size: 64}}
router: {{policy: {policy}}}
frontend: {{host: 127.0.0.1, port: {port}, replicas: {replicas}}}
auth: {{curve: {curve}}}
"""


class DynSystem:
    def __init__(self, state: Path, peer: Path, port: int, replicas: int, workers: int, kv_blocks: int,
                 policy: str = "kv", dyn: str = DYN, tag: str = "", mock_stream: str = "coalesced",
                 curve: bool = True, per_process: int = 1) -> None:
        self.dyn = dyn
        self.name = (f"vs-r{replicas}-{policy.replace('_', '-')}{'-' + tag if tag else ''}"
                     f"{'' if curve else '-plain'}{f'-h{per_process}' if per_process > 1 else ''}")
        self.label = (f"dyn{' ' + tag if tag else ''} ({replicas} frontend{'s' if replicas > 1 else ''}"
                      f"{'' if policy == 'kv' else ', ' + policy}{'' if curve else ', no CURVE'}"
                      f"{f', {per_process} workers a process' if per_process > 1 else ''})")
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "DYN_STATE_DIR": str(state / "state"), "DYN_NODE_STATE_DIR": str(state / "nodes")}
        self.recipe = state / f"{self.name}.yaml"
        self.recipe.write_text(RECIPE.format(name=self.name, model=peer / "model", port=port, replicas=replicas,
                                             workers=workers, kv_blocks=kv_blocks, policy=policy,
                                             curve="true" if curve else "false",
                                             per_process_line=(f"  mock_workers_per_process: {per_process}\n"
                                                               if per_process > 1 else ""),
                                             mock_stream_line=("" if mock_stream == "coalesced"
                                                               else f"  mock_stream: {mock_stream}\n")))
        self.workers = workers
        self.frontend_pids: list[int] = []
        self.worker_pids: list[int] = []
        self.replica_urls: list[str] = []

    def start(self) -> None:
        up = subprocess.run([self.dyn, "up", "-t", str(ROOT / "topologies" / "local.yaml"), "-r", str(self.recipe)],
                            env=self.env, capture_output=True, text=True, timeout=180 + 10 * self.workers)
        if up.returncode:
            raise SystemExit(f"dyn up failed: {up.stdout}{up.stderr}")
        status = json.loads(subprocess.run([self.dyn, "status", "--name", self.name, "--json"], env=self.env,
                                           capture_output=True, text=True, timeout=30, check=True).stdout)
        self.frontend_pids = [w["pid"] for w in status["workers"] if w["role"] == "frontend"]
        self.replica_urls = [f["replica_url"] for f in status.get("frontends", []) if f["replica_url"]]
        # (hosted mock workers share a pid: count each process once)
        self.worker_pids = sorted({w["pid"] for w in status["workers"] if w["role"] != "frontend"})

    def stop(self) -> None:
        subprocess.run([self.dyn, "down", "--name", self.name, "--force"], env=self.env, capture_output=True,
                       timeout=120 + 2 * self.workers)


class DynamoSystem:
    label = "Dynamo 1.6.1"

    def __init__(self, peer: Path, port: int, workers: int) -> None:
        self.peer, self.port, self.workers = peer, port, workers
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "PEER_DIR": str(peer), "PORT": str(port), "SPEEDUP": "100000"}
        self.frontend_pids: list[int] = []
        self.worker_pids: list[int] = []
        self.replica_urls: list[str] = []

    def start(self) -> None:
        subprocess.run([str(self.peer / "run_peer.sh"), "start", str(self.workers)], env=self.env, check=True,
                       capture_output=True, timeout=180 + 2 * self.workers)
        self.frontend_pids = [int((self.peer / "frontend.pid").read_text())]
        self.worker_pids = [int((self.peer / "mocker.pid").read_text())]

    def stop(self) -> None:
        subprocess.run([str(self.peer / "run_peer.sh"), "stop"], env=self.env, capture_output=True, timeout=60)


def run_load(peer: Path, system, n: int, concurrency: int, stream: bool, groups: int) -> dict:
    pids = system.frontend_pids + system.worker_pids
    cmd = [str(peer / "venv" / "bin" / "python"), str(peer / "loadgen.py"), "--url", system.url,
           "--model", MODEL, "-n", str(n), "-c", str(concurrency), "--pids", ",".join(map(str, pids)),
           "--timeout", "240", "--groups", str(groups)]
    if not stream:
        cmd.append("--no-stream")
    load_before = os.getloadavg()[0]
    served_before = [served(u) for u in system.replica_urls]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    split = [served(u) - b for u, b in zip(system.replica_urls, served_before)]
    if out.returncode:
        raise SystemExit(f"loadgen failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])

    def cpu_s(group: list[int]) -> float:
        return sum(r.get(f"cpu_pct_pid{p}", 0.0) for p in group) / 100 * r["wall_s"]

    ok = max(r["ok"], 1)
    return {"system": system.label, "stream": stream, "concurrency": concurrency, "ok": r["ok"],
            "errors": r["errors"], "req_per_s": r["req_per_s"], "ttft_ms_p50": r["ttft_ms_p50"],
            "e2e_ms_p50": r["e2e_ms_p50"],
            "frontend_cpu_ms_per_req": 1e3 * cpu_s(system.frontend_pids) / ok,
            "workers_cpu_ms_per_req": 1e3 * cpu_s(system.worker_pids) / ok,
            "total_cpu_ms_per_req": 1e3 * cpu_s(pids) / ok, "mean_cached_tokens": r["mean_cached_tokens"],
            # Streamed: SSE events with content per request (32 output tokens; the loadgen counts events).
            # Dynamo's mocker sends each step's token on its own; dyn's zero-time mock hands over the tokens
            # of back-to-back steps together, so its frontend handles fewer events per request.
            "events_per_req": round(r["out_tok_per_s"] / r["req_per_s"], 2) if stream and r["req_per_s"] else None,
            "load_avg": round((load_before + os.getloadavg()[0]) / 2, 2),
            # requests each frontend replica answered (the kernel deals connections over replicas that
            # share a port; the load generator keeps `concurrency` connections open)
            "replica_split": split if len(split) > 1 else None}


def served(replica_url: str) -> int:
    """Chat completions one frontend replica has answered so far (from its own /metrics)."""
    with urllib.request.urlopen(replica_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("dyn_frontend_requests_total{") and "chat" in line))


def table(results: list[dict]) -> str:
    rows = ["| workload | system | req/s (median) | frontend CPU ms/req | workers CPU ms/req | total CPU ms/req"
            " | TTFT p50 ms | e2e p50 ms | cached tok | stream events/req | load avg | runs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in results:
        key = (r["stream"], r["concurrency"], r["system"])
        if key not in keys:
            keys.append(key)
    for stream, conc, system in keys:
        rs = [r for r in results if (r["stream"], r["concurrency"], r["system"]) == (stream, conc, system)]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        rows.append(f"| {'stream' if stream else 'non-stream'} c={conc} | {system} | {med('req_per_s'):.0f} "
                    f"({min(r['req_per_s'] for r in rs):.0f}-{max(r['req_per_s'] for r in rs):.0f}) | "
                    f"{med('frontend_cpu_ms_per_req'):.2f} | {med('workers_cpu_ms_per_req'):.2f} | "
                    f"{med('total_cpu_ms_per_req'):.2f} | {med('ttft_ms_p50'):.1f} | {med('e2e_ms_p50'):.1f} | "
                    f"{med('mean_cached_tokens') or 0:.0f} | {_events(rs)} | {med('load_avg'):.1f} | {len(rs)} |")
    return "\n".join(rows)


def _events(rs: list[dict]) -> str:
    events = [r["events_per_req"] for r in rs if r.get("events_per_req") is not None]
    return f"{statistics.median(events):.1f}" if events else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-dir", type=Path, default=Path("/tmp/peer-dynamo"))
    ap.add_argument("--replicas", default="1,2", help="dyn frontend replica counts to measure")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline-policy", default=None,
                    help="also run dyn with one frontend and this router policy (e.g. round_robin)")
    ap.add_argument("--kv-blocks", type=int, default=8192, help="KV blocks per dyn mock worker")
    ap.add_argument("--groups", type=int, default=8, help="shared-prefix groups in the workload")
    ap.add_argument("--workloads", default="nostream:8,stream:32",
                    help="comma list of (stream|nostream):concurrency")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000, help="requests per run")
    ap.add_argument("--port", type=int, default=18431, help="first dyn port (one per replica count)")
    ap.add_argument("--dynamo-port", type=int, default=18430)
    ap.add_argument("--no-dynamo", action="store_true", help="measure dyn only")
    ap.add_argument("--before-dyn", default=None,
                    help="also run another dyn checkout's CLI (e.g. /work/main/.venv/bin/dyn), labelled "
                         "'dyn before', same replica counts: an interleaved A/B of a change")
    ap.add_argument("--plaintext", action="store_true",
                    help="also run dyn with one frontend and auth.curve: false: dyn encrypts its request and "
                         "event planes by default (CURVE), Dynamo's TCP request plane is plaintext")
    ap.add_argument("--hosted", type=int, default=None, metavar="K",
                    help="also run dyn (same replica counts) with its mock workers K to a process "
                         "(model.mock_workers_per_process), as Dynamo's mocker hosts all its engines in one")
    ap.add_argument("--hosted-only", action="store_true",
                    help="with --hosted: no rows of a process per worker (72 of them idle load the box "
                         "for every other row of the run); --before-dyn, --baseline-policy and --plaintext "
                         "rows are hosted too")
    ap.add_argument("--out", type=Path, default=None, help="also write every run as JSON here")
    ap.add_argument("--mock-stream", choices=("coalesced", "per_step"), default="per_step",
                    help="dyn's mock hands over each step's tokens on their own (per_step, the default: one "
                         "message and SSE event per token, as Dynamo's mocker and any engine whose steps take "
                         "time) or back-to-back zero-time steps' together (coalesced: what dyn does when "
                         "steps are faster than its event loop; not like for like with Dynamo)")
    a = ap.parse_args()
    if not (a.peer_dir / "venv").is_dir() or not (a.peer_dir / "model" / "tokenizer.json").is_file():
        raise SystemExit(f"{a.peer_dir}: install the peer kit first (see this script's docstring)")
    state = Path(tempfile.mkdtemp(prefix="dyn-vs-"))
    systems: list = [] if a.hosted_only else [DynSystem(state, a.peer_dir, a.port + i, int(r), a.workers,
                                                        a.kv_blocks, mock_stream=a.mock_stream)
                                              for i, r in enumerate(a.replicas.split(","))]
    if a.hosted_only and not a.hosted:
        raise SystemExit("--hosted-only needs --hosted K")
    compared = a.hosted if a.hosted_only else 1  # workers a process in the before/baseline/plaintext rows
    if a.before_dyn:  # (a checkout without model.mock_stream refuses per_step: its dyn up names the key)
        systems += [DynSystem(state, a.peer_dir, a.port + len(systems) + i, int(r), a.workers, a.kv_blocks,
                              dyn=a.before_dyn, tag="before", mock_stream=a.mock_stream,
                              per_process=compared)
                    for i, r in enumerate(a.replicas.split(","))]
    if a.baseline_policy:
        systems.append(DynSystem(state, a.peer_dir, a.port + len(systems), 1, a.workers, a.kv_blocks,
                                 a.baseline_policy, mock_stream=a.mock_stream, per_process=compared))
    if a.plaintext:
        systems.append(DynSystem(state, a.peer_dir, a.port + len(systems), 1, a.workers, a.kv_blocks,
                                 mock_stream=a.mock_stream, curve=False, per_process=compared))
    if a.hosted:
        systems += [DynSystem(state, a.peer_dir, a.port + len(systems) + i, int(r), a.workers, a.kv_blocks,
                              mock_stream=a.mock_stream, per_process=a.hosted)
                    for i, r in enumerate(a.replicas.split(","))]
    if not a.no_dynamo:
        systems.append(DynamoSystem(a.peer_dir, a.dynamo_port, a.workers))
    results: list[dict] = []
    finished = False
    try:
        for s in systems:
            s.start()
        # Dynamo's mocker paces streams: compare streaming at c=32 (the default)
        workloads = [(w.split(":")[0] == "stream", int(w.split(":")[1])) for w in a.workloads.split(",")]
        for rnd in range(a.rounds):
            for stream, conc in workloads:
                order = systems if rnd % 2 == 0 else systems[::-1]
                for s in order:
                    r = run_load(a.peer_dir, s, a.requests, conc, stream, a.groups)
                    r["round"] = rnd
                    results.append(r)
                    print(json.dumps(r), flush=True)
        finished = True
    finally:
        for s in systems:
            s.stop()
        if finished:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"the systems' logs are kept in {state}", file=sys.stderr)
    print(f"\n{os.cpu_count()} CPUs; {a.rounds} interleaved rounds of {a.requests} requests; "
          f"{a.workers} zero-time workers per system; {a.groups} prefix groups\n")
    print(table(results))
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
