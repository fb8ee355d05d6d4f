"""What each class of tile costs on each backend: the data ``auto``'s rules (``ringpack/backends/auto.py``) come from.

Legend: a *tile* is ``q_len`` query rows against ``k_len`` keys, ``full`` (every pair visible), ``causal`` (square,
plain causal) or a window band; a *pack* is a one-rank plan of many documents, run as the ring runs a rank's local
step (``ring.forward``/``ring.backward`` on a one-rank ring: the backend's calls plus the accumulator). Two groups:

- ``ring``: the tiles of one causal document of ``2N`` tokens on 1 and 2 ranks: each rank runs a causal ``N x N``
  tile and a full ``N/2 x N`` (or ``N x N/2``) one, one GPU the causal ``2N x 2N`` tile. The rank's time over half
  the whole batch's is what the local kernels cost the ring before any exchange::

      kernel share = (t(causal N) + t(full N/2 x N)) / t(causal 2N)     (0.5 when the kernel scales perfectly)

- ``local``: 32k tokens as packs of the classes a ring meets (one long document, 8k, 2k and 512-token documents,
  the long-tail mix in one call, a full 4k x 8k step tile, a sliding window, softcap).

Each row also has the first call's time (forward + backward): compiling kernels (FlashAttention-4: the first call
of each class) and building cuDNN graphs happen there, not in the timed calls.

    python benchmarks/tile_kernels.py --out tiles.json                      # on a GPU machine; .json and .md
    python benchmarks/tile_kernels.py --dry-run --out /tmp/tiles.json       # CPU, reference kernel, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mixes
import torch
from harness import Runner, report_header, script_environment, script_runner

from ringpack import accumulate, cli, ring, schedule
from ringpack.backends import select_backend
from ringpack.comm import Ring
from ringpack.packing import lengths_to_cu_seqlens
from ringpack.plan import Plan, make_plan
from ringpack.schedule import Tile, Wave


def tile(q_len: int, k_len: int, causal: bool) -> Tile:
    """A one-tile wave's tile at row 0 of the queries and keys: full, or causal (square only)."""
    if causal and q_len != k_len:
        raise ValueError(f"a causal tile here is square, got {q_len} x {k_len}")
    return schedule.tile(0, q_len, 0, k_len, 1 - q_len, 0 if causal else k_len - 1)


def _tile_runs(r: Runner, backend, t: Tile, scale: float):
    """Forward and backward closures of the one-tile wave ``t`` (the backward against the tile's own out/lse)."""
    q, k, v = r.qkv(t.q_len, False)[0], *r.qkv(t.k_len, False)[1:]
    dout = torch.randn(q.shape, device=r.device, dtype=r.dtype, generator=r.gen)
    wave = Wave.of((t,))
    acc = accumulate.Softmax(q, torch.float32 if r.dtype != torch.float64 else r.dtype)
    for piece in backend.forward(q, k, v, wave, scale=scale, softcap=0.0):
        acc.add(*piece)
    out, lse = acc.result()
    return (lambda: list(backend.forward(q, k, v, wave, scale=scale, softcap=0.0)),
            lambda: list(backend.backward(dout, q, k, v, out, lse, None, wave, scale=scale, softcap=0.0)))


def _pack_runs(r: Runner, backend, plan: Plan, scale: float, softcap: float):
    """Forward and backward closures of a one-rank plan, as the ring runs a rank's local step."""
    n = plan.total_tokens
    q, k, v = r.qkv(n, False)
    dout = torch.randn(q.shape, device=r.device, dtype=r.dtype, generator=r.gen)
    local = Ring.local()
    out, lse = ring.forward(q, k, v, plan, local, backend, scale, softcap)
    return (lambda: ring.forward(q, k, v, plan, local, backend, scale, softcap),
            lambda: ring.backward(dout, None, q, k, v, out, lse, plan, local, backend, scale, softcap))


def measure(r: Runner, backend, case: dict) -> dict:
    """First call (compiles) and seconds per forward and per backward of one case; TFLOP/s from visible pairs."""
    scale = r.cfg.shape.head_dim ** -0.5
    start = time.perf_counter()
    if "tile" in case:
        fwd, bwd = _tile_runs(r, backend, case["tile"], scale)
        pairs = case["tile"].pairs
    else:
        fwd, bwd = _pack_runs(r, backend, case["plan"], scale, case["softcap"])
        pairs = case["plan"].work(0)
    bwd()
    r.sync()
    first = time.perf_counter() - start
    fwd_s, bwd_s = r.timed(fwd, collective=False), r.timed(bwd, collective=False)
    flops = 4 * pairs * r.cfg.shape.heads * r.cfg.shape.head_dim
    return {"first_call_s": first, "fwd_s": fwd_s, "bwd_s": bwd_s, "fwd_tflops": flops / fwd_s / 1e12,
            "bwd_tflops": 2.5 * flops / bwd_s / 1e12, "pairs": pairs}


def ring_cases(n: int) -> list[dict]:
    """The tiles of one document of ``2n`` tokens on 1 and on 2 ranks."""
    return [{"group": "ring", "n": n, "case": role, "tile": tile(q, k, causal), "mask": "causal" if causal else "full",
             "shape": f"{q} x {k}"}
            for role, q, k, causal in (("one GPU: whole batch", 2 * n, 2 * n, True), ("rank: local step", n, n, True),
                                       ("rank 0: remote step", n // 2, n, False),
                                       ("rank 1: remote step", n, n // 2, False))]


def local_cases(total: int) -> list[dict]:
    """Packs of ``total`` tokens of the classes a ring's local step meets."""
    def pack(name, lengths, causal=True, window=(-1, -1), softcap=0.0, mask=None):
        plan = make_plan(lengths_to_cu_seqlens(lengths), 1, strategy="contiguous", causal=causal, window_size=window)
        return {"group": "local", "n": total, "case": name, "plan": plan, "softcap": softcap,
                "mask": mask or ("causal" if causal else "full"), "shape": f"{len(lengths)} docs"}

    quarter = max(1, total // 8)
    return [pack("one document", [total]),
            pack("8k documents", mixes.uniform(total, min(8192, total))),
            pack("2k documents", mixes.uniform(total, min(2048, total))),
            pack("512-token documents", mixes.uniform(total, min(512, total))),
            pack("long-tail mix", mixes.long_tail(total, seed=0)),
            {"group": "local", "n": total, "case": "step tile 4k x 8k", "tile": tile(quarter, 2 * quarter, False),
             "mask": "full", "shape": f"{quarter} x {2 * quarter}"},
            pack("sliding window", [total], window=(total // 8, 0), mask=f"window ({total // 8}, 0)"),
            pack("softcap 50", [total], softcap=50.0, mask="causal, softcap 50")]


def markdown(rows: list[dict], env: dict) -> str:
    lines = report_header("Each class of tile on each backend (the data behind auto's rules)", env, [
        f"- shape {env['shape']}; FLOPs forward 4*pairs*H*D, backward 2.5x; a tile's backward runs against its",
        "  own out/lse, a pack runs as a rank's local step (the backend's calls and the accumulator)",
        "- first call: forward + backward of the first call (kernel compilation, cuDNN graph building)",
        "- kernel share = (local + slower remote tile) / whole batch; 0.5 is perfect scaling"])
    lines += ["| group | N | case | shape | mask | backend | first call s | fwd ms | bwd ms | fwd TFLOP/s | "
              "bwd TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        head = f"| {x['group']} | {x['n']} | {x['case']} | {x['shape']} | {x['mask']} | {x['backend']} |"
        if "error" in x:
            lines.append(f"{head} error: {x['error']} | | | | |")
            continue
        lines.append(f"{head} {x['first_call_s']:.2f} | {1e3 * x['fwd_s']:.3f} | {1e3 * x['bwd_s']:.3f} | "
                     f"{x['fwd_tflops']:.0f} | {x['bwd_tflops']:.0f} |")
    lines += ["", "| backend | N | fwd kernel share | fwd+bwd kernel share |", "|---|---|---|---|"]
    for s in shares(rows):
        lines.append(f"| {s['backend']} | {s['n']} | {s['fwd']:.3f} | {s['fwd+bwd']:.3f} |")
    return "\n".join(lines) + "\n"


def shares(rows: list[dict]) -> list[dict]:
    """Per (backend, n) of the ring tiles: the slower rank's tiles over the whole batch, fwd and fwd+bwd."""
    out = []
    ring_rows = [x for x in rows if x["group"] == "ring" and "error" not in x]
    for key in dict.fromkeys((x["backend"], x["n"]) for x in ring_rows):
        got = {x["case"]: x for x in ring_rows if (x["backend"], x["n"]) == key}
        if len(got) < 4:
            continue
        share = {}
        for name, keys in (("fwd", ("fwd_s",)), ("fwd+bwd", ("fwd_s", "bwd_s"))):
            seconds = {role: sum(x[k] for k in keys) for role, x in got.items()}
            share[name] = (seconds["rank: local step"] + max(seconds["rank 0: remote step"],
                                                             seconds["rank 1: remote step"])) / seconds[
                "one GPU: whole batch"]
        out.append({"backend": key[0], "n": key[1], **share})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-rank", type=cli.int_list("integers >= 2 separated by commas", minimum=2),
                   default=(8192, 32768), help="N values of the ring tiles (default %(default)s)")
    p.add_argument("--local-tokens", type=int, default=32768, help="tokens of the local packs (default %(default)s)")
    p.add_argument("--groups", default="ring,local", help="which groups to run (default %(default)s)")
    p.add_argument("--backends", default="cudnn,flash_attn_4,torch_flash,auto",
                   help="comma separated backend names (default %(default)s)")
    p.add_argument("--out", default="tile_kernels.json", help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--dry-run", action="store_true", help="CPU, reference kernel, tiny sizes (checks the script)")
    args = p.parse_args(argv)
    r = script_runner(args.dry_run, min_round_s=0.05, out=args.out)
    ns = [64] if args.dry_run else list(args.tokens_per_rank)
    groups = args.groups.split(",")
    cases = [c for n in ns for c in ring_cases(n)] if "ring" in groups else []
    cases += local_cases(128 if args.dry_run else args.local_tokens) if "local" in groups else []
    rows = []
    for name in ["reference"] if args.dry_run else args.backends.split(","):
        for case in cases:
            head = {k: case[k] for k in ("group", "n", "case", "shape", "mask")} | {"backend": name}
            try:
                plan = case.get("plan")
                spec = r.spec(causal=plan.causal if plan else True, softcap=case.get("softcap", 0.0) > 0,
                              window=plan is not None and plan.window_size != (-1, -1))
                rows.append({**head, **measure(r, select_backend(name, spec), case)})
            except (RuntimeError, ValueError) as e:  # recorded; the other cases still run
                rows.append({**head, "error": f"{type(e).__name__}: {e}"[:200]})
            print(f"tile_kernels: {rows[-1]}", flush=True)
    env = script_environment("benchmarks/tile_kernels.py", sys.argv[1:] if argv is None else argv, r.device,
                             shape=vars(r.cfg.shape))
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows, "shares": shares(rows)}, f, indent=1)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
