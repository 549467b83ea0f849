"""lm-eval through dyn beside lm-eval on transformers: the same scores, sample by sample.

Runs EleutherAI's lm-evaluation-harness twice on two small tasks written here (no dataset
download; an air-gapped rack has no hub): once against a running dyn deployment's OpenAI API
(`local-completions`: log-likelihoods via `echo` + `logprobs`, greedy generation with stop
strings, the server's own tokenizer via /tokenizer_info and /tokenize) and once with lm-eval's
transformers backend on the checkpoint the deployment serves. Prints both score tables and the
largest per-sample log-likelihood difference. Not part of the test suite; lm-eval goes in a venv
of its own (it pins its own dependencies):

    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 'lm-eval[api]' transformers accelerate
    .venv/bin/dyn up
    .venv/bin/python scripts/lm_eval_parity.py --lm-eval /tmp/lmeval/bin/lm_eval \\
        --url http://127.0.0.1:8000/v1 --model smollm2 --checkpoint ~/.cache/dyn/models/smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Russia", "Moscow"),
            ("China", "Beijing"), ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Mexico", "Mexico City"),
            ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
            ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Peru", "Lima")]
PROMPT = ("Question: What is the capital of Chile?\\nAnswer: Santiago\\n\\nQuestion: What is the capital of Cuba?"
          "\\nAnswer: Havana\\n\\nQuestion: What is the capital of {{country}}?\\nAnswer:")
TASKS = {
    "dyn_capitals_mc": ("output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
                        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "dyn_capitals_gen": ("output_type: generate_until\ndoc_to_target: \" {{capital}}\"\n"
                         "generation_kwargs:\n  until: [\"\\n\", \".\", \",\"]\n  max_gen_toks: 16\n  do_sample: false\n"
                         "metric_list:\n  - metric: exact_match\n    ignore_case: true\n"
                         "    ignore_punctuation: true\n    regexes_to_ignore: [\"^ +\"]\n"),
}


def write_tasks(where: Path) -> None:
    rng = random.Random(0)
    capitals = [c for _, c in CAPITALS]
    with open(where / "capitals.jsonl", "w") as out:
        for country, capital in CAPITALS:
            choices = rng.sample([c for c in capitals if c != capital], 3) + [capital]
            rng.shuffle(choices)
            out.write(json.dumps({"country": country, "choices": choices, "answer": choices.index(capital),
                                  "capital": capital}) + "\n")
    for name, body in TASKS.items():
        (where / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {where / 'capitals.jsonl'}\n"
            f"test_split: test\ndoc_to_text: \"{PROMPT}\"\n{body}")


def run(lm_eval: str, where: Path, label: str, model: str, model_args: str) -> Path:
    out = where / f"out-{label}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([lm_eval, "--model", model, "--model_args", model_args, "--include_path", str(where),
                           "--tasks", ",".join(TASKS), "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise SystemExit(f"lm_eval ({label}) failed:\n{done.stderr[-3000:]}")
    print(f"== {label}\n" + "\n".join(line for line in done.stdout.splitlines() if line.startswith("|")))
    return out


def samples(out: Path, task: str) -> dict[int, dict]:
    path = next(out.glob(f"*/samples_{task}_*.jsonl"))
    return {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", required=True, help="the lm_eval command (in its own venv)")
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the deployment's OpenAI base URL")
    ap.add_argument("--model", default="smollm2", help="the served model name")
    ap.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint directory dyn serves")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dyn-lm-eval-") as tmp:
        where = Path(tmp)
        write_tasks(where)
        served = run(args.lm_eval, where, "dyn", "local-completions",
                     f"model={args.model},base_url={args.url}/completions,num_concurrent=4,max_retries=1")
        local = run(args.lm_eval, where, "transformers", "hf",
                    f"pretrained={args.checkpoint.expanduser()},dtype={args.dtype}")
        a, b = samples(served, "dyn_capitals_mc"), samples(local, "dyn_capitals_mc")
        pairs = [(ra[0], rb[0]) for k in a for ra, rb in zip(a[k]["resps"], b[k]["resps"])]
        worst = max(abs(float(x[0]) - float(y[0])) for x, y in pairs)
        greedy = sum(x[1] == y[1] for x, y in pairs)
        a, b = samples(served, "dyn_capitals_gen"), samples(local, "dyn_capitals_gen")
        same = sum(a[k]["filtered_resps"] == b[k]["filtered_resps"] for k in a)
        print(f"log-likelihoods: {len(pairs)} pairs, largest difference {worst:.2e}, is_greedy equal "
              f"{greedy}/{len(pairs)}; generations identical {same}/{len(a)}")
        sys.exit(0 if greedy == len(pairs) and same == len(a) else 1)


if __name__ == "__main__":
    main()
