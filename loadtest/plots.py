"""PNG plots of benchmark results (matplotlib, from the ``loadtest`` extra; no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_baselines(result: dict, path: Path) -> None:
    """Throughput of every run, the ratios against their targets, and the cold-start extra."""
    plt = _pyplot()
    runs = result["runs"]
    fig, (ax_runs, ax_ratios, ax_cold) = plt.subplots(1, 3, figsize=(18, 5.5),
                                                      gridspec_kw={"width_ratios": [2.2, 2.6, 0.7]})
    names = list(runs)
    colors = ["tab:gray" if n.startswith("peft") else "tab:blue" for n in names]
    ax_runs.barh(names, [runs[n]["tokens_per_s"] for n in names], color=colors)
    ax_runs.invert_yaxis()
    ax_runs.set_xlabel("generated tokens / s (higher is better)")
    ax_runs.set_title("throughput (blue: this gateway, gray: PEFT)")

    figures = [f for f in result["figures"] if f.get("unit") == "x"]
    labels = [f["name"] for f in figures]
    values = [f["value"] for f in figures]
    ax_ratios.barh(labels, values, color=["tab:green" if f["met"] else "tab:red" for f in figures])
    for i, figure in enumerate(figures):
        ax_ratios.plot([figure["target"]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax_ratios.invert_yaxis()
    ax_ratios.set_xlim(0, 1.1 * max(values + [f["target"] for f in figures], default=1))
    ax_ratios.set_xlabel("ratio (black line: target)")
    ax_ratios.set_title("figures 1-4")

    cold = next((f for f in result["figures"] if f.get("unit") == "ms"), None)
    if cold is not None:
        ax_cold.bar(["cold start\nextra"], [cold["value"]], color="tab:green" if cold["met"] else "tab:red")
        ax_cold.axhline(cold["target"], color="black", linewidth=2)
        ax_cold.set_ylabel("ms (black line: target, lower is better)")
        ax_cold.set_title("figure 5")
    fig.suptitle(result.get("title", "baselines"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_workload(result: dict, path: Path) -> None:
    """Latency and time-to-first-token distributions of each mode of the workload run."""
    plt = _pyplot()
    fig, (ax_latency, ax_ttft) = plt.subplots(1, 2, figsize=(12, 5))
    for mode, data in result["modes"].items():
        for ax, key in ((ax_latency, "latencies_s"), (ax_ttft, "ttfts_s")):
            values = sorted(data[key])
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                        label=f"{mode} ({data['summary']['tokens_per_s']} tok/s)")
    for ax, what in ((ax_latency, "request latency"), (ax_ttft, "time to first token")):
        ax.set_xlabel(f"{what} (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(result.get("title", "workload"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_engine_bench(result: dict, path: Path) -> None:
    """Each figure of the engine benchmark, one bar per engine, against its target; and the latency
    distributions of the workload trace on each engine."""
    plt = _pyplot()
    figures = [f for f in result["figures"] if f["value"] is not None and f["unit"] == "x"]
    traces = {e: t for e, t in result.get("traces", {}).items() if "latencies_s" in t}
    fig, (ax_figs, ax_trace) = plt.subplots(1, 2, figsize=(17, 6), gridspec_kw={"width_ratios": [2.6, 1]})
    colors = {"padded": "tab:gray", "paged": "tab:blue"}
    labels = [f"{f['name'].split(' (')[0]} [{f['engine']}]" for f in figures]
    bar_colors = [colors.get(f["engine"], "tab:purple") if f["met"] is not False else "tab:red" for f in figures]
    ax_figs.barh(labels, [f["value"] for f in figures], color=bar_colors)
    for i, f in enumerate(figures):
        if f["target"] is not None:
            ax_figs.plot([f["target"]] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax_figs.invert_yaxis()
    ax_figs.set_xlabel("ratio (black line: target; red: missed; gray: padded, blue: paged)")
    ax_figs.set_title("figures 1-6")
    for engine, trace in traces.items():
        values = sorted(trace["latencies_s"])
        ax_trace.plot(values, [(i + 1) / len(values) for i in range(len(values))], color=colors.get(engine),
                      label=f"{engine} ({trace['summary']['tokens_per_s']} tok/s)")
    ax_trace.set_xlabel("request latency (s)")
    ax_trace.set_ylabel("fraction of requests")
    ax_trace.set_title("6. S-LoRA trace")
    ax_trace.grid(alpha=0.3)
    if traces:
        ax_trace.legend()
    fig.suptitle(result.get("title", "engine benchmark"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
