"""The Triton kernels that give a no-build install the extension's fused merge and run gather (``ringpack._triton``),
run on the CPU by Triton's interpreter, against the torch path they replace.

Catches a wrong stride, a head or row left unmerged, an accumulator row at lse -inf that is read (it may hold
anything: a NaN there must not reach the result), a rounding to 16 bits that is not the fp32 result rounded once,
and a gathered run out of place. The interpreter has only Triton's fast exp/log (the GPU kernels use libdevice's),
so fp32 results agree to a few fp32 ulps and 16-bit results to one ulp; a kernel bug is off by O(1). Skipped where
Triton is not installed (CPU builds of torch ship without it); the GPU tests run the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import torch
import ringpack._triton as T
from ringpack import merge
assert T.triton is not None

def torch_merge(acc, lacc, b, lb):
    acc = torch.where((lacc == float("-inf")).t()[..., None], torch.zeros_like(acc), acc)  # never read
    available, T.available = T.available, lambda t: False
    try:
        merge.merge_(acc, lacc, b, lb)
    finally:
        T.available = available
    return acc, lacc

torch.manual_seed(0)
for dtype, store in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                     (torch.float32, torch.float32)]:
    rows, heads, dim = 37, 6, 24
    b, lb = torch.randn(rows, heads, dim).to(dtype), torch.randn(heads, rows)
    lacc = torch.randn(heads, rows)
    lacc[:, :5] = float("-inf")
    lb[1, 3:8] = float("-inf")
    wide = torch.randn(rows, heads + 2, dim).to(store)
    acc = wide[:, 1:heads + 1]  # row and head strides of a slice
    acc[:5] = float("nan")
    want, want_lse = torch_merge(acc.clone(), lacc.clone(), b, lb)
    assert T.merge_(acc, lacc, b, lb)
    assert not acc.isnan().any()
    tol = 1e-6 if store == torch.float32 else 2 ** -7
    assert ((acc.float() - want.float()).abs() <= tol * (1 + want.float().abs())).all(), (dtype, store)
    same = (lacc == want_lse) | ((lacc - want_lse).abs() <= 1e-6)
    assert same.all(), (dtype, store)
    assert not T.merge_(acc.double(), lacc.double(), b.double(), lb.double())  # float64 takes the torch path

x = torch.randn(50, 3, 4)
runs = [(10, 5), (0, 3), (40, 10), (12, 2), (12, 2)]
assert T.gather_rows(x, runs, 22).equal(torch.cat([x[a:a + n] for a, n in runs]))
assert T.gather_rows(torch.arange(9).view(9, 1), [(3, 2), (0, 1)], 3).view(-1).tolist() == [3, 4, 0]
assert T.gather_rows(x.requires_grad_(), runs, 22) is None  # not differentiable: autograd keeps torch's cat
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_match_the_torch_path_in_the_interpreter():
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
