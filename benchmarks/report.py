"""The results of ``bench.py``: ``bench.json``, a markdown table per section and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from harness import Config, environment


def write_results(results: dict, cfg: Config, world: int) -> None:
    """``bench.json``, ``bench.md`` and PNG plots (when matplotlib is there) in ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results["environment"] = environment(cfg, world)
    _derive(results)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text(markdown(results))
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    plot(results, out)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key, "")
            cells.append(format(value, fmt) if isinstance(value, (int, float)) and fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    sec = results["sections"]
    lines = ["# ringpack benchmarks", "",
             f"- device: {env.get('device', 'cpu')} x{env['world']}; torch {env['torch']}, CUDA {env['cuda']}, "
             f"NCCL {env.get('nccl', '-')}, cuDNN {env.get('cudnn', '-')}",
             f"- date (UTC): {env['date_utc']}; command: `{env['command']}`",
             f"- shape: {env['config']['shape']}, causal; FLOPs: forward 4*pairs*H*D, backward 2.5x", ""]
    if "kernel" in sec:
        lines += ["## Local kernel throughput (1 GPU, one-rank plan)", ""]
        lines += _table(sec["kernel"], [("mix", "mix", ""), ("backend", "backend", ""), ("pass", "pass", ""),
                                        ("tokens", "tokens", "d"), ("seconds", "seconds", ".4f"),
                                        ("TFLOP/s", "tflops", ".0f"), ("error", "error", "")])
        lines.append("")
    if "ring" in sec:
        lines += ["## Ring efficiency T1 / (P x T)", ""]
        lines += _table(sec["ring"], [("backend", "backend", ""), ("mix", "mix", ""),
                                      ("tokens/GPU", "tokens_per_gpu", "d"), ("docs", "docs", "d"),
                                      ("pass", "pass", ""), ("T1 s", "t1_s", ".4f"),
                                      ("ring s", "ring_s", ".4f"), ("efficiency", "efficiency", ".3f"),
                                      ("TFLOP/s/GPU", "ring_tflops_per_gpu", ".0f")])
        lines.append("")
    if "overlap" in sec:
        lines += ["## Communication hidden (one document, fwd+bwd)", ""]
        lines += _table(sec["overlap"], [("backend", "backend", ""), ("tokens/GPU", "tokens_per_gpu", "d"),
                                         ("ring s", "ring_s", ".4f"), ("kernel removed s", "kernel_removed_s", ".4f"),
                                         ("exchange removed s", "exchange_removed_s", ".4f"),
                                         ("exposed comm s", "exposed_comm_s", ".4f"),
                                         ("hidden", "hidden_fraction", ".3f")])
        lines.append("")
    if "memory" in sec:
        lines += ["## Peak memory per GPU (one document, fwd+bwd)", ""]
        lines += _table(sec["memory"], [("backend", "backend", ""), ("tokens", "tokens", "d"),
                                        ("tokens/GPU", "tokens_per_gpu", "d"), ("fwd+bwd s", "seconds_fwd_bwd", ".3f"),
                                        ("peak GiB", "peak_gib", ".2f"), ("q,k,v,out,grads GiB", "base_gib", ".2f"),
                                        ("ratio", "ratio", ".2f"), ("error", "error", "")])
        lines.append("")
    if "strategy" in sec:
        lines += ["## Strategies (fwd+bwd)", ""]
        lines += _table(sec["strategy"], [("mix", "mix", ""), ("tokens/GPU", "tokens_per_gpu", "d"),
                                          ("strategy", "strategy", ""), ("ring s", "ring_s", ".4f"),
                                          ("fraction of ideal", "fraction_of_ideal", ".3f"),
                                          ("fwd MB sent", "fwd_mb", ".1f"), ("max/mean pairs", "imbalance", ".3f")])
        lines.append("")
    if results.get("errors"):
        lines += ["Errors:", "", *(f"- {e}" for e in results["errors"]), ""]
    if results.get("skipped"):
        lines += ["Skipped (time budget): " + ", ".join(results["skipped"]), ""]
    return "\n".join(lines)


def _derive(results: dict) -> None:
    """Columns computed from the raw numbers, for the tables."""
    for row in results["sections"].get("memory", []):
        row["peak_gib"], row["base_gib"] = row["peak_bytes"] / 2 ** 30, row["qkv_out_grads_bytes"] / 2 ** 30
    for row in results["sections"].get("strategy", []):
        row["fwd_mb"] = row["fwd_bytes_sent"] / 1e6
        row["imbalance"] = row["max_rank_pairs"] / row["mean_rank_pairs"] if row["mean_rank_pairs"] else 1.0


def plot(results: dict, out: Path) -> None:
    import matplotlib.pyplot as plt
    sec = results["sections"]
    if sec.get("kernel"):
        rows = [r for r in sec["kernel"] if "tflops" in r]
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['backend']}\n{r['mix']}\n{r['pass']}" for r in rows]
        ax.bar(range(len(rows)), [r["tflops"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.set_ylabel("TFLOP/s")
        ax.set_title("local kernel throughput (1 GPU)")
        fig.tight_layout()
        fig.savefig(out / "kernel_tflops.png", dpi=120)
        plt.close(fig)
    for key, metric, title, fname in (("ring", "efficiency", "ring efficiency T1/(P*T), fwd+bwd",
                                       "ring_efficiency.png"),
                                      ("strategy", "fraction_of_ideal", "strategies, fwd+bwd: fraction of ideal",
                                       "strategies.png")):
        rows = [r for r in sec.get(key, []) if r.get("pass", "fwd+bwd") == "fwd+bwd"]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            label = f"{r.get('backend')} {r['mix']}" + (f" {r['strategy']}" if "strategy" in r else "")
            series.setdefault(label, []).append((r["tokens_per_gpu"], r[metric]))
        for label, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per GPU")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


