"""Logprobs, echo, penalties and logit_bias over HTTP with the official ``openai`` SDK (on the
tiny app of ``test_api``, through TestClient): OpenAI's response shapes for chat and legacy
completions, streamed and not, for the base and every adapter kind; lm-evaluation-harness's
scoring request (echo, max_tokens 0); and every hostile value refused with a 400 in OpenAI's
error shape. Values against PEFT are checked in ``test_logprobs_engine``."""

from __future__ import annotations

import math

import openai
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from support import build_tokenizer
from test_api import ADAPTERS, MESSAGES, make_adapters, make_base, make_settings, sse_events
from test_api_errors import assert_error

MODELS = ["tiny", *ADAPTERS]
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    adapters_dir = make_adapters(root, len(build_tokenizer()))
    app = create_app(make_settings(root, adapters_dir, max_logit_bias=50), base=make_base(build_tokenizer()))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)


def text_of(entries) -> str:
    """The text a list of chat logprob entries spells, from their bytes."""
    return b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")


@pytest.mark.parametrize("model", MODELS)
def test_chat_logprobs_shape_for_every_kind(sdk, model):
    response = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    entries = choice.logprobs.content
    ended = 1 if choice.finish_reason == "stop" else 0  # the end token has no text, no entry
    assert len(entries) == response.usage.completion_tokens - ended
    assert text_of(entries) == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy, no penalty: the chosen token is the most likely one, with the same value
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode()) or "\\x" in entry.token


def test_chat_logprobs_without_top(sdk):
    response = sdk.chat.completions.create(model="lora-a", messages=MESSAGES, max_tokens=4, temperature=0,
                                           logprobs=True)
    assert all(e.top_logprobs == [] for e in response.choices[0].logprobs.content)
    plain = sdk.chat.completions.create(model="lora-a", messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == response.choices[0].message.content


@pytest.mark.parametrize("model", ["tiny", "pt-a"])
def test_streamed_chat_logprobs_equal_the_whole_answer(sdk, model):
    whole = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                        logprobs=True, top_logprobs=2)
    streamed, text = [], ""
    for chunk in sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                             logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert text == whole.choices[0].message.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]


@pytest.mark.parametrize("model", MODELS)
def test_completion_logprobs_shape(sdk, model):
    response = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    choice = response.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == response.usage.completion_tokens  # the end token has its entry too
    assert lp.text_offset[0] == len(PROMPT)  # offsets count from the prompt's start
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 2 <= len(top) <= 3 and top[token] == value  # the top 2 and the chosen one
        assert max(top.values()) == value  # greedy


@pytest.mark.parametrize("model", MODELS)
def test_echo_with_max_tokens_zero_scores_the_prompt(sdk, client, model):
    """What lm-evaluation-harness's local-completions sends to score log-likelihoods."""
    prompts = [PROMPT, "hello world, how are you?"]
    response = sdk.completions.create(model=model, prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                      temperature=0)
    tokenizer = client.app.state.gateway.service.tokenizer
    assert response.usage.completion_tokens == 0
    for choice, prompt in zip(response.choices, prompts, strict=True):
        lp = choice.logprobs
        assert choice.text == prompt and choice.finish_reason == "length"
        assert len(lp.tokens) == len(tokenizer.encode(prompt))
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
        assert "".join(lp.tokens) == prompt  # plain ASCII: token texts join to the prompt


def test_echo_then_generate_matches_a_plain_request(sdk):
    """echo with max_tokens 1: the prompt's entries, then the generated token's, equal to what a
    request without echo reports for it."""
    echoed = sdk.completions.create(model="ia3-a", prompt=PROMPT, max_tokens=1, echo=True, logprobs=3,
                                    temperature=0)
    plain = sdk.completions.create(model="ia3-a", prompt=PROMPT, max_tokens=1, logprobs=3, temperature=0)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.choices[0].logprobs.token_logprobs[-1] == plain.choices[0].logprobs.token_logprobs[0]
    assert echoed.choices[0].logprobs.top_logprobs[-1] == plain.choices[0].logprobs.top_logprobs[0]
    assert echoed.choices[0].logprobs.text_offset[-1] == plain.choices[0].logprobs.text_offset[0]


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_ended_by_the_end_token_keeps_its_entry(client, stream):
    """lm-evaluation-harness scores a continuation with echo, ``max_tokens`` 1 and ``logprobs`` 1,
    and sums ``token_logprobs[ctxlen:-1]``: the last entry must be the generated token's even
    when that token is the end token, or the sum silently loses the continuation's last token
    (0.0 for a one-token continuation). ``logit_bias`` forces the end token (it moves the
    sampler, not the reported values)."""
    tokenizer = client.app.state.gateway.service.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = {"model": "lora-a", "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
            "logit_bias": {str(eos): 100}, "stream": stream}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        choices = [c for e in sse_events(response)[:-1] for c in e["choices"]]
        lp = {k: sum((c["logprobs"][k] for c in choices), []) for k in ("tokens", "token_logprobs", "text_offset")}
        text, finish = "".join(c["text"] for c in choices), choices[-1]["finish_reason"]
    else:
        choice = response.json()["choices"][0]
        lp, text, finish = choice["logprobs"], choice["text"], choice["finish_reason"]
    prompt_ids = tokenizer.encode(PROMPT)
    assert finish == "stop" and text == PROMPT
    assert len(lp["token_logprobs"]) == len(prompt_ids) + 1
    assert lp["tokens"][-1] == "<|im_end|>" and lp["token_logprobs"][-1] <= 0
    assert lp["text_offset"][-1] == len(PROMPT)  # the end token adds no text
    scored = client.post("/v1/completions", json={"model": "lora-a", "prompt": PROMPT, "max_tokens": 0,
                                                  "echo": True, "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][2:-1] == pytest.approx(scored["token_logprobs"][2:], rel=1e-6)


def test_chat_leaves_the_end_token_out(client, sdk):
    """Chat content logprobs spell the answer's text: the end token has no entry (OpenAI's shape)."""
    eos = client.app.state.gateway.service.tokenizer.convert_tokens_to_ids("<|im_end|>")
    response = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                           logprobs=True, logit_bias={str(eos): 100})
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == ""
    assert response.usage.completion_tokens == 1 and choice.logprobs.content == []


def test_streamed_echo_equals_the_whole_answer(client):
    body = {"model": "lora-a", "prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 2, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = sse_events(client.post("/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in events[:-1]:
        for choice in event["choices"]:
            text += choice["text"]
            for key in merged:
                merged[key] += choice["logprobs"][key]
    assert text == whole["text"] and text.startswith(PROMPT)
    assert merged == whole["logprobs"]


def test_logit_bias_forces_a_token(sdk, client):
    tokenizer = client.app.state.gateway.service.tokenizer
    token = tokenizer.encode(" fox")[-1]
    for model in MODELS:
        response = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3,
                                          logit_bias={str(token): 100}, logprobs=0)
        lp = response.choices[0].logprobs
        assert lp.tokens == [tokenizer.decode([token])] * 4, model
        # the reported values are the model's own: a random model gives the token no such weight
        assert all(v < math.log(0.5) for v in lp.token_logprobs), model


def test_penalties_are_accepted_and_change_sampling(sdk):
    plain = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.5}}):
        response = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, **extra)
        assert response.choices[0].finish_reason in ("stop", "length")
    # neutral values are the plain answer
    neutral = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                          frequency_penalty=0, presence_penalty=0,
                                          extra_body={"repetition_penalty": 1.0})
    assert neutral.choices[0].message.content == plain.choices[0].message.content


def chat(client, **extra):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **extra})


def complete(client, **extra):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **extra})


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # top_logprobs needs logprobs
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"٣": 1}}, "logit_bias"),  # a digit, but not an ASCII one
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(51)}}, "logit_bias"),  # more than max_logit_bias
    ({"logit_bias": {"1": 100, "01": 100, "001": 100}}, "logit_bias"),  # one token: summed past the cap before
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # found by loadtest.fuzz: 1 / it is infinite
    ({"repetition_penalty": 0.09}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
])
def test_hostile_chat_values_are_refused(client, extra, param):
    error = assert_error(chat(client, **extra), 400)
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("extra", [
    {"logprobs": 6}, {"logprobs": -1}, {"logprobs": 1, "max_tokens": 0}, {"max_tokens": -1},
    {"logit_bias": {"1e3": 1}},
])
def test_hostile_completion_values_are_refused(client, extra):
    assert_error(complete(client, **extra), 400)


def test_sdk_raises_bad_request_for_top_logprobs_21(sdk):
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=21)


# ---- /tokenize and /detokenize ------------------------------------------------------------------
def test_tokenize_prompt_counts_virtual_tokens(client):
    tokenizer = client.app.state.gateway.service.tokenizer
    ids = tokenizer.encode(PROMPT)
    base = client.post("/tokenize", json={"model": "tiny", "prompt": PROMPT}).json()
    assert base == {"count": len(ids), "max_model_len": 256, "tokens": ids, "virtual_tokens": 0}
    lora = client.post("/tokenize", json={"model": "lora-a", "prompt": PROMPT}).json()
    assert lora["count"] == len(ids) and lora["tokens"] == ids
    prompt_tuned = client.post("/tokenize", json={"model": "pt-a", "prompt": PROMPT}).json()
    assert prompt_tuned["virtual_tokens"] == 5 and prompt_tuned["count"] == len(ids) + 5


def test_tokenize_messages_matches_the_chat_prompt(client, sdk):
    counted = client.post("/tokenize", json={"model": "pt-a", "messages": MESSAGES}).json()
    response = sdk.chat.completions.create(model="pt-a", messages=MESSAGES, max_tokens=1, temperature=0)
    assert len(counted["tokens"]) == response.usage.prompt_tokens
    without = client.post("/tokenize", json={"model": "pt-a", "messages": MESSAGES,
                                             "add_generation_prompt": False}).json()
    assert len(without["tokens"]) < len(counted["tokens"])


def test_detokenize_round_trip(client):
    ids = client.post("/tokenize", json={"model": "tiny", "prompt": "hello world, héllo ✓"}).json()["tokens"]
    assert client.post("/detokenize", json={"model": "ia3-a", "tokens": ids}).json() == {"prompt": "hello world, héllo ✓"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"model": "tiny"}, 400, None),
    ("/tokenize", {"model": "tiny", "prompt": "x", "messages": MESSAGES}, 400, None),
    ("/detokenize", {"model": "tiny", "tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [1] * 257}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_tokenize_refusals(client, path, body, status, param):
    error = assert_error(client.post(path, json=body), status, type_=None)
    if param is not None:
        assert error["param"] == param


def test_token_id_prompts_score_like_text_prompts(sdk, client):
    """lm-evaluation-harness sends token ids by default: the same scores as the text, echoed as
    the decoded text."""
    tokenizer = client.app.state.gateway.service.tokenizer
    ids = tokenizer.encode(PROMPT)
    as_text = sdk.completions.create(model="pt-a", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    as_ids = sdk.completions.create(model="pt-a", prompt=[ids, ids], max_tokens=0, echo=True, logprobs=1)
    for choice in as_ids.choices:
        assert choice.text == PROMPT
        assert choice.logprobs.token_logprobs == as_text.choices[0].logprobs.token_logprobs
    plain = sdk.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert plain.choices[0].text == sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                                           temperature=0).choices[0].text


@pytest.mark.parametrize("prompt", [[10 ** 6], [-3], [[1, 2], []], [[5]] * 9])
def test_bad_token_id_prompts_are_refused(client, prompt):
    assert_error(complete(client, prompt=prompt), 400)


def test_text_offsets_count_characters_when_tokens_split_them():
    """Each byte of an emoji is a token of its own here; its display string is an escape of 4+
    characters (\\xf0...). Offsets counted those strings, and every later offset pointed past the
    text (13 of 15 wrong on a prompt with two emoji)."""
    from gateway.api.logprob_format import CompletionLogprobs
    from gateway.logprobs import TokenLogprob, TokenStrings

    tokenizer = build_tokenizer()
    text = "I love 🍕 and 🍣 so much, she said."
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 2  # the emoji are split over several tokens
    offsets = CompletionLogprobs(TokenStrings(tokenizer)).piece(
        [TokenLogprob(token=t, logprob=-1.0) for t in ids])["text_offset"]
    for i, offset in enumerate(offsets):
        before = tokenizer.decode(ids[:i])
        if "\ufffd" not in before:  # token i starts at a character boundary: its text starts there
            assert offset == len(before) and text[:offset] == before, (i, offset, before)
    assert offsets == sorted(offsets) and offsets[-1] < len(text)


def test_text_offsets_of_an_echoed_prompt_with_a_bos_and_special_tokens():
    """A tokenizer that adds a BOS (Llama 3's '<|begin_of_text|>', Llama 2's '<s>'): the echoed
    text is the prompt as the client wrote it, without that BOS, yet it counted its display string
    (every offset 13 or 17 characters too far). A special token the client wrote in the prompt is
    in the text and counts; the answer's offsets start at the prompt's end."""
    from gateway.api.logprob_format import CompletionLogprobs, merge_pieces
    from gateway.logprobs import TokenLogprob, TokenStrings

    tokenizer = build_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prompt = "<|im_start|>the quick brown fox"
    ids = [bos, *tokenizer.encode(prompt)]  # the BOS a post-processor would add
    answer = tokenizer.encode(" jumps over")
    builder = CompletionLogprobs(TokenStrings(tokenizer), 0, prompt)
    entries = [TokenLogprob(token=t, logprob=None if i == 0 else -1.0) for i, t in enumerate(ids)]
    merged = merge_pieces([builder.piece(entries, prompt=True),
                           builder.piece([TokenLogprob(token=t, logprob=-1.0) for t in answer])])
    offsets = merged["text_offset"]
    assert offsets[:2] == [0, 0]  # the BOS is not in the text; '<|im_start|>' starts it
    starts = [len(tokenizer.decode(ids[1:i])) for i in range(1, len(ids))]
    assert offsets[1:len(ids)] == starts
    assert offsets[len(ids):] == [len(prompt) + len(tokenizer.decode(answer[:i])) for i in range(len(answer))]


def test_sentencepiece_tokens_show_their_space_and_their_bytes():
    """Llama-2-style tokens decoded one by one: '▁the' lost its space (' the' in the text, 'the'
    as the token and its bytes), and a byte-fallback token showed U+FFFD for a byte that only
    starts a character, whatever the byte."""
    from test_detokenize import byte_fallback_tokenizer

    from gateway.logprobs import TokenStrings

    strings = TokenStrings(byte_fallback_tokenizer())
    assert strings.get(259) == (" the", b" the")  # '▁the'
    assert strings.get(3 + 0x0A) == ("\n", b"\n")  # '<0x0A>'
    assert strings.get(3 + 0xE2) == ("\\xe2", b"\xe2")  # the first byte of '’' or '—'
    assert strings.get(1) == ("<s>", b"<s>")  # a special token as it is written
