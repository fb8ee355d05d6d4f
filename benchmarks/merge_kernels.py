"""The fused merge of a partial ``(out, lse)`` into the accumulators: the CUDA extension's, Triton's and torch's.

Legend: ``N`` rows, Llama-3-8B attention (32 heads, head dim 128), partials in bf16; the accumulator in fp32 (a row
reached by more than two partials) or bf16 (the round-once rows). Bandwidth counts what a fused kernel must move:
the partial and the accumulator read, the accumulator written, the two lse read and one written.

    python benchmarks/merge_kernels.py --out merge.json      # on a GPU machine; .json and .md
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from harness import report_header, script_environment, script_runner

from ringpack import _ext, _triton, cli, merge

KERNELS = ("extension", "triton", "torch")


def run(kernel: str, acc, lacc, out, lse) -> None:
    if kernel == "extension":
        assert _ext.merge_(acc, lacc, out, lse)
    elif kernel == "triton":
        assert _triton.merge_(acc, lacc, out, lse)
    else:
        available, _triton.available = _triton.available, lambda t: False
        built, _ext._C = _ext._C, None
        try:
            merge.merge_(acc, lacc, out, lse)
        finally:
            _triton.available, _ext._C = available, built


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=cli.int_list("integers >= 1 separated by commas", minimum=1), default=(8192, 32768),
                   help="N values (default %(default)s)")
    p.add_argument("--out", default="merge_kernels.json", help="JSON file; the markdown table goes beside it (.md)")
    args = p.parse_args(argv)
    r = script_runner(False, min_round_s=0.05, out=args.out)
    shape, rows = r.cfg.shape, []
    for n in args.rows:
        for store in (torch.float32, torch.bfloat16):
            out = torch.randn(n, shape.heads, shape.head_dim, device=r.device, dtype=torch.bfloat16)
            lse = torch.randn(shape.heads, n, device=r.device)
            acc, lacc = out.to(store), torch.randn(shape.heads, n, device=r.device)
            moved = out.numel() * (out.element_size() + 2 * acc.element_size()) + 3 * lse.numel() * 4
            for kernel in KERNELS:
                head = {"rows": n, "accumulator": str(store).removeprefix("torch."), "kernel": kernel}
                try:
                    seconds = r.timed(lambda k=kernel, a=(acc, lacc, out, lse): run(k, *a), collective=False)
                    rows.append({**head, "us": 1e6 * seconds, "gb_per_s": moved / seconds / 1e9})
                except (AssertionError, RuntimeError, ValueError) as e:  # not built, no Triton: recorded
                    rows.append({**head, "error": f"{type(e).__name__}: {e}"[:120] or "not available"})
                print(f"merge_kernels: {rows[-1]}", flush=True)
    env = script_environment("benchmarks/merge_kernels.py", sys.argv[1:] if argv is None else argv, r.device,
                             shape=vars(shape))
    lines = report_header("The fused merge: extension, Triton, torch", env, [
        "- partial bf16 [N, 32, 128], lse fp32; bandwidth counts partial + accumulator read, accumulator written"])
    lines += ["| rows | accumulator | kernel | us | GB/s |", "|---|---|---|---|---|"]
    for x in rows:
        cells = f"{x['us']:.1f} | {x['gb_per_s']:.0f}" if "us" in x else f"{x['error']} |"
        lines.append(f"| {x['rows']} | {x['accumulator']} | {x['kernel']} | {cells} |")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
