"""Incremental detokenization against the full decode: the streamed pieces join to exactly
``tokenizer.decode(all ids)`` (multi-byte characters split across tokens, invalid bytes, special
tokens), stop strings cut where the full text first holds one, and every decode call stays
bounded however long the sequence grows."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gateway.detokenize import MAX_UNREAD, REPLACEMENT, IncrementalText, WindowDecoder

UNICODE_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def byte_ids(tokenizer) -> list[int]:
    """The id of each single-byte token of a byte-level BPE tokenizer, indexed by byte value."""
    return tokenizer.convert_tokens_to_ids([bytes_to_unicode()[b] for b in range(256)])


def streamed(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[str, bool]:
    """What a client receives: every delta until a stop string, then the flushed rest."""
    text = IncrementalText(tokenizer, stop or [])
    out = []
    for token in ids:
        delta, hit = text.push(token)
        out.append(delta)
        if hit:
            return "".join(out), True
    return "".join(out) + text.flush(), False


def reference(tokenizer, ids: list[int], stop: list[str]) -> str:
    """The text up to the first stop string, from full decodes: the first prefix of the tokens
    whose text holds one (in a prefix ending in an incomplete character, the whole characters
    before it: the client could not have been sent its last character yet)."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if k < len(ids):
            text = text.rstrip(REPLACEMENT)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def random_ids(vocab_size: int, bytes_of: list[int]) -> st.SearchStrategy[list[int]]:
    """Token sequences that favour single bytes (split and broken characters) and special ids."""
    any_token = st.integers(0, vocab_size - 1)
    high_byte = st.sampled_from(bytes_of[0x80:])
    return st.lists(st.one_of(any_token, high_byte, st.sampled_from([0, 1, 2])), max_size=60)


# ---- tiny byte-level tokenizer ------------------------------------------------------------------

@EXAMPLES
@given(data=st.data())
def test_random_ids_join_to_full_decode_tiny(tiny_tokenizer, data):
    ids = data.draw(random_ids(len(tiny_tokenizer), byte_ids(tiny_tokenizer)))
    assert streamed(tiny_tokenizer, ids)[0] == tiny_tokenizer.decode(ids, skip_special_tokens=True)


@EXAMPLES
@given(text=UNICODE_TEXT)
def test_encoded_unicode_round_trips_tiny(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert streamed(tiny_tokenizer, ids)[0] == tiny_tokenizer.decode(ids, skip_special_tokens=True)


@EXAMPLES
@given(data=st.data())
def test_stop_strings_cut_where_the_full_text_first_holds_one(tiny_tokenizer, data):
    text = data.draw(UNICODE_TEXT.filter(bool))
    start = data.draw(st.integers(0, len(text) - 1))
    stop = [text[start:data.draw(st.integers(start + 1, min(len(text), start + 6)))]]
    stop += data.draw(st.lists(st.text(min_size=1, max_size=4), max_size=2))
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert streamed(tiny_tokenizer, ids, stop)[0] == reference(tiny_tokenizer, ids, stop)


@pytest.mark.parametrize("run", [
    [0xE2] * 40,                    # lead bytes never completed
    [0x80] * 40,                    # lone continuation bytes
    [0xE2, 0x82] * 20 + [0xAC],     # incomplete pairs, the last one completed
    [0xF0, 0x9F] * 12 + [0x99, 0x82],
])
def test_garbage_bytes_settle_and_still_match(tiny_tokenizer, run):
    ids = [byte_ids(tiny_tokenizer)[b] for b in run]
    ids = tiny_tokenizer.encode("ok ", add_special_tokens=False) + ids + tiny_tokenizer.encode(" fine")
    assert streamed(tiny_tokenizer, ids)[0] == tiny_tokenizer.decode(ids, skip_special_tokens=True)


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call got."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["words", "garbage"])
def test_decode_work_per_token_is_bounded(tiny_tokenizer, kind):
    if kind == "words":
        ids = tiny_tokenizer.encode("the quick brown fox jumps over the lazy dog " * 60)
    else:
        ids = [byte_ids(tiny_tokenizer)[0xE2]] * 600
    counting = CountingTokenizer(tiny_tokenizer)
    decoder = WindowDecoder(counting)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500
    assert max(counting.sizes) <= 2 * MAX_UNREAD  # never the whole sequence
    assert len(counting.sizes) <= 2 * MAX_UNREAD * len(ids)


# ---- SmolLM2's tokenizer ------------------------------------------------------------------------

@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_random_ids_join_to_full_decode_smollm2(smollm2_tokenizer, data):
    tok = smollm2_tokenizer
    ids = data.draw(random_ids(len(tok), byte_ids(tok)))
    assert streamed(tok, ids)[0] == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_special_tokens_between_the_bytes_of_a_character_smollm2(smollm2_tokenizer):
    """A continuation byte, then a lead byte and its continuation, with special tokens (skipped by
    the decode) between them: the lead byte is not sent as a broken character before the byte that
    completes it. Hypothesis found this; the special tokens used to fill the decoder's window."""
    tok = smollm2_tokenizer
    special = tok.all_special_ids[0]
    lead, continuation = byte_ids(tok)[0xC2], byte_ids(tok)[0x80]
    ids = [continuation, special, special, special, lead, special, special, special, continuation]
    assert tok.decode(ids, skip_special_tokens=True) == REPLACEMENT + "\x80"
    assert streamed(tok, ids)[0] == REPLACEMENT + "\x80"


@pytest.mark.slow
@EXAMPLES
@given(text=UNICODE_TEXT, stop=st.lists(st.text(min_size=1, max_size=3), max_size=2))
def test_encoded_unicode_and_stops_smollm2(smollm2_tokenizer, text, stop):
    tok = smollm2_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert streamed(tok, ids)[0] == tok.decode(ids, skip_special_tokens=True)
    assert streamed(tok, ids, stop)[0] == reference(tok, ids, stop)


@pytest.mark.slow
def test_a_stop_string_before_an_incomplete_character_stops_at_once_smollm2(smollm2_tokenizer):
    """' fox' then ' ' + the first byte of a character: the stop string 'fox ' is whole, but the
    token was held back for its incomplete character, so the stop was found a token late (or, at
    max_tokens, the generation finished 'length' with its text cut at the stop)."""
    tok = smollm2_tokenizer
    ids = tok.convert_tokens_to_ids(["Ġfox", "Ġâ"])
    assert tok.decode(ids) == " fox " + REPLACEMENT
    text = IncrementalText(tok, ["fox "])
    assert text.push(ids[0]) == (" ", False)  # 'fox' may begin the stop string: held
    assert text.push(ids[1]) == ("", True)


# ---- byte fallback (Llama-2 / Mistral style) ----------------------------------------------------
@functools.cache
def byte_fallback_tokenizer():
    """Specials, the 256 <0xNN> byte tokens (ids 3-258) and '▁the' (259), decoded as Llama-2's
    tokenizer.json does: a run of byte tokens that is not UTF-8 becomes one U+FFFD per byte, the
    ASCII ones included."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁the": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("ids", [[3 + 0x0A, 3 + 0xE2, 259], [3 + 0x41, 3 + 0x80, 259], [3 + 0x0A, 3 + 0xE2]])
def test_a_rewritten_byte_is_never_sent_twice_byte_fallback(ids):
    """Byte fallback decodes a newline sent already as U+FFFD once an invalid byte follows it in
    the same run: the window sent the whole rewritten run again ('\\n' then '\\ufffd\\ufffd the',
    one character too many). The rewrite of what was sent is skipped: as many characters as the
    full decode, differing from it only where it rewrote what the client already has."""
    tok = byte_fallback_tokenizer()
    decoder = WindowDecoder(tok)
    joined = "".join(decoder.push(i) for i in ids) + decoder.flush()
    full = tok.decode(ids)
    assert full.startswith(REPLACEMENT * 2)
    assert len(joined) == len(full) and joined[1:] == full[1:]
