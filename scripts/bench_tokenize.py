#!/usr/bin/env python
"""Prompt tokenization in the frontend: dyn's encoder against the tokenizer's own encode, same texts.

dyn's frontend encodes a prompt in pieces cut at special tokens (long pieces
remembered: shared system prompts) and the rest word by word with each word's
ids remembered (dyn.frontend.token_cache, dyn.frontend.word_cache). This
measures it against `tokenizers`' encode_batch_fast (its fastest call, no
offsets) on five workloads, after a warm-up of --warmup texts of the same
kind (dyn checks its first 64 prompts against the tokenizer then):

    chat         8 shared system prompts (~2,000 characters) + a unique user
                 turn of 40 words, rendered with the model's chat template
    documents    unique slices (1-60 lines) of this repository's sources
    completions  the same slices, special tokens added (BOS)
    typographic  the chat turns written as word processors and phones write
                 them: curly quotes and apostrophes, dashes, ellipses, emoji
    multilingual 40-80 words of one or two of Latin with accents, Greek,
                 Cyrillic, Arabic, Devanagari and CJK (no spaces), with
                 English: made-up words of each script's letters, 2,000 a
                 script, drawn as often as 1/rank (as words of a language)

Every timed text's ids are compared with the tokenizer's.

    .venv/bin/python scripts/bench_tokenize.py [--model smollm2 | --model CHECKPOINT_DIR] [--texts 2000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# As the frontend process runs (dyn/frontend/process.py): a batch of new words is encoded serially,
# not handed to the tokenizer's thread pool (~60 us a call here on 2 cores).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dyn.engine.tokenizer import Tokenizer  # noqa: E402
from dyn.frontend.text import ModelTokenizer  # noqa: E402


def load(model: str) -> Tokenizer:
    """A checkpoint directory, or a packaged model's name (its GGUF's tokenizer, no weights read)."""
    if Path(model).is_dir():
        return Tokenizer.from_dir(model)
    from dyn.engine.gguf.reader import GGUFFile
    from dyn.engine.gguf.tokenizer import build_tokenizer
    from dyn.engine.sources import NAMED_MODELS, packaged_gguf

    built = build_tokenizer(GGUFFile(packaged_gguf(NAMED_MODELS[model])))
    cfg = built.config
    text = lambda v: v if isinstance(v, str) else (v or {}).get("content")  # noqa: E731
    return Tokenizer(built.tokenizer, chat_template=cfg.get("chat_template"), bos_token=text(cfg.get("bos_token")),
                     eos_token=text(cfg.get("eos_token")), source=model)


def workloads(tok: Tokenizer, count: int, rng: random.Random) -> dict[str, tuple[list[str], bool]]:
    """name -> (texts, add_special_tokens)."""
    lines = [line for path in sorted([*ROOT.glob("dyn/**/*.py"), *ROOT.glob("*.md")])
             for line in path.read_text(encoding="utf-8").splitlines()]
    vocabulary = sorted({word for line in lines for word in line.split() if word.isalpha()})
    systems = [" ".join(rng.choice(vocabulary) for _ in range(300)) for _ in range(8)]
    chats = [tok.apply_chat_template([{"role": "system", "content": rng.choice(systems)},
                                      {"role": "user", "content": f"req {i} " + " ".join(rng.choice(vocabulary)
                                                                                         for _ in range(40))}])
             for i in range(count)]
    docs = []
    for _ in range(count):
        start = rng.randrange(len(lines))
        docs.append("\n".join(lines[start:start + rng.randrange(1, 60)]))
    typographic = [chat.replace("'", "\u2019") for chat in _curly(chats, rng)]
    return {"chat": (chats, False), "documents": (docs, False), "completions": (docs, True),
            "typographic": (typographic, False), "multilingual": (_multilingual(vocabulary, count, rng), False)}


def _curly(chats: list[str], rng: random.Random) -> list[str]:
    """Each chat with its user turn's words now and then quoted, dashed, trailing off, smiled at."""
    out = []
    for chat in chats:
        words = chat.split(" ")
        for at in range(len(words) - 40, len(words), 7):
            words[at] = rng.choice(["\u201c{}\u201d", "{} \u2014", "{}\u2026", "{}'s", "{} \U0001f642"]).format(words[at])
        out.append(" ".join(words))
    return out


SCRIPTS = {"latin": "abcdefghijklmnopqrstuvwxyzéèêëàâîïôûùüçñøåäö",
           "greek": "".join(map(chr, range(0x3B1, 0x3CA))), "cyrillic": "".join(map(chr, range(0x430, 0x450))),
           "arabic": "".join(map(chr, range(0x627, 0x64B))),
           "devanagari": "".join(map(chr, [*range(0x915, 0x93A), *range(0x93E, 0x94D)])),
           "cjk": "".join(map(chr, range(0x4E00, 0x4E00 + 3000)))}
"""Letters of each script (Devanagari's with its vowel signs, marks); CJK: 3,000 common ideographs."""


def _multilingual(english: list[str], count: int, rng: random.Random) -> list[str]:
    lexicons = {name: ["".join(rng.choice(letters) for _ in range(rng.randrange(2, 9) if name != "cjk"
                                                             else rng.randrange(1, 4))) for _ in range(2000)]
                for name, letters in SCRIPTS.items()}
    docs = []
    for _ in range(count):
        scripts = rng.sample(sorted(lexicons), rng.randrange(1, 3))
        words = []
        for _ in range(rng.randrange(40, 80)):
            lexicon = english if rng.random() < 0.15 else lexicons[rng.choice(scripts)]
            words.append(lexicon[int(len(lexicon) ** rng.random()) - 1])  # rank r drawn ~ 1/r
        text = " ".join(words)
        docs.append(text if "cjk" not in scripts else text.replace(" ", "", rng.randrange(len(words))))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="checkpoint directory, or a packaged model's name")
    parser.add_argument("--texts", type=int, default=2000, help="timed texts per workload")
    parser.add_argument("--warmup", type=int, default=500, help="untimed texts first, per workload")
    args = parser.parse_args()
    tok = load(args.model)
    hf = tok.hf_tokenizer
    rng = random.Random(0)
    print(f"model {args.model}: {type(hf.pre_tokenizer).__name__} pre-tokenizer, vocab {tok.vocab_size}")
    print("| workload | tokens/prompt | tokenizer us/prompt | dyn us/prompt | speed-up | ids equal |")
    print("|---|---|---|---|---|---|")
    for name, (texts, special) in workloads(tok, args.warmup + args.texts, rng).items():
        ours = ModelTokenizer(tok)
        warm, timed = texts[:args.warmup], texts[args.warmup:]
        for text in warm:
            ours.encode(text, special)
        start = time.perf_counter()
        got = [ours.encode(text, special) for text in timed]
        dyn_us = (time.perf_counter() - start) / len(timed) * 1e6
        start = time.perf_counter()
        want = [e.ids for text in timed for e in hf.encode_batch_fast([text], add_special_tokens=special)]
        hf_us = (time.perf_counter() - start) / len(timed) * 1e6
        tokens = sum(map(len, want)) / len(want)
        print(f"| {name} | {tokens:.0f} | {hf_us:.0f} | {dyn_us:.0f} | {hf_us / dyn_us:.1f}x | {got == want} |")


if __name__ == "__main__":
    main()
