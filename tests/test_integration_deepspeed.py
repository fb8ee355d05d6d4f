"""DeepSpeed integration on 2 gloo ranks: (a) ring attention as the local attention of Ulysses
``DistributedAttention``; (b) a transformers Llama trained through ``deepspeed.initialize`` with a
sequence-parallel group, whose loss and every gradient equal the single-process run.

One 2-rank job runs every check; each test asserts on its part.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed", reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")
pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from dist_utils import run_distributed  # noqa: E402
from integration_utils import grad_errors, max_over_ranks, rel_err  # noqa: E402

LENGTHS = (23, 1, 41, 9, 30)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
# (a) runs in float64 against the float64 per-document reference: the merge is exact, so only rounding
# (~1e-15) remains; 1e-10 is the project's float64 bar. (b) is fp32 end to end, as in the transformers test.
TOL64 = 1e-10
TOL32 = 1e-5
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "sequence_parallel_size": 2,  # the group ring attention runs over (built by sequence_parallel_mpu)
    "zero_optimization": {"stage": 0},
}


def _grid_cases():
    """(Ulysses size, ring size, strategy, sequence dim) grids that fit 2 ranks."""
    return [(2, 1, "balanced", 0), (2, 1, "zigzag", 1), (1, 2, "balanced", 0), (1, 2, "zigzag", 1)]


def _ulysses_ring(ulysses: int, ring: int, strategy: str, seq_dim: int) -> dict[str, float]:
    """Ulysses x ring attention (float64) against ringpack.checking.reference_attention on the whole pack."""
    from ringpack.checking import reference_attention
    from ringpack.integrations import RingpackContext
    from ringpack.integrations.deepspeed import UlyssesRing, ulysses_ring_attention
    from ringpack.packing import lengths_to_cu_seqlens

    rank = dist.get_rank()
    # Ranks r = ring_rank * ulysses + ulysses_rank; every rank creates every group, in the same order.
    u_groups = [dist.new_group([g * ulysses + u for u in range(ulysses)]) for g in range(ring)]
    r_groups = [dist.new_group([g * ulysses + u for g in range(ring)]) for u in range(ulysses)]
    cu = lengths_to_cu_seqlens(LENGTHS)
    grid = UlyssesRing(RingpackContext(cu, group=r_groups[rank % ulysses], strategy=strategy),
                       u_groups[rank // ulysses])
    attn = ulysses_ring_attention(grid.ulysses_group, seq_dim=seq_dim)

    gen = torch.Generator().manual_seed(0)
    total = int(cu[-1])
    q, k, v, dout = (torch.randn(total, h, HEAD_DIM, generator=gen, dtype=torch.float64)
                     for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    ref, _ = reference_attention(q, k, v, cu, causal=True)
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))

    batch_dim = 1 - seq_dim  # [S, 1, H, D] for seq_dim 0, [1, S, H, D] for seq_dim 1
    q_l, k_l, v_l = (grid.shard(t.detach()).unsqueeze(batch_dim).requires_grad_(True) for t in (q, k, v))
    out = attn(q_l, k_l, v_l, batch_dim, grid=grid, causal=True)
    grads = torch.autograd.grad((out * grid.shard(dout).unsqueeze(batch_dim)).sum(), (q_l, k_l, v_l))
    name = f"u{ulysses}xr{ring}/{strategy}/s{seq_dim}"
    errors = {f"{name}/out": (out.select(batch_dim, 0) - grid.shard(ref.detach())).abs().max().item()}
    for g_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[f"{name}/{g_name}"] = (got.select(batch_dim, 0) - grid.shard(want)).abs().max().item()
    errors[f"{name}/shard_batch"] = _shard_batch_error(grid)
    return errors


def _shard_batch_error(grid) -> float:
    """0.0 when the Ulysses pieces of a collated batch, put back together over the whole grid, hold exactly
    the global (token, label, position) triples plus pad rows that carry no target; else 1.0."""
    from ringpack.packing import PackingCollator

    batch = PackingCollator()([list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(LENGTHS)])
    piece = grid.shard_batch(batch)
    rows = list(zip(piece["input_ids"][0].tolist(), piece["labels"][0].tolist(), piece["position_ids"][0].tolist()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows)
    got = sorted(r for rank_rows in everyone for r in rank_rows if r != (0, -100, 0))
    want = sorted(zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0].tolist()))
    targets = sum(n - 1 for n in LENGTHS)
    ok = got == want and piece["num_items_in_batch"] == targets and piece["input_ids"].shape[1] == grid.piece
    return 0.0 if ok else 1.0


def _deepspeed_training() -> dict[str, float]:
    """One step of a Llama under deepspeed.initialize (sequence-parallel group = ring group) vs one process."""
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ringpack.integrations import RingpackContext
    from ringpack.integrations.deepspeed import sequence_parallel_mpu
    from ringpack.integrations.transformers import model_inputs, register
    from ringpack.packing import PackingCollator

    register()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=128)
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ringpack", dtype=torch.float32)
    model.load_state_dict(reference.state_dict())

    gen = torch.Generator().manual_seed(0)
    batch = PackingCollator()([torch.randint(0, 128, (n,), generator=gen).tolist() for n in LENGTHS])
    ref = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    shift_labels=batch["labels"], use_cache=False)
    ref.loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    # lr=0: the step is not taken into account; the client optimizer only lets engine.backward run.
    mpu = sequence_parallel_mpu(DS_CONFIG["sequence_parallel_size"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=DS_CONFIG, mpu=mpu)
    ctx = RingpackContext(batch["cu_seqlens"], group=engine.get_sequence_parallel_group())
    loss = engine(**model_inputs(batch, ctx)).loss
    engine.backward(loss)  # all-reduces the gradients over the sequence x data ranks
    total = loss.detach().clone()
    dist.all_reduce(total, group=ctx.group)
    errors = {"deepspeed/loss": rel_err(total, ref.loss)}
    errors.update({f"deepspeed/grad/{n}": e for n, e in grad_errors(engine.module, ref_grads).items()})
    return errors


def _job():
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group the job already set up
    errors = {}
    for case in _grid_cases():
        errors.update(_ulysses_ring(*case))
    errors.update(_deepspeed_training())
    return max_over_ranks(errors)


@pytest.fixture(scope="module")
def job():
    return run_distributed(2, _job)


@pytest.mark.parametrize("ulysses,ring,strategy,seq_dim", _grid_cases())
def test_ulysses_with_ring_local_attention_is_exact(job, ulysses, ring, strategy, seq_dim):
    """Out, dq, dk, dv of DistributedAttention(RingLocalAttention) equal float64 per-document attention, and
    UlyssesRing.shard_batch hands out every (token, label, position) once.

    Catches: tokens of the ring shard split across Ulysses ranks in another order than the all-to-all
    gathers them, pad rows leaking into the ring, KV heads split away from their query heads, the
    sequence dimension mixed up with the batch dimension. Tolerance: float64, see ``TOL64``.
    """
    name = f"u{ulysses}xr{ring}/{strategy}/s{seq_dim}/"
    errors = {k: v for k, v in job.items() if k.startswith(name)}
    assert len(errors) == 5, f"missing results for {name}: {sorted(errors)}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL64, f"{worst}: max abs error {errors[worst]:.3g} > {TOL64}"


def test_deepspeed_initialize_step_matches_one_process(job):
    """Loss and every parameter gradient after engine.backward on a 2-rank sequence-parallel group equal
    transformers' eager run on one process. Catches a wrong group, a loss that is averaged instead of
    shared (gradients off by the group size) and any ring or sharding error. Tolerance: fp32, ``TOL32``."""
    errors = {k: v for k, v in job.items() if k.startswith("deepspeed/")}
    assert any("/grad/" in k for k in errors), "no gradients were compared"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL32, f"{worst}: relative error {errors[worst]:.3g} > {TOL32}"
