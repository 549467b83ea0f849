"""Streaming detokenization and stop strings (TextStream), with the byte tokenizer."""

from __future__ import annotations

import random

from dyn.frontend.text import ByteTokenizer, TextStream

TOK = ByteTokenizer()


def _feed(stream: TextStream, text: str, step: int = 1) -> list[str]:
    data = text.encode()
    return [stream.add(list(data[i:i + step])) for i in range(0, len(data), step)]


def test_plain_text_streams_token_by_token():
    s = TextStream(TOK)
    assert _feed(s, "abc") == ["a", "b", "c"]
    assert s.flush() == ""


def test_multibyte_characters_wait_for_their_last_byte():
    s = TextStream(TOK)
    out = _feed(s, "é€")  # 2 + 3 bytes
    assert out == ["", "é", "", "", "€"]


def test_stop_string_across_tokens_is_trimmed():
    s = TextStream(TOK, stop=["END"])
    out = _feed(s, "hello ENDworld")
    assert "".join(out) == "hello "
    assert s.stopped
    assert s.add([65]) == "" and s.flush() == ""


def test_include_stop_keeps_the_matched_stop_string_and_nothing_after_it():
    for step in (1, 3, 14):
        s = TextStream(TOK, stop=["END", "ENDING"], include_stop=True)
        assert "".join(_feed(s, "hello ENDINGworld", step=step)) == "hello END" and s.stopped


def test_possible_stop_prefix_is_held_then_released():
    s = TextStream(TOK, stop=["STOP"])
    out = _feed(s, "aST")
    assert out == ["a", "", ""]  # "S", "ST" might start "STOP"
    assert s.add(list(b"x")) == "STx"  # it did not
    assert s.flush() == "" and not s.stopped


def test_under_min_tokens_a_stop_string_must_end_in_a_later_tokens_text():
    """vLLM's min_tokens with stop strings: the first min_tokens tokens' text is never matched on its
    own (as vLLM's detokenizer, which checks stop strings only past min_tokens)."""
    text = " is Lee, and I'm a student in the college"  # (the byte tokenizer: a token a character)
    assert "".join(_feed(TextStream(TOK, stop=["e"]), text)) == " is L"
    for step in (1, 3, 50):  # the first 8 tokens, " is Lee,", are not matched however they come
        s = TextStream(TOK, stop=["e"], min_tokens=8)
        assert "".join(_feed(s, text, step=step)) == " is Lee, and I'm a stud" and s.stopped
    # one that begins in the first min_tokens tokens and ends after them still stops the answer
    s = TextStream(TOK, stop=["Lee"], min_tokens=6)
    assert "".join(_feed(s, text)) == " is " and s.stopped
    # and nothing is lost when the window moves on over a long held start
    s = TextStream(TOK, stop=["ab", "xyz"], min_tokens=40)
    long = "ab" * 30 + "ab"
    assert "".join(_feed(s, long)) == "ab" * 20 and s.stopped


def test_earliest_of_several_stop_strings_wins():
    s = TextStream(TOK, stop=["zz", "b"])
    assert "".join(_feed(s, "aazzb", step=5)) == "aa"


def test_held_text_is_flushed_at_the_end():
    s = TextStream(TOK, stop=["xyz"])
    assert "".join(_feed(s, "abxy")) == "ab"
    assert s.flush() == "xy"


def test_an_incomplete_character_at_the_end_is_flushed_whatever_the_chunks():
    # "ab" then the first byte of "é": the chunk is held for its incomplete character and, at
    # the end, goes out as decoded (was lost: a chunk of several tokens lost its whole text).
    data = list(b"xy") + list("ab".encode()) + list("é".encode())[:1]
    full = TOK.decode(data)
    for step in (1, 2, 3, 6):
        s = TextStream(TOK)
        out = [s.add(data[i:i + step]) for i in range(0, len(data), step)]
        assert "".join(out) + s.flush() == full == "xyab\ufffd"


def test_a_stop_string_in_the_flushed_tail_still_stops():
    s = TextStream(TOK, stop=["b"])
    assert s.add(list(b"a") + list(b"b") + list("é".encode())[:1]) == ""
    assert s.flush() == "a" and s.stopped


def test_lazy_stream_decodes_once_at_the_end():
    s = TextStream(TOK, prefix_ids=list(b"prompt"), lazy=True)
    assert _feed(s, "héllo", step=2) == ["", "", ""]
    assert s.flush() == "héllo"


def test_lazy_is_ignored_with_stop_strings():
    s = TextStream(TOK, stop=["l"], lazy=True)
    assert "".join(_feed(s, "hello")) == "he" and s.stopped


def _whole_text_reference(text: str, stops: list[str]) -> str:
    """What the client must get in all: the text up to the earliest stop string."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i != -1), default=len(text))
    return text[:cut]


def test_a_long_answer_keeps_a_window_and_matches_stop_strings_across_it():
    # Stop strings that overlap their own prefixes ("aab" after "aaa...") and ones that arrive
    # after thousands of characters; the text kept stays within a stop string's reach.
    rng = random.Random(7)
    for trial in range(200):
        text = "".join(rng.choice("aab ") for _ in range(rng.randrange(1, 3000)))
        stops = rng.sample(["aab", "ba a", "bbbb", "a b", "zz"], rng.randrange(0, 3))
        s = TextStream(TOK, stop=stops)
        got, i = [], 0
        while i < len(text):
            step = rng.randrange(1, 5)
            got.append(s.add(list(text[i:i + step].encode())))
            i += step
        got.append(s.flush())
        assert "".join(got) == _whole_text_reference(text, stops), (trial, stops)
        assert len(s._text) <= max(map(len, stops), default=0) + 4  # the window, not the answer


def test_byte_tokenizer_maps_large_ids_to_printable_text():
    text = TOK.decode([256, 1000, 31999])
    assert len(text) == 3 and text.isprintable()
    assert TOK.chat_prompt([{"role": "user", "content": "hi"}]) == list(b"<|user|>hi\n<|assistant|>")
