"""`dyn up -r smollm2-vllm-local` (vLLM workers, disaggregated over NIXL): the vLLM serving acceptance test.

One deployment is shared by the module (each vLLM engine start costs ~20 s
here). Greedy outputs must equal vLLM's own LLM.generate on the same
prompts: short prompts run prefill and decode on the decode worker (the
aggregated path), long ones go prefill worker -> NixlConnector -> decode
worker, and the decode worker's connector counters prove the prompt KV
arrived instead of being recomputed. The workers hold a LoRA adapter too.
(An aggregated vLLM deployment, `both` workers, runs in test_routing_vllm.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from cpu_ticks import TICKS_PER_S, thread_ticks
from sshd import free_port
from smollm2 import smollm2_checkpoint, write_lora_adapter

pytest.importorskip("vllm")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # engine starts: ~3 min here, more under load

ROOT = Path(__file__).resolve().parents[2]
DYN = str(Path(sys.executable).with_name("dyn"))
MAX_TOKENS = 12
MODEL = "smollm2"
SHORT = ["Hi", "What is 2+2?", "Name a colour."]
LONG = ["Summarize the history of Paris. " * 12, "Explain how a bicycle works, step by step. " * 10,
        "List prime numbers and say why each is prime. " * 9]
FAILED_PULL = ["Describe the ocean in detail. " * 10, "Tell me about mountains and rivers. " * 10]
"""Sent to the decode worker only, with offers whose pull fails: fresh prompts (no cached blocks)."""
SERVED = len(SHORT) + len(LONG)
SCORED = [1, len(SHORT)]
BEAM = {"prompt": 1, "width": 3, "max_tokens": 8}
"""use_beam_search: the prompt (an index), n and max_tokens."""
"""Prompts whose tokens the echo test scores: a short one (scored on the decode worker) and a long
one (scored on the prefill worker, which then hands the KV over)."""
DTYPE = "float32"
"""Pinned here, whatever the shipped recipe says: equal greedy tokens is the oracle, and in bf16
the decode worker's first step after a hand-off (prompt KV loaded, the last partial block
recomputed) rounds differently from one whole prefill, so a near tie can pick another token (seen
on an AVX-512 CPU without BF16 instructions: one of the six prompts)."""


class VllmDeployment:
    def __init__(self, tmp: Path, model_dir: Path, adapters: dict[str, str] | None = None) -> None:
        """The shipped recipe; `adapters`: its model.lora_adapters."""
        self.port = free_port()
        self.name = f"vllm-{os.getpid()}"
        recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-vllm-local.yaml").read_text())
        recipe["name"] = self.name
        recipe["model"]["path"] = str(model_dir)
        recipe["model"]["dtype"] = DTYPE
        if adapters:
            recipe["model"]["lora_adapters"] = adapters
        recipe["frontend"]["port"] = self.port
        recipe["shuttle"]["pull_timeout_s"] = 9.0  # > vLLM's 5 s NIXL handshake timeout (the failed-pull test)
        self.recipe = tmp / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(recipe))
        self.env = {**os.environ, "DYN_STATE_DIR": str(tmp / "state"), "DYN_NODE_STATE_DIR": str(tmp / "nodes"),
                    "HF_HUB_OFFLINE": "1", "DYN_TIMEOUTS": "register_s=60,load_s=240,heartbeat_s=10,stop_s=20"}
        self.pids: list[int] = []

    def dyn(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([DYN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> None:
        result = self.dyn("up", "-r", str(self.recipe), "--name", self.name)
        self.status()
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def status(self) -> dict:
        result = self.dyn("status", "--name", self.name, "--json", timeout=30)
        if result.returncode != 0:
            return {}
        status = json.loads(result.stdout)
        self.pids += [w["pid"] for w in status.get("workers", []) if w.get("pid")]
        if status.get("daemon", {}).get("pid"):
            self.pids.append(status["daemon"]["pid"])
        return status

    def worker_metrics(self, worker_id: str) -> dict[str, float]:
        """The worker's Prometheus samples, keyed `name{stat}` for labelled ones."""
        worker = next(w for w in self.status()["workers"] if w["id"] == worker_id)
        with urllib.request.urlopen(worker["addresses"]["metrics"], timeout=10) as r:
            lines = r.read().decode().splitlines()
        values = {}
        for line in lines:
            if line.startswith("dyn_worker_kv_connector_total"):
                stat = line.split('stat="', 1)[1].split('"', 1)[0]
                values[stat] = float(line.rsplit(" ", 1)[1])
        return values

    def connector_log(self) -> str:
        """The workers' log lines about the KV connector (NIXL): what an assertion shows when a transfer did not count."""
        keys = ("nixl", "transfer", "handshake", "kv_load", "error", "traceback", "warning")
        shown = []
        for worker in ("prefill-0", "decode-0"):
            result = self.dyn("logs", worker, "--name", self.name, "-n", "4000", timeout=30)
            picked = [line for line in result.stdout.splitlines() if any(k in line.lower() for k in keys)]
            shown.append(f"--- {worker} ({len(picked)} lines)\n" + "\n".join(picked[-40:]))
        return "\n".join(shown)

    def down(self) -> None:
        self.dyn("down", "--name", self.name, timeout=120)
        for pid in set(self.pids):  # nothing of ours outlives the test (vLLM children are in the group)
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return smollm2_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tokenizer.encode(text, add_special_tokens=False).ids for text in SHORT + LONG + FAILED_PULL]


class ReferenceRun:
    """vLLM's own greedy tokens, from LLM.generate in a separate process: started at once, read
    when first needed, so the module's deployment starts beside it (each takes ~20 s, mostly
    one core)."""

    def __init__(self, tmp: Path, model_dir: Path, prompts: list[list[int]], lora: Path) -> None:
        (tmp / "in.json").write_text(json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": DTYPE,
                                                 "score": SCORED, "lora": str(lora), "beam": BEAM,
                                                 "lora_prompts": prompts[:len(SHORT)]}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in one process, as dyn's CPU workers run vLLM
        self._out, self._log = tmp / "out.json", tmp / "reference.log"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("vllm_reference.py")), str(model_dir),
                 str(tmp / "in.json"), str(self._out)], env=env, stdout=log, stderr=subprocess.STDOUT)
        self._result: dict | None = None

    def tokens(self) -> list[list[int]]:
        return self._read()["tokens"]

    def lora_tokens(self) -> list[list[int]]:
        """The SHORT prompts' greedy tokens with the LoRA adapter."""
        return self._read()["lora_tokens"]

    def prompt_logprobs(self) -> dict[int, list[float]]:
        """Per SCORED prompt: vLLM's logprob of each of its tokens after the first."""
        return {int(idx): scores for idx, scores in self._read()["prompt_logprobs"].items()}

    def beams(self) -> list[list[int]]:
        """vLLM's beam search of the BEAM prompt: each beam's generated tokens, best first."""
        return self._read()["beams"]

    def prompt_ranks(self) -> dict[int, list[int]]:
        """Per SCORED prompt: vLLM's rank of each of its tokens after the first."""
        return {int(idx): ranks for idx, ranks in self._read()["prompt_ranks"].items()}

    def _read(self) -> dict:
        if self._result is None:
            returncode = self._proc.wait(timeout=300)
            assert returncode == 0, self._log.read_text(errors="replace")[-3000:]
            self._result = json.loads(self._out.read_text())
        return self._result

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, model_dir) -> Path:
    return write_lora_adapter(tmp_path_factory.mktemp("lora"), model_dir)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_dir, prompts, lora_dir):
    run = ReferenceRun(tmp_path_factory.mktemp("reference"), model_dir, prompts, lora_dir)
    try:
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def reference(reference_run) -> list[list[int]]:
    return reference_run.tokens()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, model_dir, reference_run, lora_dir):  # (up while the reference runs)
    d = VllmDeployment(tmp_path_factory.mktemp("deploy"), model_dir, adapters={"smollm2-lora": str(lora_dir)})
    try:
        d.up()
        yield d
    finally:
        d.down()


def _greedy_texts(d: VllmDeployment, prompts: list[list[int]], model: str = MODEL) -> list[str]:
    client = _client(d)
    texts = []
    for prompt in prompts:
        got = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.usage.completion_tokens == MAX_TOKENS
        texts.append(got.choices[0].text)
    return texts


def _decoded(model_dir: Path, token_lists: list[list[int]]) -> list[str]:
    """The frontend detokenizes with the same tokenizer: equal text means equal tokens here."""
    from dyn.config.recipe import ModelSpec
    from dyn.frontend.text import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(path=str(model_dir)))
    return [tokenizer.decode(tokens) for tokens in token_lists]


def _client(d: VllmDeployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="unused", max_retries=0, timeout=120)


def test_greedy_tokens_equal_vllm_generate_locally_and_through_the_nixl_handoff(deployment, model_dir, prompts,
                                                                                reference):
    prompts, reference = prompts[:SERVED], reference[:SERVED]
    before = deployment.worker_metrics("decode-0")
    assert _greedy_texts(deployment, prompts) == _decoded(model_dir, reference)
    after = deployment.worker_metrics("decode-0")
    long_prompts = [p for p in prompts if len(p) > 32]
    assert len(long_prompts) == len(LONG)
    assert after["remote_prefills"] - before.get("remote_prefills", 0) == len(LONG)
    delta = {key: value - before.get(key, 0) for key, value in after.items()}

    def why() -> str:  # evaluated only when an assertion fails
        return f"decode-0 connector counters, this test's share: {delta}\n{deployment.connector_log()}"

    assert delta["failed_transfers"] == 0 and delta["expired_leases"] == 0, why()
    # The decode worker loaded (did not compute) the prompt KV: at most the last partial block is
    # recomputed locally (vLLM recomputes the last prompt token for its logits). vLLM's own
    # accounting is the proof (PromptTokenStats: tokens whose KV arrived over the connector vs
    # computed here); NIXL's transfer telemetry (successful_transfers) is reported, not required.
    assert delta["external_hit_tokens"] >= sum(len(p) - 32 for p in long_prompts), why()
    assert delta["prompt_tokens_transferred"] >= sum(len(p) - 32 for p in long_prompts), why()
    assert delta["prompt_tokens_computed"] <= (sum(len(p) for p in prompts if len(p) <= 32)
                                               + 32 * len(long_prompts)), why()


def test_lora_adapter_beam_search_and_vllms_own_log_lines(deployment, model_dir, prompts, reference_run):
    """A request naming the LoRA adapter as its model gets vLLM's answer with that adapter (the
    others the base model's); a beam search finds vLLM's own beams; vLLM's log records are the
    worker's JSON lines, tagged with the process like dyn's."""
    d = deployment
    adapted = _greedy_texts(d, prompts[:len(SHORT)], model="smollm2-lora")
    assert adapted == _decoded(model_dir, reference_run.lora_tokens())
    assert adapted != _decoded(model_dir, reference_run.tokens()[:len(SHORT)])
    # use_beam_search: the frontend runs vLLM's beam search over the workers, step by step
    beams = _client(d).completions.create(model=MODEL, prompt=prompts[BEAM["prompt"]], n=BEAM["width"],
                                          max_tokens=BEAM["max_tokens"], temperature=0,
                                          extra_body={"use_beam_search": True})
    assert [c.text for c in beams.choices] == _decoded(model_dir, reference_run.beams())
    models = {m.id: m for m in _client(d).models.list().data}
    assert set(models) == {MODEL, "smollm2-lora"} and models["smollm2-lora"].parent == MODEL
    lines = d.dyn("logs", "decode-0", "--name", d.name, "-n", "4000", timeout=30).stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    from_vllm = [r for r in records if r["logger"].startswith("vllm.")]
    assert any("Resolved architecture" in r["msg"] for r in from_vllm), lines[-40:]
    assert all(r["process"] == "decode-0" for r in from_vllm)
    assert not any("Resolved architecture" in line for line in lines if not line.startswith("{"))


def test_echo_scores_prompt_tokens_as_vllm_does_on_either_path(deployment, prompts, reference_run):
    """completions `echo` + `logprobs` (lm-eval's loglikelihood request) and vLLM's prompt_logprobs:
    each prompt token's logprob and rank equal vLLM's own prompt_logprobs, whether the decode
    worker ran the prompt or the prefill worker did (and handed the KV over: 2 tokens, so the
    decode worker has one to make, unasked for scores; lm-eval asks for 1, which the prefill
    worker's first token answers)."""
    client = _client(deployment)
    before = deployment.worker_metrics("decode-0")
    ranks = reference_run.prompt_ranks()
    for idx, want in reference_run.prompt_logprobs().items():
        prompt = prompts[idx]
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, logprobs=1,
                                           echo=True, extra_body={"ignore_eos": True, "prompt_logprobs": 2})
        lp = answer.choices[0].logprobs
        assert len(lp.tokens) == len(prompt) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(prompt)] == pytest.approx(want, abs=1e-3)
        assert all(len(top) == 1 and max(top.values()) >= score - 1e-6
                   for top, score in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        # vLLM's prompt_logprobs answer: each token's entry with vLLM's rank (ties within the
        # logprob tolerance may swap neighbours), and the 2 likeliest ranked 1 and 2
        scored = answer.choices[0].prompt_logprobs
        assert scored[0] is None and len(scored) == len(prompt)
        entries = [entry[str(tok)] for tok, entry in zip(prompt[1:], scored[1:])]
        assert [e["logprob"] for e in entries] == pytest.approx(want, abs=1e-3)
        assert all(abs(e["rank"] - rank) <= 1 for e, rank in zip(entries, ranks[idx])), (entries, ranks[idx])
        assert all(sorted(e["rank"] for e in entry.values())[:2] == [1, 2] for entry in scored[1:])
        # lm-eval's own request asks for 1 token: the prefill worker answers it alone, exporting nothing
        one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                        echo=True).choices[0].logprobs
        assert one.token_logprobs[1:len(prompt)] == pytest.approx(want, abs=1e-3)
    after = deployment.worker_metrics("decode-0")
    assert after["remote_prefills"] - before.get("remote_prefills", 0) == 1  # the long prompt's 2-token one


def test_structured_output_a_forced_tool_call_and_min_tokens_through_vllm(deployment):
    """response_format json_schema, tool_choice naming a function, guided_choice and guided_regex:
    vLLM's own structured output (xgrammar) shapes the answer, which parses as JSON of the schema;
    min_tokens holds its EOS back."""
    client = _client(deployment)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 24}},
              "required": ["capital"], "additionalProperties": False}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "capital", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop"
    assert set(json.loads(answer.choices[0].message.content)) == {"capital"}
    tool = {"type": "function", "function": {"name": "get_capital", "parameters": {
        "type": "object", "properties": {"country": {"type": "string", "maxLength": 24}}, "required": ["country"],
        "additionalProperties": False}}}
    called = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0, tools=[tool],
                                            tool_choice={"type": "function", "function": {"name": "get_capital"}})
    (call,) = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_capital"
    assert set(json.loads(call.function.arguments)) == {"country"}
    # vLLM's guided_choice (sent as an EBNF grammar of the choices) and guided_regex, through vLLM's xgrammar
    choices = ["Paris", "Lyon", "Marseille"]
    chosen = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            extra_body={"guided_choice": choices})
    assert chosen.choices[0].message.content in choices
    year = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "When did the Second World War end?"}],
                                          extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", year.choices[0].message.content)
    short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=60, temperature=0)
    held = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=60, temperature=0,
                                          extra_body={"min_tokens": short.usage.completion_tokens + 10})
    assert short.choices[0].finish_reason == "stop"  # (min_tokens: vLLM's own, passed through)
    assert held.usage.completion_tokens >= short.usage.completion_tokens + 10


def test_bad_words_reach_vllms_sampler(deployment):
    """bad_words, tokenized by the frontend (with and without a leading space), are what vLLM's own
    sampler bans: "Paris" never comes, whichever worker samples the token."""
    client = _client(deployment)
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0).choices[0].text
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                       extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" in free and "Paris" not in banned, (free, banned)


def test_idle_workers_do_not_spin(deployment):
    """Between requests a worker's threads sleep: vLLM's NIXL agent included, whose progress
    thread spun a core per worker until dyn set its poll timeout (measured 0.98 -> 0.02 cores)."""
    pids = {w["id"]: w["pid"] for w in deployment.status()["workers"] if w["id"] in ("prefill-0", "decode-0")}
    assert len(pids) == 2
    start = {wid: sum(thread_ticks(pid).values()) for wid, pid in pids.items()}
    began = time.monotonic()
    time.sleep(2.0)
    cores = {wid: (sum(thread_ticks(pid).values()) - start[wid]) / TICKS_PER_S / (time.monotonic() - began)
             for wid, pid in pids.items()}
    assert all(used < 0.3 for used in cores.values()), cores


def test_openai_client_chat_streaming_usage_and_stop_strings(deployment):
    client = _client(deployment)
    chat = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.usage.completion_tokens <= 24 and chat.usage.prompt_tokens > 10

    prompt = "Count from one to twenty in words: one, two, three,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 16 and "four" in text
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                        stop=["six"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and "six" not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text) and stopped.usage.completion_tokens < 16

    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def _gone_offer(prompt: list[int], block_ids: list) -> dict:
    """vLLM transfer parameters naming a prefill engine whose NIXL side channel nobody answers."""
    port = free_port()
    return {"remote_engine_id": f"gone-{port}", "remote_request_id": f"gone-{port}", "remote_host": "127.0.0.1",
            "remote_port": port, "remote_block_ids": block_ids, "tp_size": 1}


def test_a_failed_kv_pull_is_recomputed_on_the_decode_worker_and_the_request_succeeds(deployment, prompts,
                                                                                      reference):
    """The hand-off as a vanished prefill worker leaves it, sent to decode-0 as the frontend sends a
    hand-off: vLLM's NIXL handshake times out (5 s), the connector counts the failure, vLLM recomputes
    the prompt (kv_load_failure_policy=recompute) and the request returns vLLM's greedy tokens."""
    prompt, want = prompts[SERVED], reference[SERVED]
    blocks = [list(range(math.ceil(len(prompt) / 32)))]  # one list per KV cache group
    before = deployment.worker_metrics("decode-0")
    got = asyncio.run(_decode_directly(deployment, "decode-0", prompt, first_token=want[0],
                                       kv_source={"vllm": _gone_offer(prompt, blocks)}, max_tokens=MAX_TOKENS))
    after = deployment.worker_metrics("decode-0")
    assert got == want[1:]
    assert after["remote_prefills"] - before.get("remote_prefills", 0) == 1
    assert after["failed_transfers"] - before.get("failed_transfers", 0) >= 1, \
        f"decode-0 connector counters {after} (before {before})\n{deployment.connector_log()}"
    assert after["successful_transfers"] == before.get("successful_transfers", 0)


def test_a_pull_that_never_completes_is_given_up_after_the_pull_timeout(deployment, prompts, reference):
    """An offer vLLM 0.32 cannot handle (flat block ids, as from a prefill worker of another vLLM
    version): its handshake-failure callback raises, the request would wait forever. The decode
    worker gives the pull up after shuttle.pull_timeout_s (9 s here) and prefills itself."""
    prompt, want = prompts[SERVED + 1], reference[SERVED + 1]
    blocks = list(range(math.ceil(len(prompt) / 32)))
    before = deployment.worker_metrics("decode-0")
    got = asyncio.run(_decode_directly(deployment, "decode-0", prompt, first_token=want[0],
                                       kv_source={"vllm": _gone_offer(prompt, blocks)}, max_tokens=MAX_TOKENS))
    after = deployment.worker_metrics("decode-0")
    assert after["pull_timeouts"] - before.get("pull_timeouts", 0) == 1, \
        f"decode-0 connector counters {after} (before {before})\n{deployment.connector_log()}"
    assert got == want[1:]


async def _decode_directly(d: VllmDeployment, worker_id: str, prompt: list[int], **hand_off) -> list[int]:
    """One GenerateRequest on a worker's request plane, with the CLI's keys (as the frontend sends it)."""
    import zmq.asyncio

    from dyn.control.keys import load_process_keys
    from dyn.control.requests import Finish, GenerateRequest, RequestFailed, TokenChunk
    from dyn.control.sampling import SamplingParams
    from dyn.frontend.workers import WorkerPool
    from dyn.control.sockets import Security

    worker = next(w for w in d.status()["workers"] if w["id"] == worker_id)
    keys = load_process_keys(Path(d.env["DYN_STATE_DIR"]) / d.name / "cli.keys.json")
    ctx = zmq.asyncio.Context()
    pool = WorkerPool(ctx, Security.from_keys(keys))
    try:
        pool.add(worker_id, worker["role"], worker["addresses"]["request"])
        max_tokens = hand_off.pop("max_tokens")
        request = GenerateRequest(f"direct-{os.getpid()}", prompt, SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True), **hand_off)
        queue = await pool.open(worker_id, request)
        tokens: list[int] = []
        while True:
            msg = await asyncio.wait_for(queue.get(), 120)
            if isinstance(msg, TokenChunk):
                tokens += msg.token_ids
            elif isinstance(msg, RequestFailed):
                raise AssertionError(f"request failed: {msg}")
            elif isinstance(msg, Finish):
                return tokens
    finally:
        pool.close()
        ctx.destroy(linger=0)
