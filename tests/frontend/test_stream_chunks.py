"""SSE chunks: a text-only chunk, cut from a frame encoded once, is byte for byte the chunk the
whole skeleton would encode to (chat and completions, with and without usage, any text)."""

import json

import pytest

from dyn.frontend.responses import StreamFormatter, _event
from dyn.frontend.worker_stream import Piece

TEXTS = ["", " word", 'quote " and \\ backslash', "line\nbreak\ttab", "caf\u00e9 \u4e2d\u6587 \U0001f680",
         "nul \x00 and \x1f controls", "\x00dyn-text\x00", "</s> <|eot_id|>"]


def _expected(kind: str, rid: str, model: str, created: int, text: str, usage: bool) -> bytes:
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    if kind == "chat":
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if usage:
        chunk["usage"] = None
    return _event(chunk)


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("usage", [True, False])
@pytest.mark.parametrize("model", ["tiny-llama", 'odd "model" \x00dyn-text\x00 name'])
def test_text_chunks_equal_the_whole_skeleton_encoded(kind, usage, model):
    fmt = StreamFormatter(kind, "chatcmpl-abc", model, None, include_usage=usage)
    created = fmt._chunk["created"]
    for text in TEXTS:
        out = fmt.piece(Piece(text, [7]))
        assert out == _expected(kind, "chatcmpl-abc", model, created, text, usage)
        body = json.loads(out[len(b"data: "):])
        content = body["choices"][0]["delta"]["content"] if kind == "chat" else body["choices"][0]["text"]
        assert content == text and body["model"] == model


def test_text_chunks_after_a_logprobs_chunk_and_the_last_chunk_are_unchanged():
    """The dict path (logprobs, finish) and the cut frame interleave without leaking fields."""

    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    fmt = StreamFormatter("chat", "chatcmpl-x", "m", Tok(), include_usage=False)
    with_lp = json.loads(fmt.piece(Piece("a", [1], [-0.5]))[6:])
    assert with_lp["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.5
    plain = json.loads(fmt.piece(Piece("b", [2]))[6:])
    assert plain["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": None, "delta": {"content": "b"}}
    last = json.loads(fmt.piece(Piece("", [3], None, "length"), num_migrations=1)[6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert last["dyn"] == {"migrations": 1}
