"""The one-GPU benchmark harnesses (``benchmarks/rank_compute.py``, ``tile_kernels.py``), checked on the CPU in float64.

Its numbers are only worth something if each rank really runs its share of the ring: a ``Delivered`` ring that
handed a rank the wrong rows, or none, would time a different computation. Run rank by rank, every rank's
``out``, ``lse`` and ``dq`` must equal the float64 reference to 1e-10 (dK/dV of received rows go back to their
owner in a real ring, so they are not compared here).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from ringpack import lengths_to_cu_seqlens, make_plan, shard
from ringpack.backends.reference import ReferenceBackend
from ringpack.checking import reference_attention

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str = "rank_compute"):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("strategy", ["balanced", "zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_computes_its_share_exactly(strategy, world):
    rc = _load()
    lengths = (300, 1, 0, 97, 31, 700, 13)
    cu = lengths_to_cu_seqlens(lengths)
    g = torch.Generator().manual_seed(world)
    total = sum(lengths)
    q, dout = (torch.randn(total, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(total, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    plan = make_plan(cu, world, strategy=strategy)
    qr = q.clone().requires_grad_()
    out, lse = reference_attention(qr, k, v, cu, causal=True)
    (dq,) = torch.autograd.grad(out, (qr,), dout)
    runs = rc.rank_runs(plan, q, k, v, dout, ReferenceBackend(), 1 / math.sqrt(16), backward=True)
    for r, run in enumerate(runs):
        got_out, got_lse, got_dq, _, _ = run()
        for name, got, want in (("out", got_out, shard(out, plan, r)), ("lse", got_lse, shard(lse.t(), plan, r).t()),
                                ("dq", got_dq, shard(dq, plan, r))):
            err = (got - want).abs().max().item() if got.numel() else 0.0
            assert err <= 1e-10, f"rank {r} {name}: {err}"


def test_dry_run_writes_json_and_markdown(tmp_path):
    rows = _load().main(["--dry-run", "--out", str(tmp_path / "rc.json")])
    assert rows and all("error" not in x for x in rows), rows
    data = json.loads((tmp_path / "rc.json").read_text())
    assert {x["strategy"] for x in data["rows"]} == {"balanced", "zigzag"}
    assert all(x["compute_efficiency"] > 0 and len(x["rank_s"]) == 2 for x in data["rows"])
    assert "compute efficiency" in (tmp_path / "rc.md").read_text()


def test_dry_run_profile_and_filters(tmp_path):
    rows = _load().main(["--dry-run", "--mix", "long tail", "--profile", "32", "--out", str(tmp_path / "rc.json")])
    assert rows and {x["mix"] for x in rows} == {"long tail"}
    text = (tmp_path / "rc.profile.txt").read_text()
    assert text.count("synchronising calls: 0") == 3, text[:500]  # the whole batch and both ranks
    assert not _load().main(["--dry-run", "--mix", "2k docs", "--out", str(tmp_path / "none.json")])
    rows = _load().main(["--dry-run", "--strategy", "zigzag", "--fwd-bwd-only", "--out", str(tmp_path / "z.json")])
    assert [(x["strategy"], x["pass"]) for x in rows] == [("zigzag", "fwd+bwd")]


def test_tile_kernels_dry_run_times_every_tile_and_pack(tmp_path):
    """Every case runs on the reference kernel (no error rows), the ring tiles of each rank add up to half the whole
    batch's pairs, and the local packs hold the pairs of their masks."""
    tk = _load("tile_kernels")
    rows = tk.main(["--dry-run", "--out", str(tmp_path / "tiles.json")])
    assert len(rows) == 12 and all("error" not in x and x["fwd_s"] > 0 and x["bwd_s"] > 0 for x in rows), rows
    pairs = [x["pairs"] for x in rows if x["group"] == "ring"]
    assert pairs[0] == 2 * (pairs[1] + pairs[2]) == 2 * (pairs[1] + pairs[3])  # each rank: half the whole batch
    local = {x["case"]: x["pairs"] for x in rows if x["group"] == "local"}
    assert local["one document"] == local["softcap 50"] == 128 * 129 // 2 > local["sliding window"]
    (share,) = json.loads((tmp_path / "tiles.json").read_text())["shares"]
    assert share["fwd"] > 0 and share["fwd+bwd"] > 0
    assert "kernel share" in (tmp_path / "tiles.md").read_text()
    with pytest.raises(ValueError, match="causal tile here is square"):
        tk.tile(4, 8, True)
