"""End to end: the real server (a subprocess) on SmolLM2-135M-Instruct in NF4 with one PEFT
adapter of each kind, driven through the official ``openai`` client. Each adapter's greedy
output must equal PEFT's own greedy output on the same NF4 base."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import torch

from gateway.base_model import load_base
from gateway.settings import Settings

pytestmark = pytest.mark.slow

ADAPTERS = ("lora-fr", "ia3-x", "pt-x")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MESSAGES_2 = [{"role": "user", "content": "Name three colors."}]
MAX_NEW = 16


@dataclass
class Artifacts:
    adapters_dir: Path
    data_dir: Path
    base_name: str
    prompt_ids: list[int]
    references: dict[str, str] = field(default_factory=dict)  # model name -> PEFT greedy text


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def greedy(model, tokenizer, ids: list[int]) -> str:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _peft_config(kind: str, model_dir: Path):
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    if kind == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text="Answer in French:",
                              tokenizer_name_or_path=str(model_dir))


def _perturb(model, kind: str) -> None:
    with torch.no_grad():
        for _, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if kind == "lora":
                param.copy_(torch.randn_like(param) * 0.04)
            elif kind == "ia3":
                param.mul_(1 + 0.3 * torch.randn_like(param))
            # prompt tuning keeps its text-initialized embeddings


@pytest.fixture(scope="module")
def artifacts(smollm2_dir: Path, tmp_path_factory) -> Artifacts:
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("smollm2-serving")
    adapters_dir, data_dir = root / "adapters", root / "data"
    adapters_dir.mkdir()
    data_dir.mkdir()
    settings = Settings(model=str(smollm2_dir), data_dir=data_dir, device="cpu")
    art: Artifacts | None = None
    for name, kind in zip(ADAPTERS, ("lora", "ia3", "prompt_tuning"), strict=True):
        base = load_base(settings)
        if art is None:
            ids = chat_ids(base.tokenizer, MESSAGES)
            art = Artifacts(adapters_dir, data_dir, base.name, ids)
            art.references[base.name] = greedy(base.model, base.tokenizer, ids)
        torch.manual_seed(1234)
        model = get_peft_model(base.model, _peft_config(kind, smollm2_dir))
        _perturb(model, kind)
        model.eval()
        model.save_pretrained(adapters_dir / name)
        art.references[name] = greedy(model, base.tokenizer, art.prompt_ids)
        del model, base
        gc.collect()
    assert art is not None
    print("PEFT greedy references:", art.references)
    for name in ADAPTERS:  # the adapters must actually change the output, or the check proves nothing
        assert art.references[name] != art.references[art.base_name], (name, art.references)
    return art


@pytest.fixture(scope="module")
def server(artifacts: Artifacts, smollm2_dir: Path, launch_server):
    return launch_server(["--model", str(smollm2_dir), "--adapters-dir", str(artifacts.adapters_dir),
                          "--data-dir", str(artifacts.data_dir), "--device", "cpu"])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def all_models(artifacts: Artifacts) -> list[str]:
    return [artifacts.base_name, *ADAPTERS]


def chat(client: openai.OpenAI, model: str, messages=MESSAGES, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_NEW, **kw)


def stream_chat(client: openai.OpenAI, model: str, messages=MESSAGES):
    text, usage, finish = "", None, None
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_NEW,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


def test_models_list(client: openai.OpenAI, artifacts: Artifacts):
    ids = {m.id for m in client.models.list()}
    assert set(all_models(artifacts)) <= ids, ids


def test_models_retrieve(client: openai.OpenAI, artifacts: Artifacts):
    listed = {m.id: m for m in client.models.list()}
    for model in all_models(artifacts):
        assert client.models.retrieve(model) == listed[model]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-adapter")
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("which", range(4), ids=["base", *ADAPTERS])
def test_chat_plain_and_streamed(client: openai.OpenAI, artifacts: Artifacts, which: int):
    model = all_models(artifacts)[which]
    plain = chat(client, model)
    text = plain.choices[0].message.content
    assert text and text.strip()
    assert plain.model == model
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens == len(artifacts.prompt_ids)
    assert 0 < plain.usage.completion_tokens <= MAX_NEW
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    streamed, usage, finish = stream_chat(client, model)
    assert streamed == text
    assert finish == plain.choices[0].finish_reason
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens,
                                                              plain.usage.completion_tokens)


@pytest.mark.parametrize("which", range(4), ids=["base", *ADAPTERS])
def test_greedy_matches_peft(client: openai.OpenAI, artifacts: Artifacts, which: int):
    model = all_models(artifacts)[which]
    text = chat(client, model).choices[0].message.content
    assert text == artifacts.references[model]


def test_concurrent_batch_equals_sequential(client: openai.OpenAI, artifacts: Artifacts):
    models = all_models(artifacts)
    jobs = [(models[i % 4], MESSAGES if i < 4 else MESSAGES_2) for i in range(6)]
    sequential = [chat(client, m, msgs).choices[0].message.content for m, msgs in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: chat(client, job[0], job[1]).choices[0].message.content, jobs))
    assert concurrent == sequential


def test_text_completion(client: openai.OpenAI, artifacts: Artifacts):
    for model in (artifacts.base_name, "lora-fr"):
        result = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
        assert result.choices[0].text.strip()
        assert result.usage.prompt_tokens > 0
        assert 0 < result.usage.completion_tokens <= 8


def test_unknown_model_is_not_found(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-adapter")


def test_n_above_limit_is_bad_request(client: openai.OpenAI, artifacts: Artifacts):
    with pytest.raises(openai.BadRequestError):
        chat(client, artifacts.base_name, n=9)


def test_invalid_temperature_is_bad_request(client: openai.OpenAI, artifacts: Artifacts):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=artifacts.base_name, messages=MESSAGES, temperature=5, max_tokens=4)


def test_structured_output_parses_for_every_model(client: openai.OpenAI, artifacts: Artifacts):
    """SmolLM2's real byte-level vocabulary under a grammar: ``parse`` returns the object for the
    base and every adapter kind."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class City(BaseModel):
        city: str = Field(max_length=24)
        country: Literal["France", "Germany", "Italy", "Spain"]
        population_millions: int = Field(ge=0, le=50)

    for model in all_models(artifacts):
        completion = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
            response_format=City, temperature=0, max_tokens=48)
        assert isinstance(completion.choices[0].message.parsed, City), (model, completion.choices[0].message)


def test_echo_scores_the_prompt_and_agrees_with_generation(client: openai.OpenAI, artifacts: Artifacts):
    """lm-evaluation-harness's request (token ids, echo, max_tokens 0): every prompt token scored;
    with max_tokens 1 the generated token's entry is the greedy choice."""
    ids = artifacts.prompt_ids
    for model in all_models(artifacts):
        scored = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=1)
        lp = scored.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        one = client.completions.create(model=model, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
        lp1 = one.choices[0].logprobs
        assert lp1.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, rel=1e-4)
        assert lp1.token_logprobs[-1] == pytest.approx(max(lp1.top_logprobs[-1].values()), rel=1e-5)
