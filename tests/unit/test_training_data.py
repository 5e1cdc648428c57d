"""Unit tests of adapters.training_data with a tiny byte-level BPE ChatML tokenizer built in memory."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from adapters.errors import DatasetValidationError
from adapters.training_data import (
    IGNORE_INDEX, Conversation, JsonlObjects, ParsedDataset, _LineProblem, parse_dataset, split_train_eval,
    tokenize_dataset,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _build_tokenizer(chat_template):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, how are you?", "the quick brown fox jumps", "user assistant system",
                             "What is two plus two? Four."], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def chatml():
    return _build_tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain():
    return _build_tokenizer(None)


def jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def trained_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_chat_format(chatml):
    parsed = parse_dataset(jsonl(chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))))
    assert parsed.format == "chat" and parsed.problems == []
    conv = parsed.conversations[0]
    assert isinstance(conv, Conversation) and conv.line == 1
    assert conv == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}]
    ex = tokenize_dataset(parsed, chatml, max_seq_len=256).examples[0]
    assert len(ex.input_ids) == len(ex.labels) and ex.line == 1
    assert chatml.decode(ex.input_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                           "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert trained_text(chatml, ex) == "Hello!<|im_end|>\n"
    # the labelled span is one contiguous run at the end, ending with the end-of-turn token
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    assert chatml.convert_tokens_to_ids("<|im_end|>") in ex.labels[first:]


def test_prompt_completion_format(chatml):
    parsed = parse_dataset(jsonl({"prompt": "What is two plus two?", "completion": "Four."}, "",
                                 {"prompt": "Say hi", "completion": "hi", "extra": 1}))
    assert parsed.format == "prompt_completion"
    assert [c.line for c in parsed.conversations] == [1, 3]
    assert parsed.conversations[0] == [{"role": "user", "content": "What is two plus two?"},
                                       {"role": "assistant", "content": "Four."}]
    data = tokenize_dataset(parsed, chatml, max_seq_len=256)
    assert [trained_text(chatml, ex) for ex in data.examples] == ["Four.<|im_end|>\n", "hi<|im_end|>\n"]


def test_instruction_format(chatml):
    parsed = parse_dataset(jsonl({"instruction": "Translate", "input": "bonjour", "output": "hello"},
                                 {"instruction": "Greet", "input": "", "output": "hi"},
                                 {"instruction": "Greet", "output": "hey"},
                                 {"instruction": "Greet", "input": None, "output": "yo"}))
    assert parsed.format == "instruction" and parsed.problems == []
    users = [c[0]["content"] for c in parsed.conversations]
    assert users == ["Translate\n\nbonjour", "Greet", "Greet", "Greet"]
    data = tokenize_dataset(parsed, chatml, max_seq_len=256)
    assert trained_text(chatml, data.examples[0]) == "hello<|im_end|>\n"


def test_multi_turn_chat_masks_every_assistant_turn(chatml):
    row = chat(("user", "Hi"), ("assistant", "Hello!"), ("user", "How are you?"), ("assistant", "Fine."),
               ("user", "Bye"))  # trailing user turn: allowed, carries no loss, left out
    data = tokenize_dataset(parse_dataset(jsonl(row)), chatml, max_seq_len=256)
    ex = data.examples[0]
    assert trained_text(chatml, ex) == "Hello!<|im_end|>\nFine.<|im_end|>\n"
    assert "Bye" not in chatml.decode(ex.input_ids)
    masked = chatml.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX])
    assert masked == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                      "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")


def test_control_tokens_in_content_are_plain_text(chatml):
    row = chat(("user", "end it <|im_end|>"), ("assistant", "ok"))
    ex = tokenize_dataset(parse_dataset(jsonl(row)), chatml, max_seq_len=256).examples[0]
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert ex.input_ids.count(im_end) == 2  # one per turn, none from the content


def test_mixed_formats_reported(chatml):
    parsed = parse_dataset(jsonl({"prompt": "a", "completion": "b"}, chat(("user", "x"), ("assistant", "y")),
                                 {"instruction": "i", "output": "o"}, {"prompt": "c", "completion": "d"}))
    assert parsed.format == "prompt_completion"
    assert [c.line for c in parsed.conversations] == [1, 4]
    assert [line for line, _ in parsed.problems] == [2, 3]
    assert all("expected prompt_completion format" in reason for _, reason in parsed.problems)


def test_format_detected_from_first_valid_object():
    parsed = parse_dataset(jsonl("not json", "[1]", {"foo": 1}, chat(("user", "x"), ("assistant", "y")),
                                 {"prompt": "a", "completion": "b"}))
    assert parsed.format == "chat"
    assert [c.line for c in parsed.conversations] == [4]
    reasons = dict(parsed.problems)
    assert reasons[1] == "not valid JSON"
    assert reasons[2].startswith("not a JSON object")
    assert reasons[3].startswith("unrecognised record")
    assert "expected chat format" in reasons[5]


BAD_CHAT_LINES = [
    ({"foo": 1}, "missing field 'messages'"),  # no known format after a chat record (was a KeyError)
    ({"messages": "hi"}, "field 'messages' must be an array"),
    ({"messages": []}, "field 'messages' is empty"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"messages": [{"content": "x"}]}, "missing messages[0]: field 'role'"),
    ({"messages": [{"role": "user"}]}, "missing messages[0]: field 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: field 'content' must be a string, got number"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "must be a string, got array"),
    (chat(("tool", "x"), ("assistant", "y")), "messages[0]: unknown role 'tool'"),
    (chat(("user", "x"), ("assistant", "  ")), "messages[1]: field 'content' is empty"),
    (chat(("system", "x"), ("user", "y")), "chat has no assistant message"),
    (chat(("assistant", "x"), ("user", "y"), ("assistant", "z")), "chat starts with an assistant message"),
]


def test_every_chat_problem_with_line_number():
    good = chat(("user", "x"), ("assistant", "y"))
    rows = [good] + [row for row, _ in BAD_CHAT_LINES]
    parsed = parse_dataset(jsonl(*rows))
    assert len(parsed.conversations) == 1
    assert [line for line, _ in parsed.problems] == list(range(2, len(rows) + 1))
    for (line, reason), (_, expected) in zip(parsed.problems, BAD_CHAT_LINES):
        assert expected in reason, (line, reason)


def test_field_problems_in_flat_formats():
    parsed = parse_dataset(jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": 1, "completion": "b"},
                                 {"prompt": "a", "completion": ""}, {"completion": "b"}))
    assert dict(parsed.problems) == {2: "missing field 'completion'", 3: "field 'prompt' must be a string, got number",
                                     4: "field 'completion' is empty", 5: "missing field 'prompt'"}
    parsed = parse_dataset(jsonl({"instruction": "a", "output": "b"}, {"instruction": "a", "input": 5, "output": "b"},
                                 {"instruction": "a"}))
    assert dict(parsed.problems) == {2: "field 'input' must be a string, got number", 3: "missing field 'output'"}


def test_encoding_length_and_count_limits():
    good = json.dumps({"prompt": "a", "completion": "b"}).encode()
    data = b"\n".join([good, b"\xff\xfe{}", good + b" " * 100, b"", good, good, good])
    parsed = parse_dataset(data, max_line_bytes=len(good) + 10, max_lines=5)
    assert [c.line for c in parsed.conversations] == [1, 5, 6]
    reasons = dict(parsed.problems)
    assert reasons[2] == "not valid UTF-8"
    assert reasons[3].startswith("line too long (") and f"limit {len(good) + 10}" in reasons[3]
    assert reasons[7].startswith("too many lines (limit 5)")


def test_blank_lines_crlf_and_bom_are_accepted():
    data = b"\xef\xbb\xbf" + jsonl({"prompt": "a", "completion": "b"}).replace(b"\n", b"") + b"\r\n\r\n  \n" + \
        jsonl({"prompt": "c", "completion": "d"}) + b"\n"
    parsed = parse_dataset(data)
    assert parsed.problems == [] and [c.line for c in parsed.conversations] == [1, 4]


def test_no_usable_record_raises_with_every_problem():
    with pytest.raises(DatasetValidationError) as err:
        parse_dataset(jsonl("nope", {"prompt": 1, "completion": "x"}))
    assert "0 of 2 records usable" in str(err.value)
    assert [line for line, _ in err.value.problems] == [1, 2]
    with pytest.raises(DatasetValidationError, match="empty"):
        parse_dataset(b"\n  \n")


def test_strict_raises_on_any_problem(chatml):
    data = jsonl({"prompt": "a", "completion": "b"}, "oops")
    assert len(parse_dataset(data).problems) == 1
    with pytest.raises(DatasetValidationError) as err:
        parse_dataset(data, strict=True)
    assert err.value.problems == [(2, "not valid JSON")]
    parsed = parse_dataset(jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a " * 200, "completion": "b"}))
    with pytest.raises(DatasetValidationError) as err:
        tokenize_dataset(parsed, chatml, max_seq_len=64, strict=True)
    assert [line for line, _ in err.value.problems] == [2]


def test_too_long_after_tokenization(chatml):
    parsed = parse_dataset(jsonl({"prompt": "hi", "completion": "ok"}, {"prompt": "hello world " * 50, "completion": "x"},
                                 "bad"))
    data = tokenize_dataset(parsed, chatml, max_seq_len=40)
    assert [ex.line for ex in data.examples] == [1]
    assert data.problems[0] == (2, data.problems[0][1])
    assert data.problems[0][1].startswith("too long after tokenization (") and "> max_seq_len 40)" in data.problems[0][1]
    assert data.problems[1] == (3, "not valid JSON")
    with pytest.raises(DatasetValidationError) as err:
        tokenize_dataset(parsed, chatml, max_seq_len=5)
    assert "0 of 3 records usable" in str(err.value) and len(err.value.problems) == 3


def test_many_short_turns_stop_rendering_at_max_seq_len(chatml, monkeypatch):
    """Each assistant turn renders the conversation before it, so a line of many short turns cost
    the square of its length (one 88 KB line took 76 s of a shared thread): rendering now stops at
    the first prompt past max_seq_len, long before the 2,000th turn."""
    import adapters.training_data as training_data

    renders = []
    real = training_data.render_chat

    def counting(tokenizer, messages, **kwargs):
        renders.append(len(messages))
        return real(tokenizer, messages, **kwargs)

    monkeypatch.setattr(training_data, "render_chat", counting)
    turns = [m for _ in range(1000) for m in (("user", "a"), ("assistant", "b"))]
    with pytest.raises(DatasetValidationError) as err:
        tokenize_dataset(parse_dataset(jsonl(chat(*turns))), chatml, max_seq_len=64)
    assert err.value.problems[0][1].startswith("too long after tokenization (at least ")
    assert len(renders) < 30 and max(renders) < 60


def test_no_template_fallback(plain):
    assert not plain.chat_template
    parsed = parse_dataset(jsonl(chat(("system", "sys"), ("user", "Hi <|endoftext|>"), ("assistant", "Hello!"),
                                      ("user", "more"), ("assistant", "Fine."))))
    ex = tokenize_dataset(parsed, plain, max_seq_len=256).examples[0]
    eos = plain.eos_token_id
    assert plain.decode(ex.input_ids) == "sys\nHi <|endoftext|>\nHello!<|endoftext|>more\nFine.<|endoftext|>"
    assert ex.input_ids.count(eos) == 2  # the literal in the user content is plain text
    assert trained_text(plain, ex) == "Hello!<|endoftext|>Fine.<|endoftext|>"
    assert ex.labels[-1] == eos


def test_template_that_is_not_prefix_stable(chatml):
    # drops earlier assistant turns from the history, like templates that strip past reasoning
    unstable = _build_tokenizer("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
                                "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    parsed = parse_dataset(jsonl(chat(("user", "a"), ("assistant", "b")),
                                 chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))))
    data = tokenize_dataset(parsed, unstable, max_seq_len=256)
    assert [ex.line for ex in data.examples] == [1]
    assert data.problems[0][0] == 2 and "not prefix-stable" in data.problems[0][1]


def test_template_errors_become_line_problems():
    strict_tmpl = _build_tokenizer("{% for m in messages %}{% if m.role == 'system' %}"
                                   "{{ raise_exception('no system role') }}{% endif %}{{ m.content }}{% endfor %}")
    parsed = parse_dataset(jsonl(chat(("system", "s"), ("user", "a"), ("assistant", "b"))))
    with pytest.raises(DatasetValidationError) as err:
        tokenize_dataset(parsed, strict_tmpl, max_seq_len=256)
    assert "chat template failed" in err.value.problems[0][1] and "no system role" in err.value.problems[0][1]


class _DictReturningTokenizer:
    """Wraps a tokenizer; its apply_chat_template has no return_dict and always returns a BatchEncoding."""

    def __init__(self, inner):
        self.inner, self.chat_template = inner, inner.chat_template

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        return self.inner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=tokenize, return_dict=True)


def test_dict_return_of_apply_chat_template_is_handled(chatml):
    assert not isinstance(chatml.apply_chat_template([{"role": "user", "content": "a"}], tokenize=True,
                                                     return_dict=False), dict)
    parsed = ParsedDataset("chat", [Conversation(chat(("user", "a"), ("assistant", "b"))["messages"], line=7)])
    ex = tokenize_dataset(parsed, _DictReturningTokenizer(chatml), max_seq_len=64).examples[0]
    assert ex.line == 7 and all(type(i) is int for i in ex.input_ids + ex.labels)
    assert ex.input_ids == tokenize_dataset(parsed, chatml, max_seq_len=64).examples[0].input_ids
    assert trained_text(chatml, ex) == "b<|im_end|>\n"


def test_split_train_eval():
    items = list(range(20))
    train, held = split_train_eval(items, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15 and sorted(train + held) == items
    assert split_train_eval(items, 0.25, seed=3) == (train, held)
    assert split_train_eval(items, 0.25, seed=4) != (train, held)
    assert train == sorted(train) and held == sorted(held)
    assert split_train_eval(items, 0.0, seed=3) == (items, [])
    assert split_train_eval([1, 2], 0.9, seed=0)[0] != []  # at least one training example
    assert split_train_eval([1, 2], 0.01, seed=0)[1] != []  # positive fraction gives at least one eval example
    assert split_train_eval([1], 0.5, seed=0) == ([1], [])
    with pytest.raises(ValueError):
        split_train_eval(items, 1.0, seed=0)
    with pytest.raises(ValueError):
        split_train_eval([], 0.1, seed=0)


def _split_lines_reference(data: bytes, max_lines: int, max_line_bytes: int):
    """JsonlObjects as it was with data.split(b"\\n"): the behaviour the streaming scan must keep."""
    problems: list[tuple[int, str]] = []
    reader = JsonlObjects(data, problems, max_lines=max_lines, max_line_bytes=max_line_bytes)
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        reader.records += 1
        if reader.records > max_lines:
            problems.append((lineno, f"too many lines (limit {max_lines}); this line and the rest were not read"))
            break
        try:
            out.append((lineno, reader._object(raw, lineno)))
        except _LineProblem as problem:
            problems.append((lineno, str(problem)))
    return out, problems, reader.records


@pytest.mark.parametrize("data", [
    b"", b"\n", b"\n\n", b"\r\n", b"  \t\r\n", b'{"a": 1}', b'{"a": 1}\n', b'\n{"a": 1}', b'{"a": 1}\r\n{"b": 2}',
    b'{"a": 1}\r\n\r\n  \n{"b": 2}\r\n', b'\xef\xbb\xbf{"a": 1}\n\xef\xbb\xbf{"b": 2}', b'{"a": 1}\r{"b": 2}\n',
    b'{"a": 1}\n[1]\nnope\n\xff\n{"long": "' + b"x" * 40 + b'"}\n{"c": 3}', b'{"a":1}\n' * 5 + b'{"z": 0}',
    b'{"a":1}\n\n' * 4 + b"\n", b'{"a": 1}\n' + b"x" * 31 + b"\r\n",
])
def test_jsonl_lines_match_a_plain_split(data):
    # line numbers, blank lines (CRLF and whitespace-only ones), a last line without "\n", a "\r"
    # counted in a line's length, the BOM only on line 1, and the line limit all stay as they were
    problems: list[tuple[int, str]] = []
    reader = JsonlObjects(data, problems, max_lines=4, max_line_bytes=32)
    got = list(reader)
    assert (got, problems, reader.records) == _split_lines_reference(data, max_lines=4, max_line_bytes=32)
