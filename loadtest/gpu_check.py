"""One command for the minutes a GPU is lent (issue 11, "GPU"): the CUDA equivalence checks in NF4,
the engine figures on a ~1B Llama with random weights, and a decode step against the GPU's
memory-bandwidth bound. Every step fails soft (its error is recorded, the next one runs) and the
JSON is rewritten after each, so a run cut short keeps what it measured.

Steps:
1. ``env``: torch, CUDA device, bitsandbytes, memory.
2. ``pytest_gpu``: ``pytest tests/unit/test_gpu.py`` (the runtime's mixed batch against PEFT on CUDA).
   On CUDA that includes the LoRA Triton kernels against PEFT, and their start-up probe.
3. ``lora_kernel``: ``lora_kernel=auto``'s probe at the bench model's width, per dtype: the
   torch path's and the Triton kernels' time for one packed batch, and which one the gateway uses.
4. ``nf4_equivalence``: a tiny Llama in NF4 (float32 compute, TF32 off) on the device; one mixed
   batch of LoRA, IA3, prompt tuning and the base through the gateway's GenerationService, each
   row's greedy text against PEFT's own model for that adapter alone on the same NF4 weights.
5. ``decode_bound``: the ~1B model in NF4, plain transformers decode steps at batch B and context
   L, against (NF4 weights + LM head + KV cache read once per step) / the GPU's peak bandwidth.
6. ``figures``: ``loadtest.engine_bench`` on that model through HTTP (a subprocess, under the
   time left); its figures are copied in, and figure 3's decode time per token is set against the
   same bandwidth bound.

No download: the model is a config built here (random weights, as vLLM's ``--load-format dummy``)
with a byte-level BPE tokenizer trained here on made-up words, so prompts of exact token lengths
exist.

On the GPU machine torch, transformers, peft, accelerate, httpx and prometheus-client are there;
the rest travels as wheels (about 46 MB). Here, once, from the repository root:
    ../shared/tools/gpu-wheels.sh fastapi==0.163.2 uvicorn==0.54.0 httptools==0.9.0 starlette==1.10.0 pydantic==2.13.4 \
        pydantic-core==2.46.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 python-multipart==0.0.34 \
        annotated-types==0.8.0 typing-inspection==0.4.5 pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1
then one device call, carry [".whl"], timeout 600 s:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 -m loadtest.gpu_check
It writes $OUT/gpu_check.json (else loadtest/results/gpu_check.json), the figures' JSON/PNG and
the servers' logs beside it (7 files), in about 8 minutes (``--budget-s``).
Here, to check the script itself at toy sizes on CPU (about 4 minutes):
    python -m loadtest.gpu_check --cpu-smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from loadtest.engine_figures import NF4_WEIGHT_BYTES

log = logging.getLogger("loadtest.gpu_check")
REPO = Path(__file__).resolve().parent.parent
# peak HBM bandwidth by device name (bytes/s), from the vendors' data sheets
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12,
                  "L4": 0.3e12}
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a Llama of ~1.0B parameters (TinyLlama's layout) for the GPU; a toy for the CPU smoke run
GPU_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab": 16384}
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab": 2048}


# ---- the model folder: a config and a tokenizer, nothing downloaded -----------------------------------

def train_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE trained on made-up words, so most merges are whole words (``" word"``),
    with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(vocab_size)]
    corpus = [" ".join(rng.choices(words, k=64)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    return fast


def build_model_folder(folder: Path, shape: dict, *, with_weights: bool) -> Path:
    """``config.json`` and the tokenizer (and, for small models, fp32 random weights); a folder
    without weights is for ``--dummy-weights`` (the gateway writes random ones once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tokenizer = train_tokenizer(shape["vocab"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    if with_weights:
        import torch

        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    else:
        config.save_pretrained(folder)
    return folder


# ---- steps ---------------------------------------------------------------------------------------------

def step_env(args) -> dict:
    import torch

    import sqlite3

    # the gateway refuses SQLite older than 3.35 (adapters.sql.MIN_SQLITE): the figures' servers need it
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as exc:
        info["bitsandbytes"] = f"missing: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(total / 2**30, 1), free_gib=round(free / 2**30, 1))
    return info


def step_pytest_gpu(args) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/unit/test_gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-3000:]
    skipped = " skipped" in tail and " passed" not in tail
    return {"returncode": proc.returncode, "passed": None if skipped else proc.returncode == 0, "skipped": skipped,
            "seconds": round(time.monotonic() - started, 1), "output_tail": tail}


def step_lora_kernel(args) -> dict:
    """``lora_kernel=auto``'s start-up probe at the bench model's width, for each serving dtype."""
    import torch

    from adapters.kinds.lora_kernel import choose_lora_kernel

    result = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        choice = choose_lora_kernel("auto", torch.device(args.device), dtype, args.shape["hidden_size"])
        result[str(dtype).removeprefix("torch.")] = {"kernel": choice.kernel, "reason": choice.reason,
                                                     "timings_ms": choice.timings_ms}
        log.info("LoRA kernel, %s: %s (%s) %s", dtype, choice.kernel, choice.reason, choice.timings_ms)
    return result


def step_nf4_equivalence(args, work: Path) -> dict:
    return asyncio.run(_nf4_equivalence(args, work))


async def _nf4_equivalence(args, work: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from gateway.base_model import LoadedBase
    from loadtest.bench_adapters import make_adapter
    from loadtest.harness import InProcessGateway, bench_settings

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    folder = build_model_folder(work / "eq-model", {**SMOKE_SHAPE, "vocab": 512}, with_weights=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def load_nf4():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": str(device)},
                                                    quantization_config=quant).eval()

    kinds = {"lora": "lora8-all", "ia3": "ia3", "prompt": "prompt16"}
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapters = {name: make_adapter(plain, kind, work / "eq-adapters" / name, seed=i + 1)
                for i, (name, kind) in enumerate(kinds.items())}
    settings = bench_settings(work / "eq-data", str(folder), max_batch_size=8, device_adapters=4)
    settings = settings.model_copy(update={"device": device.type})
    base = LoadedBase(model=load_nf4(), tokenizer=tokenizer, name="eq-base", device=device, dtype=torch.float32,
                      context_window=4096, load_seconds=0.0)
    gw = InProcessGateway(settings, base)
    await gw.start()
    rng = random.Random(3)
    prompts = {name: [rng.randrange(10, len(tokenizer)) for _ in range(5 + i)]
               for i, name in enumerate([*adapters, "base"])}
    steps = args.equivalence_tokens
    try:
        for name, path in adapters.items():
            await gw.register(name, path)
        await gw.warm(list(adapters))
        ours = await asyncio.gather(*(gw.complete(name if name != "base" else gw.base_name, prompts[name], steps)
                                      for name in prompts))  # one mixed batch
    finally:
        await gw.close()
    rows = {}
    for (name, prompt), text in zip(prompts.items(), ours, strict=True):
        reference = load_nf4()
        if name != "base":
            reference = PeftModel.from_pretrained(reference, str(adapters[name])).eval()
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():  # greedy, no cache: the plainest reference there is
            for _ in range(steps):
                next_id = reference(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        expected = tokenizer.decode(ids[0, len(prompt):].tolist(), skip_special_tokens=True)
        # the detokenizer holds back a trailing incomplete UTF-8 character (shown as U+FFFD) until
        # the next token completes it; the request ends first, so only that tail may differ
        same = text == expected or text.rstrip("\ufffd") == expected.rstrip("\ufffd")
        rows[name] = {"identical": same, "ours": text, "peft": expected}
        del reference
    return {"passed": all(r["identical"] for r in rows.values()), "tokens": steps, "rows": rows}


def step_decode_bound(args, model_dir: Path) -> dict:
    """Plain transformers decode steps on the NF4 model (no gateway): the floor any engine meets."""
    import torch
    from transformers import DynamicCache

    from gateway.base_model import load_base
    from gateway.settings import Settings
    from loadtest import engine_figures as ef

    settings = Settings(model=str(model_dir), data_dir=args.data_dir, device=args.device)
    base = load_base(settings)
    model, device = base.model, base.device
    shape = ef.ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    element = 2 if base.dtype != torch.float32 else 4
    peak = peak_bandwidth(args)
    rows = []
    for batch, context in args.bound_points:
        ids = torch.randint(10, shape.vocab, (batch, context), device=device)
        with torch.no_grad():
            cache = DynamicCache()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(args.bound_steps):
                _sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                _sync(device)
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        need = ef.decode_step_bytes(shape, batch=batch, context=context, weight_bytes_per_param=NF4_WEIGHT_BYTES,
                                    head_bytes_per_param=element, kv_element_bytes=element)
        bound = need["total"] / peak if peak else None
        rows.append({"batch": batch, "context": context, "step_ms": round(step * 1000, 3),
                     "bytes_read_mb": round(need["total"] / 1e6, 1), "bound_ms": None if bound is None else
                     round(bound * 1000, 4), "step_over_bound": None if bound is None else round(step / bound, 2)})
        log.info("decode step batch %d context %d: %.2f ms (bound %s ms)", batch, context, step * 1000,
                 rows[-1]["bound_ms"])
        del cache, out
    del model, base
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the servers of the next step need the memory
    return {"peak_bandwidth_bytes_per_s": peak, "nf4_weight_bytes_per_param": round(NF4_WEIGHT_BYTES, 4),
            "params_b": round((shape.layers * shape.layer_linear_params + 2 * shape.lm_head_params) / 1e9, 3),
            "points": rows}


def step_figures(args, model_dir: Path, out_json: Path, deadline: float) -> dict:
    stem = out_json.with_name("gpu_engine_bench")
    command = [sys.executable, "-m", "loadtest.engine_bench", "--model", str(model_dir), "--device", args.device,
               "--data-dir", str(args.data_dir), "--out", str(stem), "--engines", *args.engines,
               "--figures", *args.figures, *args.bench_args]
    log.info("figures: %s", " ".join(command))
    timeout = max(30.0, deadline - time.monotonic())
    # a session of its own: at the deadline the benchmark and the gateway servers it started go together
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        returncode: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        returncode = "timeout"
    source = stem.with_suffix(".json") if stem.with_suffix(".json").is_file() else stem.with_suffix(".partial.json")
    measured = json.loads(source.read_text()) if source.is_file() else {}
    return {"returncode": returncode, "complete": source == stem.with_suffix(".json"),
            "figures": measured.get("figures", []), "traces": {e: t.get("summary", t) for e, t in
                                                               measured.get("traces", {}).items()},
            "output_tail": output[-4000:]}


def figure3_against_bound(figures: list[dict], config: dict, peak: float | None, *, batch: int = 8,
                          element_bytes: int = 2) -> list[dict]:
    """Figure 3's decode time per token through the gateway (``batch`` streams) against the
    bandwidth bound at the same batch and context."""
    from loadtest import engine_figures as ef

    if not peak:
        return []
    shape = ef.ModelShape.from_config(config)
    rows = []
    for fig in figures:
        if fig.get("key") != "context_growth" or fig.get("value") is None:
            continue
        for which in ("short", "long"):
            step, context = fig.get(f"{which}_s"), fig["attention"][f"{which}_context"]
            need = ef.decode_step_bytes(shape, batch=batch, context=context, weight_bytes_per_param=NF4_WEIGHT_BYTES,
                                        head_bytes_per_param=element_bytes, kv_element_bytes=element_bytes)
            bound_ms = need["total"] / peak * 1000
            if step:
                rows.append({"engine": fig["engine"], "batch": batch, "context": context,
                             "gateway_step_ms": round(step * 1000, 3), "bound_ms": round(bound_ms, 4),
                             "step_over_bound": round(step * 1000 / bound_ms, 1)})
    return rows


def step_verdict(step: dict) -> str:
    if "error" in step:
        return "error: " + step["error"]
    if step.get("skipped"):
        return "skipped"
    return "FAILED" if step.get("passed") is False else "ok"


def peak_bandwidth(args) -> float | None:
    import torch

    if args.peak_bandwidth:
        return args.peak_bandwidth
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- command line -----------------------------------------------------------------------------------------

SMOKE_BENCH = ["--quick", "--repeats", "1", "--short-streams", "2", "--long-prompt", "64", "--prefix-tokens", "64",
               "--context-streams", "2", "--long-context", "64", "--mixed-adapters", "8", "--trace-adapters", "8",
               "--trace-requests", "4", "--kv-streams", "3", "--kv-samples", "2", "--decode-tokens", "3"]
GPU_BENCH = ["--repeats", "1", "--decode-tokens", "64", "--long-output", "64", "--kv-cache-tokens", "262144",
             "--trace-rate", "8", "--trace-requests", "96",
             "--trace-adapters", "64", "--stream-cap", "2048"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model and sizes on CPU: checks this script")
    p.add_argument("--out", type=Path, help="JSON file (default: $OUT/gpu_check.json, else loadtest/results/)")
    p.add_argument("--budget-s", type=float, default=480, help="the figures step stops by then (whole run)")
    p.add_argument("--steps", nargs="+", default=["env", "pytest_gpu", "lora_kernel", "nf4_equivalence", "model",
                                                  "decode_bound", "figures"])
    p.add_argument("--engines", nargs="+", default=["padded", "paged"])
    p.add_argument("--figures", nargs="+", default=["1", "2", "3", "4", "5", "6"])
    p.add_argument("--peak-bandwidth", type=float, help="bytes/s (default: from the device name)")
    p.add_argument("--equivalence-tokens", type=int, default=8)
    p.add_argument("--bound-steps", type=int, default=20)
    p.add_argument("--data-dir", type=Path, help="model files (default: a folder beside the JSON)")
    p.add_argument("bench_args", nargs="*", help="more loadtest.engine_bench flags (after --)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.cpu_smoke else "cuda"
    args.shape = SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE
    args.bound_points = [(1, 64), (8, 64), (8, 1536)] if args.cpu_smoke else [(1, 64), (8, 64), (8, 1536),
                                                                               (32, 1024)]
    args.bench_args = (SMOKE_BENCH if args.cpu_smoke else GPU_BENCH) + args.bench_args
    if args.out is None:
        root = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "loadtest" / "results"
        args.out = root / ("gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json")
    return args


def main(argv: list[str] | None = None) -> dict:
    from loadtest.harness import quiet_logging

    args = parse_args(argv)
    quiet_logging()
    logging.getLogger("loadtest").setLevel(logging.INFO)
    started = time.monotonic()
    deadline = started + args.budget_s
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.data_dir = args.data_dir or work / "data"
    result: dict = {"cpu_smoke": args.cpu_smoke, "steps": {}}

    def save() -> None:
        result["seconds"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(result, indent=2, default=str))

    def run(name: str, fn) -> dict | None:
        if name not in args.steps:
            return None
        log.info("step %s", name)
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - fail soft: the next step still runs
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            log.error("step %s failed: %s", name, value["error"])
        value["seconds"] = round(time.monotonic() - t0, 1)
        result["steps"][name] = value
        save()
        return value

    run("env", lambda: step_env(args))
    run("pytest_gpu", lambda: step_pytest_gpu(args))
    run("lora_kernel", lambda: step_lora_kernel(args))
    run("nf4_equivalence", lambda: step_nf4_equivalence(args, work))
    model_dir: Path | None = None

    def prepare() -> dict:
        nonlocal model_dir
        from gateway.base_model import materialize_dummy

        folder = build_model_folder(work / "bench-model", args.shape, with_weights=False)
        model_dir = materialize_dummy(str(folder), args.data_dir)  # random weights, written once
        return {"model_dir": str(model_dir), "config": json.loads((model_dir / "config.json").read_text())}

    run("model", prepare)
    bound = run("decode_bound", lambda: step_decode_bound(args, model_dir)) if model_dir else None
    figures = run("figures", lambda: step_figures(args, model_dir, args.out, deadline)) if model_dir else None
    if figures and bound and "points" in bound:
        result["figure3_vs_bandwidth_bound"] = figure3_against_bound(
            figures.get("figures", []), result["steps"]["model"]["config"], bound["peak_bandwidth_bytes_per_s"])
    save()
    summary = {name: step_verdict(step) for name, step in result["steps"].items()}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    for fig in (figures or {}).get("figures", []):
        from loadtest.engine_figures import format_figure

        sys.stdout.write(format_figure(fig) + "\n")
    for row in (bound or {}).get("points", []):
        sys.stdout.write(f"decode step batch {row['batch']} context {row['context']}: {row['step_ms']} ms; "
                         f"bandwidth bound {row['bound_ms']} ms (x{row['step_over_bound']})\n")
    for row in result.get("figure3_vs_bandwidth_bound", []):
        sys.stdout.write(f"[{row['engine']}] gateway decode step, {row['batch']} streams at {row['context']} tokens: "
                         f"{row['gateway_step_ms']} ms; bandwidth bound {row['bound_ms']} ms "
                         f"(x{row['step_over_bound']})\n")
    sys.stdout.write(f"wrote {args.out} ({result['seconds']} s)\n")
    return result


if __name__ == "__main__":
    main()
