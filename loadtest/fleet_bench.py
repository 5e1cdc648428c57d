"""The fleet on Ray Serve against the S-LoRA workload: what adapter-affinity routing buys.

Two replicas with M device slots each and 3·M adapters of skewed popularity (``loadtest.trace``).
One trace, replayed through the ingress (open loop, Poisson arrivals):
- with multiplexed routing (Serve's model multiplexing on the adapter id) and with plain routing
  (Serve's default load-based choice, no affinity): cold adapter loads per 1,000 requests (device
  loads, from each replica's ``gateway_adapter_loads{source="cpu"}``) and latency p50/p99;
- throughput: the same requests sent all at once to 2 replicas and to 1 replica;
- the Serve hop: sequential ``GET /v1/models`` (no model work) and one-token requests to 1 replica
  through the ingress, and to the same gateway in one process (``adapter-gateway serve``) — the
  difference is the hop's cost.
Each replica (and the one process) runs torch on ``--threads`` threads: a replica stands for one
device, so 2 replicas ÷ 1 replica reads as 2 devices ÷ 1.

End-of-sequence tokens are pushed down with ``logit_bias`` so every request generates exactly its
drawn length. Writes JSON and a PNG.

Small run:  python -m loadtest.fleet_bench --slots 2 --requests 60 --rate 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gateway.settings import EMBEDDED_MODEL, Settings
from loadtest.bench_adapters import make_adapter_set
from loadtest.http_load import WordPrompts, stream
from loadtest.server import free_port, running_gateway, stop_servers_on_sigterm
from loadtest.trace import TraceRequest, make_trace, percentile, summarize

log = logging.getLogger("loadtest.fleet_bench")
ADMIN_KEY = "fleet-bench-admin-key-0123456789"
LOADS = 'gateway_adapter_loads_total{source="cpu"}'  # into a device slot: a cold load on that replica
DISK_LOADS = 'gateway_adapter_loads_total{source="disk"}'


def counters(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The exact samples ``names`` (name with labels, as Prometheus prints them) of a scrape."""
    found = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key in found:
            found[key] = float(value)
    return found


def two_free_ports() -> int:
    """A port p with p+1 free too (each replica serves its metrics on base port + rank)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def end_token_bias(model_dir: Path) -> dict[str, float]:
    from transformers import AutoTokenizer, GenerationConfig

    ids: set[int] = set()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update([eos] if isinstance(eos, int) else eos or [])
    except OSError:
        pass
    return {str(i): -100.0 for i in sorted(ids)}


class Fleet:
    """One deployment of the fleet on the running Ray cluster."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = ""

    def __enter__(self) -> Fleet:
        from ray import serve

        from gateway.fleet.app import build_fleet

        serve.run(build_fleet(self.settings), name="gateway", route_prefix="/")
        self.url = f"http://127.0.0.1:{self.settings.port}"
        return self

    def __exit__(self, *exc) -> None:
        from ray import serve

        serve.delete("gateway")

    def scrape(self) -> dict[str, float]:
        """Device and disk loads summed over the replicas (their own metrics ports)."""
        total = dict.fromkeys((LOADS, DISK_LOADS), 0.0)
        for rank in range(self.settings.replicas):
            text = httpx.get(f"http://127.0.0.1:{self.settings.replica_metrics_port + rank}/metrics", timeout=30).text
            for key, value in counters(text, (LOADS, DISK_LOADS)).items():
                total[key] += value
        return total


async def replay(url: str, trace: list[TraceRequest], models: list[str], prompts: list[str], bias: dict,
                 *, all_at_once: bool = False) -> tuple[list, float]:
    """Every request at its arrival time (open loop), or all at once; returns timings and wall time."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        started = time.perf_counter()
        tasks = []
        for request, model, prompt in zip(trace, models, prompts, strict=True):
            delay = 0 if all_at_once else started + request.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream(client, model, request.output_tokens, prompt=prompt,
                                                    extra_body={"logit_bias": bias})))
        timings = await asyncio.gather(*tasks)
        return list(timings), time.perf_counter() - started


async def hop_latencies(url: str, model: str, prompt: str, bias: dict, count: int) -> dict[str, list[float]]:
    """Sequential requests, after two warm-ups each: ``GET /v1/models`` (no model work: the hop
    alone shows) and one-token completions on an adapter."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        out: dict[str, list[float]] = {"models": [], "one_token": []}
        for i in range(count + 2):
            started = time.perf_counter()
            (await client.get("/v1/models")).raise_for_status()
            if i >= 2:
                out["models"].append(time.perf_counter() - started)
        for i in range(count + 2):
            result = await stream(client, model, 1, prompt=prompt, extra_body={"logit_bias": bias})
            if i >= 2:
                out["one_token"].append(result.latency_s)
        return out


def fleet_settings(args, model_dir: Path, data_dir: Path, adapters_dir: Path, *, replicas: int, routing: str,
                   port: int, metrics_port: int) -> Settings:
    return Settings(model=str(model_dir), served_model_name="base", device="cpu", data_dir=data_dir,
                    adapters_dir=adapters_dir, admin_key=ADMIN_KEY, replicas=replicas, fleet_routing=routing,
                    max_device_adapters=args.slots, max_cpu_adapters=3 * args.slots, max_batch_size=args.max_batch_size,
                    replica_num_cpus=args.cpus / replicas - 0.05, replica_metrics_port=metrics_port, port=port,
                    quantization=args.quantization)


def run(args) -> dict:
    import ray
    from ray import serve

    n_adapters = 3 * args.slots
    trace = make_trace(n_adapters=n_adapters, alpha=args.alpha, rate=args.rate, requests=args.requests,
                       input_range=tuple(args.input), output_range=tuple(args.output), seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    if args.model == EMBEDDED_MODEL:
        from gateway.base_model import materialize_embedded

        model_dir = materialize_embedded(args.data_dir)
    else:
        model_dir = Path(args.model)
    folders = make_adapter_set(model_dir, root / "adapters", ["lora16"] * n_adapters, "fleet", seed=args.seed)
    ids = [folder.name for folder in folders]
    words = WordPrompts.from_model_dir(model_dir, seed=args.seed)
    prompts = [words.make(r.input_tokens) for r in trace]
    models = [ids[r.adapter] for r in trace]
    bias = end_token_bias(model_dir)
    http_port = free_port()
    result: dict = {"routing": {}, "throughput": {}, "hop": {}}
    # one torch thread per replica (a replica stands for one device), and the same in the direct process
    ray.init(num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                       "OMP_NUM_THREADS": str(args.threads)}})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        for routing in ("multiplexed", "plain"):
            settings = fleet_settings(args, model_dir, root / f"data-{routing}", root / "adapters", replicas=2,
                                      routing=routing, port=http_port, metrics_port=two_free_ports())
            with Fleet(settings) as fleet:
                before = fleet.scrape()
                timings, wall = asyncio.run(replay(fleet.url, trace, models, prompts, bias))
                after = fleet.scrape()
                loads = after[LOADS] - before[LOADS]
                result["routing"][routing] = {
                    "summary": summarize(timings, wall),
                    "cold_loads": loads, "cold_loads_per_1000": round(1000 * loads / len(trace), 1),
                    "disk_loads": after[DISK_LOADS] - before[DISK_LOADS],
                    "latencies_s": [round(t.latency_s, 4) for t in timings]}
                log.info("%s: %s", routing, {k: v for k, v in result["routing"][routing].items() if k != "latencies_s"})
                if routing == "multiplexed":
                    timings, wall = asyncio.run(replay(fleet.url, trace, models, prompts, bias, all_at_once=True))
                    result["throughput"]["2 replicas"] = summarize(timings, wall)
        settings = fleet_settings(args, model_dir, root / "data-one", root / "adapters", replicas=1,
                                  routing="multiplexed", port=http_port, metrics_port=two_free_ports())
        with Fleet(settings) as fleet:
            timings, wall = asyncio.run(replay(fleet.url, trace, models, prompts, bias, all_at_once=True))
            result["throughput"]["1 replica"] = summarize(timings, wall)
            result["hop"]["through the ingress"] = asyncio.run(
                hop_latencies(fleet.url, ids[0], prompts[0], bias, args.hop_requests))
    finally:
        serve.shutdown()
        ray.shutdown()
    env = {"GATEWAY_MODEL": str(model_dir), "GATEWAY_SERVED_MODEL_NAME": "base", "GATEWAY_DEVICE": "cpu",
           "GATEWAY_DATA_DIR": str(root / "data-direct"), "GATEWAY_ADAPTERS_DIR": str(root / "adapters"),
           "GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_MAX_DEVICE_ADAPTERS": str(args.slots),
           "GATEWAY_QUANTIZATION": args.quantization, "OMP_NUM_THREADS": str(args.threads)}
    with running_gateway(env, root / "direct.log") as url:
        result["hop"]["direct"] = asyncio.run(hop_latencies(url, ids[0], prompts[0], bias, args.hop_requests))
    return result


def ratios(result: dict) -> dict:
    mux, plain = result["routing"]["multiplexed"], result["routing"]["plain"]
    two, one = result["throughput"]["2 replicas"], result["throughput"]["1 replica"]
    through, direct = result["hop"]["through the ingress"], result["hop"]["direct"]

    def div(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "cold_loads_multiplexed_over_plain": div(mux["cold_loads"], plain["cold_loads"]),
        "latency_p50_multiplexed_over_plain": div(mux["summary"]["latency_p50_s"], plain["summary"]["latency_p50_s"]),
        "latency_p99_multiplexed_over_plain": div(mux["summary"]["latency_p99_s"], plain["summary"]["latency_p99_s"]),
        "throughput_2_over_1_replicas": div(two["tokens_per_s"], one["tokens_per_s"]),
        "serve_hop_ms_p50": round(1000 * (percentile(through["models"], 50) - percentile(direct["models"], 50)), 2),
        **{f"{kind}_p50_ms": {"through the ingress": round(1000 * percentile(through[kind], 50), 2),
                              "direct": round(1000 * percentile(direct[kind], 50), 2)}
           for kind in ("models", "one_token")},
    }


def plot(result: dict, path: Path) -> None:
    from loadtest.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    routing = result["routing"]
    names = list(routing)
    axes[0].bar(names, [routing[n]["cold_loads_per_1000"] for n in names], color=["tab:blue", "tab:gray"])
    axes[0].set_title("cold adapter loads per 1,000 requests")
    for name in names:
        latencies = sorted(routing[name]["latencies_s"])
        axes[1].plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], label=name)
    axes[1].set_xlabel("latency (s)")
    axes[1].set_title("latency CDF, 2 replicas")
    axes[1].legend()
    through = result["throughput"]
    axes[2].bar(list(through), [through[k]["tokens_per_s"] for k in through], color=["tab:blue", "tab:orange"])
    axes[2].set_title("throughput, all requests at once (tokens/s)")
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model folder (default: embedded SmolLM2)")
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--data-dir", type=Path, default=Path("./data"), help="where the embedded model lives")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/fleet"), help="JSON/PNG path stem")
    parser.add_argument("--slots", type=int, default=2, help="M: device slots per replica (3·M adapters)")
    parser.add_argument("--alpha", type=float, default=0.5, help="popularity skew (1 uniform, smaller skewed)")
    parser.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--input", type=int, nargs=2, default=[16, 48], metavar=("MIN", "MAX"))
    parser.add_argument("--output", type=int, nargs=2, default=[4, 12], metavar=("MIN", "MAX"))
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs the replicas share (Ray logical CPUs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (and direct)")
    parser.add_argument("--hop-requests", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_servers_on_sigterm()
    result = run(args)
    result["ratios"] = ratios(result)
    result["title"] = (f"fleet on Ray Serve, CPU: 2 replicas x {args.slots} slots, {3 * args.slots} LoRA adapters, "
                       f"alpha {args.alpha}, {args.rate} req/s, {args.requests} requests, {args.threads} thread(s) per replica")
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    summary = {"title": result["title"], "ratios": result["ratios"],
               **{f"routing {k}": {kk: vv for kk, vv in v.items() if kk != "latencies_s"}
                  for k, v in result["routing"].items()},
               "throughput": result["throughput"]}
    sys.stdout.write(json.dumps(summary, indent=2) + f"\nwrote {args.out.with_suffix('.json')} and .png\n")


if __name__ == "__main__":
    main()
