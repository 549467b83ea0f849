"""Tokenizer on the tiny checkpoint: byte-level round trips, chat template, incremental detokenize."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyn.engine.loader import CheckpointError
from dyn.engine.tiny import write_tiny_checkpoint
from dyn.engine.tokenizer import Tokenizer
from dyn.errors import RequestError

TEXT = "Hello, world! Größe 日本語 🙂🚀 tabs\tand\nnewlines"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


def test_round_trip_and_bos(tok):
    ids = tok.encode(TEXT)
    assert ids[0] == tok.token_to_id("<|begin_of_text|>")
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 512 and max(ids) < 512


def test_eos_ids_cover_eot_and_end_of_text(tok):
    assert tok.token_to_id("<|eot_id|>") in tok.eos_token_ids
    assert tok.token_to_id("<|end_of_text|>") in tok.eos_token_ids


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.token_to_id("<|begin_of_text|>")) == 1
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("\n\n")


def test_chat_template_bad_messages(tok):
    with pytest.raises(RequestError) as err:
        tok.apply_chat_template([{"content": "no role"}])
    assert err.value.field == "messages[0].role"
    with pytest.raises(RequestError, match="content must be a string"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(RequestError, match="non-empty list"):
        tok.apply_chat_template([])


def test_incremental_detokenizer_never_splits_a_character(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = tok.detokenizer()
    deltas = [detok.add([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == TEXT
    assert deltas.count("") > 0  # some tokens end mid-character and wait for the next one


def test_incremental_detokenizer_after_a_prompt(tok):
    prompt = tok.encode("Say something:", add_special_tokens=True)
    out = tok.encode(" ça va 🙂", add_special_tokens=False)
    detok = tok.detokenizer(prompt)
    text = "".join(detok.add([i]) for i in out) + detok.flush()
    assert text == " ça va 🙂"


def test_truncated_character_is_flushed_as_replacement(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert detok.add(ids[:-1]) == ""
    assert detok.flush() == "\ufffd"


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)


def test_a_tokenizer_json_with_truncation_and_padding_encodes_the_whole_prompt(tiny_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<|end_of_text|>"}
    path.write_text(json.dumps(data))
    loaded = Tokenizer.from_dir(tmp_path / "ckpt")
    assert loaded.hf_tokenizer.truncation is None and loaded.hf_tokenizer.padding is None
    assert loaded.encode(TEXT) == Tokenizer.from_dir(tiny_dir).encode(TEXT)  # neither cut to 4 nor padded to 64
