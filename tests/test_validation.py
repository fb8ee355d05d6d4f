"""Bad input to ring_attention raises a ValueError naming the problem and what is allowed.

Catches silent acceptance of requests ringpack cannot honour exactly (dropout, a mask other than the
plan's, mismatched shapes or dtypes, a plan for another world size), which would give wrong math.
"""

import pytest
import torch

import ringpack


def _inputs(n=6, h=4, hk=2, d=8, dtype=torch.float64):
    return torch.randn(n, h, d, dtype=dtype), torch.randn(n, hk, d, dtype=dtype), torch.randn(n, hk, d, dtype=dtype)


PLAN = ringpack.make_plan([0, 4, 6], 1)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q, k[:, :1].expand(6, 3, 8).contiguous(), v[:, :1].expand(6, 3, 8).contiguous()),
     r"query heads \(4\) must be a multiple of kv heads \(3\)"),
    (lambda q, k, v: (q, k.float(), v), "must share one floating-point dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "must share one floating-point dtype"),
    (lambda q, k, v: (q, k[..., :4], v[..., :4]), "same head_dim"),
    (lambda q, k, v: (q, k, v[:, :1]), "k and v must have the same shape"),
    (lambda q, k, v: (q[:5], k[:5], v[:5]), "holds 6 tokens in the plan, but q has 5"),
    (lambda q, k, v: (q[0], k, v), "q must be a 3-D tensor"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v[..., :0]), "head_dim, heads and kv_heads must be >= 1"),
    (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), "head_dim, heads and kv_heads must be >= 1"),
])
def test_bad_tensors(change, message):
    q, k, v = change(*_inputs())
    with pytest.raises(ValueError, match=message):
        ringpack.ring_attention(q, k, v, PLAN)


def test_bad_options():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        ringpack.ring_attention(q, k, v, PLAN, dropout_p=0.1)
    with pytest.raises(ValueError, match="do not match the plan"):
        ringpack.ring_attention(q, k, v, PLAN, causal=False)
    with pytest.raises(ValueError, match="do not match the plan"):
        ringpack.ring_attention(q, k, v, PLAN, window_size=(4, -1))
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; supported: auto, .*reference"):
        ringpack.ring_attention(q, k, v, PLAN, backend="nope")
    with pytest.raises(ValueError, match="plan must be a ringpack.Plan"):
        ringpack.ring_attention(q, k, v, {"world_size": 1})


@pytest.mark.parametrize("options, message", [
    ({"softcap": -1.0}, r"softcap \(0 disables it\) must be >= 0, got -1"),
    # inf returned NaN everywhere, NaN was read as 0 (no capping), None and "1" raised a TypeError
    ({"softcap": float("inf")}, r"softcap \(0 disables it\) must be a finite number, got inf"),
    ({"softcap": float("nan")}, r"softcap \(0 disables it\) must be a finite number, got nan"),
    ({"softcap": None}, r"softcap \(0 disables it\) must be a number, got None"),
    ({"softcap": "1"}, r"softcap \(0 disables it\) must be a number, got '1'"),
    ({"softmax_scale": float("nan")}, "softmax_scale .* must be a finite number"),
    ({"softmax_scale": -0.5}, "softmax_scale .* must be > 0"),
    ({"softmax_scale": "0.1"}, "softmax_scale .* must be a number, got '0.1'"),
    # bool("False") is True: the string ran as causal attention
    ({"causal": "False"}, "causal must be True or False, got 'False'"),
    ({"return_lse": "yes"}, "return_lse must be True or False"),
    ({"dropout_p": None}, "dropout_p must be a number"),
])
def test_options_of_the_wrong_kind_are_named(options, message):
    """Python would coerce each of these into another request (or fail deep inside with a TypeError)."""
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=message):
        ringpack.ring_attention(q, k, v, PLAN, **options)


def test_make_plan_refuses_a_string_for_causal():
    with pytest.raises(ValueError, match="causal must be True or False, got 'False'"):
        ringpack.make_plan([0, 4], 1, causal="False")


def test_plan_world_size_must_match_group():
    q, k, v = _inputs()
    plan = ringpack.make_plan([0, 4, 6], 2)
    # the message once read "torch.distributed is not initialized, so 1 rank has 1 ranks"
    with pytest.raises(ValueError, match="plan.world_size=2 but torch.distributed is not initialized .* initialise the "
                                         "process group first"):
        ringpack.ring_attention(q[:3], k[:3], v[:3], plan)


def test_world_one_without_process_group_runs_and_is_differentiable():
    q, k, v = (t.requires_grad_() for t in _inputs())
    out, lse = ringpack.ring_attention(q, k, v, PLAN, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 6) and lse.dtype == torch.float64
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def _mismatched_plan_message():
    q, k, v = _inputs(n=3)
    try:
        ringpack.ring_attention(q, k, v, ringpack.make_plan([0, 9], 3))
    except ValueError as e:
        return str(e)
    return None


def test_plan_world_size_must_match_a_real_group():
    """A plan for 3 ranks inside a 2-rank group must be refused before any exchange could hang."""
    from dist_utils import run_distributed

    message = run_distributed(2, _mismatched_plan_message)
    assert message == "plan.world_size=3 but the process group has 2 ranks; make the plan for the group's size"


def test_second_derivative_raises():
    """A gradient penalty differentiates the backward: it returned second derivatives off by ~14 with no error.
    The ring's backward is not differentiable, so the second differentiation must raise."""
    q, k, v = (t.requires_grad_() for t in _inputs())
    out = ringpack.ring_attention(q, k, v, PLAN)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dq.square().sum().backward()


def test_reference_kernel_in_row_blocks_is_exact(monkeypatch):
    """The reference kernel runs a tile's query rows in blocks (memory bounded for long documents): blocks of a few
    rows give the result of whole tiles to float64 rounding, band shifted with the rows (catches a block's mask
    computed from the tile's first row)."""
    from ringpack.backends import reference
    cu = [0, 70, 71, 200]
    q, k, v = (torch.randn(200, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    plan = ringpack.make_plan(cu, 1, causal=True, window_size=(9, 3))
    want = ringpack.ring_attention(q, k, v, plan, window_size=(9, 3), return_lse=True, backend="reference")
    grads = torch.autograd.grad(want[0].sum() + want[1].sum(), (q, k, v))
    monkeypatch.setattr(reference, "BLOCK_CELLS", 4 * 70 * 7)  # 7-row blocks
    got = ringpack.ring_attention(q, k, v, plan, window_size=(9, 3), return_lse=True, backend="reference")
    for a, b in zip((*got, *torch.autograd.grad(got[0].sum() + got[1].sum(), (q, k, v))), (*want, *grads)):
        assert (a - b).abs().max() <= 1e-12
