"""torch.compile traces a model that calls ``ringpack.ring_attention``: under compile the ring runs as the
custom ops of ``ringpack.ops`` (fake impls give shapes), traced as single graph nodes.

The compiled model must give the eager model's outputs and gradients: the ops run the same code, so
the match is exact up to the compiled projections' own rounding (float64 on CPU: 1e-12; bf16 on GPU:
the bound is the bf16 step at the outputs' scale).
"""

from __future__ import annotations

import pytest
import torch

import ringpack
from ringpack import ops
from ringpack.backends import AttnSpec, select_backend
from ringpack.comm import Ring


class TinyAttention(torch.nn.Module):
    """q/k/v projections -> ring attention -> output projection, on one rank."""

    def __init__(self, plan, heads: int, kv_heads: int, dim: int, dtype, device, backend: str = "auto"):
        super().__init__()
        self.plan, self.heads, self.kv_heads, self.dim = plan, heads, kv_heads, dim
        width = heads * dim
        self.wq = torch.nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.wkv = torch.nn.Linear(width, 2 * kv_heads * dim, bias=False, dtype=dtype, device=device)
        self.wo = torch.nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.backend = backend

    def forward(self, x):
        q = self.wq(x).unflatten(1, (self.heads, self.dim))
        k, v = self.wkv(x).unflatten(1, (2, self.kv_heads, self.dim)).unbind(1)
        out = ringpack.ring_attention(q, k, v, self.plan, causal=self.plan.causal, backend=self.backend)
        return self.wo(out.flatten(1))


def _compare(model, x, backend_name, tol):
    eager_y = model(x)
    eager_g = torch.autograd.grad(eager_y.float().square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, backend=backend_name)
    y = compiled(x)
    g = torch.autograd.grad(y.float().square().sum(), [x, *model.parameters()])
    assert (y.float() - eager_y.float()).abs().max() <= tol * eager_y.float().abs().max()
    for a, b in zip(g, eager_g):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


def test_compile_cpu_float64(monkeypatch):
    """The custom ops trace (aot_eager, no codegen needed) and give eager's results in float64.

    Catches ring_attention bypassing the ops under compile (dynamo would then trace the host-side ring
    loop itself: graph breaks on every step, or plan sizes baked into the graph)."""
    calls = []
    intern = ops.intern
    monkeypatch.setattr(ops, "intern", lambda *a: calls.append(1) or intern(*a))
    plan = ringpack.make_plan([0, 30, 31, 77], 1, strategy="contiguous")
    model = TinyAttention(plan, 4, 2, 16, torch.float64, "cpu")
    x = torch.randn(77, 64, dtype=torch.float64, requires_grad=True)
    _compare(model, x, "aot_eager", 1e-12)
    assert calls, "ring_attention did not run through ringpack.ops under torch.compile"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_gpu_bf16_inductor():
    """Inductor compiles the projections around the opaque ring op on one GPU (bf16, auto backend)."""
    plan = ringpack.make_plan([0, 300, 301, 1000], 1)
    model = TinyAttention(plan, 8, 2, 64, torch.bfloat16, "cuda")
    x = torch.randn(1000, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    _compare(model, x, "inductor", 2 ** -6)


def test_fullgraph_with_token_interned_outside():
    """With the call interned outside the graph, the whole function traces as one graph (fullgraph)."""
    plan = ringpack.make_plan([0, 30, 77], 1, strategy="contiguous")
    spec = AttnSpec("cpu", torch.float64, 16, 4, 2, True, False, False, True)
    token = ops.intern(plan, Ring.local(), select_backend("auto", spec), 0.25, 0.0, True)

    def f(q, k, v):
        out, lse = torch.ops.ringpack.ring_fwd(q, k, v, token)
        return out.sum() + lse.sum()

    q = torch.randn(77, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(77, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(77, 2, 16, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12


def test_600_compiled_calls_in_flight_then_all_backwards():
    """600 compiled ring calls run their forwards before any backward (80 layers x micro-batches, activation
    checkpointing, pipeline schedules keep that many graphs alive): every backward must find its call's state and
    give eager's gradients. The state of a call lives exactly as long as its graph: once the backwards ran and the
    outputs are gone, nothing is left registered. (A registry that kept the last 256 calls lost the rest.)"""
    import gc

    plans = [ringpack.make_plan([0, 5, 9 + i % 3], 1, strategy="contiguous") for i in range(4)]  # a new plan per batch
    before = len(ops._contexts)

    def f(q, k, v, plan):
        return ringpack.ring_attention(q, k, v, plan, return_lse=True)

    compiled = torch.compile(f, backend="aot_eager", dynamic=False)
    inputs, eager, outs = [], [], []
    for i in range(600):
        plan = plans[i % 4]
        n = plan.total_tokens
        qkv = [torch.randn(n, h, 8, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1)]
        inputs.append(qkv)
        eager.append(torch.autograd.grad(sum(x.sum() for x in f(*qkv, plan)), qkv))
        outs.append(compiled(*qkv, plan))
    assert len(ops._contexts) >= before + 600
    loss = sum(o.sum() + lse.sum() for o, lse in outs)
    grads = torch.autograd.grad(loss, [x for qkv in inputs for x in qkv])
    for i, want in enumerate(eager):
        for a, b in zip(grads[3 * i:3 * i + 3], want):
            assert (a - b).abs().max() <= 1e-12
    del outs, loss, grads
    gc.collect()
    assert len(ops._contexts) == before
