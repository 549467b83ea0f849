"""The checkpoint's own tokenizer and chat template (a tiny byte-level BPE written by dyn.engine.tiny)."""

from __future__ import annotations

import dataclasses

import openai
import pytest
from frontend_harness import Harness, make_recipe

from dyn.config.recipe import ModelSpec
from dyn.engine.tokenizer import Tokenizer
from dyn.errors import RequestError
from dyn.frontend.text import ModelTokenizer, TextStream, _up_to_final_message, load_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from dyn.engine.tiny import write_tiny_checkpoint

    torch.set_num_threads(1)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_layers=1, hidden_size=32)


def test_load_tokenizer_uses_the_checkpoint(checkpoint):
    tok = load_tokenizer(ModelSpec(path=str(checkpoint), engine="torch"))
    assert isinstance(tok, ModelTokenizer)
    inner = Tokenizer.from_dir(checkpoint)
    messages = [{"role": "user", "content": "Hello there"}]
    ids = tok.chat_prompt(messages)
    rendered = inner.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == inner.encode(rendered, add_special_tokens=False)
    assert ids.count(inner.token_to_id("<|begin_of_text|>")) == 1  # BOS once, from the template
    assert tok.eos_token_ids == inner.eos_token_ids


def test_streamed_text_equals_one_shot_decode(checkpoint):
    tok = load_tokenizer(ModelSpec(path=str(checkpoint), engine="torch"))
    prompt = tok.encode("Prefill workers read")
    text = " the prompt; décodé — workers write the answer, one token at a time! 123"
    ids = tok.encode(text)
    stream = TextStream(tok, prefix_ids=prompt)
    pieces = [stream.add([t]) for t in ids] + [stream.flush()]
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert "".join(pieces) == expected
    lazy = TextStream(tok, prefix_ids=prompt, lazy=True)
    for t in ids:
        lazy.add([t])
    assert lazy.flush() == expected


def test_chat_request_uses_the_template(checkpoint):
    recipe = make_recipe()
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=str(checkpoint),
                                                                   engine="torch", name="tiny"))
    with Harness(recipe, [("w0", "both")]) as h:
        with openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0, timeout=10) as c:
            out = c.chat.completions.create(model="tiny", max_tokens=4,
                                            messages=[{"role": "user", "content": "How are you today?"}])
            expected = ModelTokenizer(Tokenizer.from_dir(checkpoint)).chat_prompt(
                [{"role": "user", "content": "How are you today?"}])
            assert out.usage.prompt_tokens == len(expected)
            assert h.workers["w0"].requests[0].prompt_token_ids == expected
            with pytest.raises(openai.BadRequestError) as err:
                c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}] * 3000)
            assert err.value.body["param"] == "messages"
            joined = c.completions.create(model="tiny", prompt="Hi", max_tokens=3, extra_body={
                "skip_special_tokens": False, "spaces_between_special_tokens": False})  # (vLLM's; was a 400)
            assert joined.choices[0].finish_reason == "length"


def test_stepped_decoding_streams_what_the_window_decoding_streams(checkpoint):
    """Hugging Face's DecodeStream (one token at a time, in Rust) against TextStream's own window
    decoding, on random token sequences (split characters, special tokens) in random chunks,
    with and without stop strings: the same text in the same pieces, and the same stop."""
    import random

    tok = load_tokenizer(ModelSpec(path=str(checkpoint), engine="torch"))

    class WindowOnly:  # the same tokenizer without an incremental decoder
        eos_token_ids = tok.eos_token_ids
        encode, decode = tok.encode, tok.decode

    assert TextStream(tok)._step is not None and TextStream(WindowOnly())._step is None
    vocab = Tokenizer.from_dir(checkpoint).hf_tokenizer.get_vocab_size()
    rng = random.Random(7)
    num_stepped = num_stopped = 0
    for trial in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        at = rng.randrange(len(ids))
        stop = [tok.decode(ids[at:at + 2])] if trial % 3 == 0 else []  # (some never match: split characters)
        stepped, window = TextStream(tok, stop, prefix_ids=prompt), TextStream(WindowOnly(), stop, prefix_ids=prompt)
        num_stepped += stepped._step is not None  # (not after a prompt that ends inside a character)
        out: dict[str, list[str]] = {"stepped": [], "window": []}
        at = 0
        while at < len(ids):
            n = rng.randrange(1, 5)
            out["stepped"].append(stepped.add(ids[at:at + n]))
            out["window"].append(window.add(ids[at:at + n]))
            at += n
        out["stepped"].append(stepped.flush())
        out["window"].append(window.flush())
        assert "".join(out["stepped"]) == "".join(out["window"]), (prompt, ids, stop, out)
        assert stepped.stopped == window.stopped, (prompt, ids, stop)
        num_stopped += stepped.stopped
    assert num_stepped > 200 and num_stopped > 30, (num_stepped, num_stopped)


def test_an_assistant_prefill_ends_the_prompt_inside_the_last_message(checkpoint):
    """continue_final_message (vLLM's assistant prefill): the template's rendering cut right after the
    assistant's partial text, so the answer continues it; add_generation_prompt false opens no turn."""
    tok = load_tokenizer(ModelSpec(path=str(checkpoint), engine="torch"))
    inner = Tokenizer.from_dir(checkpoint)
    messages = [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": '{"answer":'}]
    closed = inner.apply_chat_template(messages, add_generation_prompt=False)
    prefill = tok.chat_prompt(messages, None, False, True)
    assert prefill == inner.encode(closed[:closed.rindex('{"answer":') + len('{"answer":')], add_special_tokens=False)
    assert tok.chat_prompt(messages, None, False) == inner.encode(closed, add_special_tokens=False)
    assert len(tok.chat_prompt(messages)) > len(tok.chat_prompt(messages, None, False))  # the new turn's header
    with pytest.raises(RequestError) as refused:  # a template that does not write the text as given
        _up_to_final_message("<|assistant|>HELLO<|end|>", "hello")
    assert refused.value.field == "continue_final_message"


def test_special_tokens_are_text_when_the_request_keeps_them(checkpoint):
    """vLLM's skip_special_tokens false: the special tokens' text stays, streamed token by token
    (Hugging Face's DecodeStream) or decoded once at the end."""
    tok = load_tokenizer(ModelSpec(path=str(checkpoint), engine="torch"))
    ids = tok.encode("Hi<|reserved_0|> there<|eot_id|>", add_special_tokens=False)
    assert tok.decode(ids) == "Hi there" and tok.decode(ids, skip_special_tokens=False).endswith("<|eot_id|>")
    for lazy in (False, True):
        kept = TextStream(tok, lazy=lazy, skip_special_tokens=False)
        streamed = "".join(kept.add([t]) for t in ids) + kept.flush()
        skipped = TextStream(tok, lazy=lazy)
        assert streamed == "Hi<|reserved_0|> there<|eot_id|>", lazy
        assert "".join(skipped.add([t]) for t in ids) + skipped.flush() == "Hi there"


class _WordPieceInner:
    """A tokenizer whose decoder puts a space between tokens, added ones included (WordPiece)."""

    eos_token_ids = ()

    def __init__(self) -> None:
        from tokenizers import AddedToken, Tokenizer as HfTokenizer, decoders, models, pre_tokenizers

        hf = HfTokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        hf.decoder = decoders.WordPiece()
        hf.add_special_tokens([AddedToken("[CLS]", special=True), AddedToken("[SEP]", special=True)])
        self.hf_tokenizer = hf

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_spaces_between_special_tokens_false_joins_adjacent_added_tokens_as_vllm():
    """vLLM's fast detokenizer with spaces_between_special_tokens false: an added token after another
    comes without the decoder's space; other tokens, and the first of a run, are as decoded."""
    tok = ModelTokenizer(_WordPieceInner())
    sep, cls = (tok._inner.hf_tokenizer.token_to_id(t) for t in ("[SEP]", "[CLS]"))
    ids = [1, sep, cls, sep, 2, 3]

    def text(lazy: bool, **fields) -> str:
        stream = TextStream(tok, prefix_ids=[2], lazy=lazy, **fields)
        return "".join(stream.add([t]) for t in ids) + stream.flush()

    for lazy in (False, True):  # (streamed, or a whole answer)
        assert text(lazy, skip_special_tokens=False) == " hello [SEP] [CLS] [SEP] worlds"
        assert text(lazy, skip_special_tokens=False, spaces_between_special_tokens=False) == \
            " hello [SEP][CLS][SEP] worlds"
        assert text(lazy, spaces_between_special_tokens=False) == " hello worlds"  # (no special token shown)


def test_spaces_between_special_tokens_false_changes_nothing_on_byte_level_bpe(checkpoint):
    tok = load_tokenizer(ModelSpec(path=str(checkpoint), engine="torch"))
    ids = tok.encode("Hi<|reserved_0|><|eot_id|> there<|eot_id|>", add_special_tokens=False)
    joined = TextStream(tok, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(joined.add([t]) for t in ids) + joined.flush() == "Hi<|reserved_0|><|eot_id|> there<|eot_id|>"
