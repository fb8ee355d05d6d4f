"""What one tile costs on each backend: the shapes a 2-rank ring of one causal document runs, and the whole batch.

Legend: a *tile* is ``q_len`` query rows against ``k_len`` keys, ``full`` (every pair visible) or ``causal``
(square, plain causal). For one document of ``2N`` tokens on 2 ranks each rank runs a causal ``N x N`` tile
and a full ``N/2 x N`` (or ``N x N/2``) tile; one GPU runs the causal ``2N x 2N`` tile. The rank's time over
half the whole batch's is what the local kernels cost the ring before any exchange::

    kernel share = (t(causal N) + t(full N/2 x N)) / t(causal 2N)     (0.5 when the kernel scales perfectly)

Each tile runs through ``ringpack``'s backend objects (``fwd``, ``bwd`` against its own out/lse), so the
numbers include what the ring pays per call on top of the kernel: slicing, layout views, the lse's layout.

    python benchmarks/tile_kernels.py --out tiles.json      # on a GPU machine; writes .json and .md
    python benchmarks/tile_kernels.py --dry-run --out /tmp/tiles.json  # CPU, reference kernel, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench import Runner, report_header, script_environment, script_runner

from ringpack import schedule
from ringpack.backends import select_backend
from ringpack.schedule import Tile, Wave


def tile(q_len: int, k_len: int, causal: bool) -> Tile:
    """A one-tile wave's tile at row 0 of the queries and keys: full, or causal (square only)."""
    if causal and q_len != k_len:
        raise ValueError(f"a causal tile here is square, got {q_len} x {k_len}")
    lo, hi = 1 - q_len, (0 if causal else k_len - 1)
    return schedule.tile(0, q_len, 0, k_len, lo, hi)


def measure(r: Runner, backend, t: Tile) -> dict:
    """Seconds per forward and per backward (against the tile's own out/lse) of the one-tile wave ``t``."""
    shape = r.cfg.shape
    q, k, v = r.qkv(t.q_len, False)[0], *r.qkv(t.k_len, False)[1:]
    dout = torch.randn(q.shape, device=r.device, dtype=r.dtype, generator=r.gen)
    wave = Wave((t,), (0, t.q_len), (0, t.k_len))
    scale = shape.head_dim ** -0.5
    out, lse = backend.fwd(q, k, v, wave, scale=scale, softcap=0.0)
    lse = lse.float() if r.dtype != torch.float64 else lse
    fwd = r.timed(lambda: backend.fwd(q, k, v, wave, scale=scale, softcap=0.0), collective=False)
    bwd = r.timed(lambda: backend.bwd(dout, q, k, v, out, lse, None, wave, scale=scale, softcap=0.0),
                  collective=False)
    flops = 4 * t.pairs * shape.heads * shape.head_dim
    return {"fwd_s": fwd, "bwd_s": bwd, "fwd_tflops": flops / fwd / 1e12, "bwd_tflops": 2.5 * flops / bwd / 1e12}


def shapes(n: int) -> list[tuple[str, int, int, bool]]:
    """(role, q_len, k_len, causal) of the tiles of one document of ``2n`` tokens on 1 and on 2 ranks."""
    return [("one GPU: whole batch", 2 * n, 2 * n, True), ("rank: local step", n, n, True),
            ("rank 0: remote step", n // 2, n, False), ("rank 1: remote step", n, n // 2, False)]


def markdown(rows: list[dict], env: dict) -> str:
    lines = report_header("One tile per call, per backend (the tiles of one causal document on 1 and 2 ranks)", env, [
        f"- shape {env['shape']}; FLOPs forward 4*pairs*H*D, backward 2.5x; the backward runs against the",
        "  tile's own out/lse",
        "- kernel share = (local + slower remote tile) / whole batch; 0.5 is perfect scaling"])
    lines += ["| backend | N (tokens/rank) | tile | q x k | mask | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if "error" in x:
            lines.append(f"| {x['backend']} | {x['n']} | {x['role']} | {x['q_len']} x {x['k_len']} | "
                         f"{'causal' if x['causal'] else 'full'} | error: {x['error']} | | | |")
            continue
        lines.append(f"| {x['backend']} | {x['n']} | {x['role']} | {x['q_len']} x {x['k_len']} | "
                     f"{'causal' if x['causal'] else 'full'} | {1e3 * x['fwd_s']:.3f} | {1e3 * x['bwd_s']:.3f} | "
                     f"{x['fwd_tflops']:.0f} | {x['bwd_tflops']:.0f} |")
    lines += ["", "| backend | N | fwd kernel share | fwd+bwd kernel share |", "|---|---|---|---|"]
    for s in shares(rows):
        lines.append(f"| {s['backend']} | {s['n']} | {s['fwd']:.3f} | {s['fwd+bwd']:.3f} |")
    return "\n".join(lines) + "\n"


def shares(rows: list[dict]) -> list[dict]:
    """Per (backend, n): the slower rank's tiles over the whole batch, forward and forward+backward."""
    out = []
    for key in dict.fromkeys((x["backend"], x["n"]) for x in rows):
        got = {x["role"]: x for x in rows if (x["backend"], x["n"]) == key and "error" not in x}
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
    p.add_argument("--tokens-per-rank", default="8192,32768", help="N values, comma separated")
    p.add_argument("--backends", default="cudnn,torch_flash", help="comma separated backend names")
    p.add_argument("--out", default="tile_kernels.json", help="JSON file; the markdown table goes beside it (.md)")
    p.add_argument("--dry-run", action="store_true", help="CPU, reference kernel, tiny sizes (checks the script)")
    args = p.parse_args(argv)
    r = script_runner(args.dry_run, min_round_s=0.05, out=args.out)
    shape = r.cfg.shape
    ns = [64] if args.dry_run else [int(x) for x in args.tokens_per_rank.split(",")]
    names = ["reference"] if args.dry_run else args.backends.split(",")
    rows = []
    for name in names:
        backend = select_backend(name, r.spec())
        for n in ns:
            for role, q_len, k_len, causal in shapes(n):
                head = {"backend": name, "n": n, "role": role, "q_len": q_len, "k_len": k_len, "causal": causal}
                try:
                    rows.append({**head, **measure(r, backend, tile(q_len, k_len, causal))})
                except (RuntimeError, ValueError) as e:  # recorded; the other shapes still run
                    rows.append({**head, "error": f"{type(e).__name__}: {e}"[:200]})
                print(f"tile_kernels: {rows[-1]}", flush=True)
    env = script_environment("benchmarks/tile_kernels.py", sys.argv[1:] if argv is None else argv, r.device,
                             shape=vars(shape))
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows, "shares": shares(rows)}, f, indent=1)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(rows, env))
    return rows


if __name__ == "__main__":
    main()
