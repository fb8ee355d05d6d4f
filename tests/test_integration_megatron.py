"""Megatron-core integration: a GPTModel with RingpackCoreAttention on packed THD input over a 2-rank
context-parallel group equals the same model run document by document on one process.

One 2-rank job runs every check. The single-process side runs one unpacked document per forward
(Megatron's ordinary ``sbhd`` path) with a dense masked-softmax core attention written here on
``torch.nn.functional.scaled_dot_product_attention``, so it shares no attention code with ringpack.
(Megatron's own ``DotProductAttention`` cannot run on a CPU: it takes its scores buffer from a CUDA
memory pool.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")

from dist_utils import run_distributed  # noqa: E402
from integration_utils import grad_errors, max_over_ranks, rel_err, sum_grads  # noqa: E402

LENGTHS = (23, 1, 41, 9, 30)  # padded to multiples of 2 * cp = 4 for Megatron's THD layout
VOCAB = 128
# fp32 end to end; see the transformers test: summation order only, ~1e-7 per op; a mistake is > 1e-2.
TOL = 1e-5


def _config(cp: int, window=None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                             num_query_groups=2, context_parallel_size=cp, use_cpu_initialization=True,
                             attention_dropout=0.0, hidden_dropout=0.0, params_dtype=torch.float32,
                             window_size=window, window_attn_skip_freq=2 if window else None)


def _model(config, spec):
    from megatron.core.models.gpt import GPTModel

    # Learned absolute positions (fed per-document position_ids): megatron-core 0.16's RotaryEmbedding.get_emb
    # moves its inv_freq to torch.cuda.current_device() unconditionally, so "rope" cannot run on a CPU.
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=256,
                    position_embedding_type="learned_absolute")


def _dense_spec():
    """Megatron's local GPT layer spec with a dense, single-process core attention for unpacked input."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import is_layer_window_attention

    class DenseCoreAttention(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)
            windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
            self.left = config.window_size[0] if windowed else -1
            self.scale = softmax_scale

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            s, b = query.shape[:2]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
            visible = (j <= i) & ((j >= i - self.left) if self.left >= 0 else True)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale)
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.submodules.core_attention = DenseCoreAttention
    return spec


def _data():
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENGTHS]
    return docs


def _reference(docs, window):
    """Loss and gradients from one unpacked document per forward with dense attention, cp = 1."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=1)
    torch.manual_seed(1)
    model = _model(_config(1, window), _dense_spec())
    count = sum(len(d) - 1 for d in docs)
    total = torch.zeros((), dtype=torch.float64)
    for d in docs:
        if len(d) < 2:
            continue
        x = d[None, :-1]
        pos = torch.arange(x.shape[1])[None]
        loss = model(x, pos, None, labels=d[None, 1:]).sum() / count
        loss.backward()
        total += loss.detach().double()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    parallel_state.destroy_model_parallel()
    return state, total, grads


def _ring(docs, state, window, plain):
    """Loss and gradients of the packed THD batch over the 2-rank context-parallel group.

    ``plain``: pass Megatron's own ``PackedSeqParams`` (each layer then plans for itself) instead of
    ringpack's subclass that carries the batch's plans.
    """
    import dataclasses

    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.packed_seq_params import PackedSeqParams

    import ringpack
    from ringpack.integrations.megatron import packed_seq_params, ringpack_layer_spec
    from ringpack.packing import lengths_to_cu_seqlens

    cp = dist.get_world_size()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model = _model(_config(cp, window), ringpack_layer_spec(get_gpt_layer_local_spec()))
    model.load_state_dict(state)
    padded_lengths = [-(-n // (2 * cp)) * 2 * cp for n in LENGTHS]
    params = packed_seq_params(lengths_to_cu_seqlens(LENGTHS), cu_seqlens_padded=lengths_to_cu_seqlens(padded_lengths))
    # The global padded pack: tokens, next-token labels inside each document, loss mask, positions.
    tokens, labels, mask, pos = [], [], [], []
    for d, p in zip(docs, padded_lengths):
        pad = p - len(d)
        tokens.append(torch.cat([d, torch.zeros(pad, dtype=torch.long)]))
        labels.append(torch.cat([d[1:], torch.zeros(pad + 1, dtype=torch.long)]))
        mask.append(torch.cat([torch.ones(len(d) - 1), torch.zeros(pad + 1)]))
        pos.append(torch.arange(p))
    ctx = params.ringpack_context
    plan, rank = ctx.plan(), ctx.rank
    local = {k: ringpack.shard(torch.cat(v), plan, rank)[None] for k, v in
             (("tokens", tokens), ("labels", labels), ("mask", mask), ("pos", pos))}
    if plain:
        params = PackedSeqParams(**{f.name: getattr(params, f.name) for f in dataclasses.fields(PackedSeqParams)})
    per_token = model(local["tokens"], local["pos"], None, labels=local["labels"], packed_seq_params=params)
    loss = (per_token * local["mask"]).sum() / torch.cat(mask).sum()
    loss.backward()
    sum_grads(model, parallel_state.get_context_parallel_group())
    total = loss.detach().double()
    dist.all_reduce(total)
    parallel_state.destroy_model_parallel()
    return model, total


def _job():
    results = {}
    for name, window, plain in (("causal", None, False), ("window", (5, 0), False), ("plain_params", None, True)):
        docs = _data()
        state, ref_loss, ref_grads = _reference(docs, window)
        model, loss = _ring(docs, state, window, plain)
        errors = {f"{name}/loss": rel_err(loss, ref_loss)}
        errors.update({f"{name}/grad/{n}": e for n, e in grad_errors(model, ref_grads).items()})
        results.update(max_over_ranks(errors))
    return {"errors": results, "raised": _error_cases(), "rope_layout": _rope_layout_error()}


def _rope_layout_error() -> float:
    """Megatron's THD rotary embedding on this rank's tokens vs the rotation each token's own position gives.

    GPTModel's "rope" cannot run on a CPU (see ``_model``), so the layout agreement it depends on is
    checked here on Megatron's public ``apply_rotary_pos_emb`` directly.
    """
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    import ringpack
    from ringpack.integrations.megatron import packed_seq_params

    cp = dist.get_world_size()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    config = _config(cp)
    padded = ringpack.lengths_to_cu_seqlens([-(-n // (2 * cp)) * 2 * cp for n in LENGTHS])
    params = packed_seq_params(padded)
    plan, rank = params.ringpack_context.plan(), params.ringpack_context.rank
    head_dim = config.kv_channels
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), inv_freq)
    freqs = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [max_s, 1, 1, d], Megatron's layout
    x = ringpack.shard(torch.randn(int(padded[-1]), 2, head_dim, generator=torch.Generator().manual_seed(0)),
                       plan, rank)
    thd = apply_rotary_pos_emb(x, freqs, config, cu_seqlens=params.cu_seqlens_q_padded,
                               cp_group=parallel_state.get_context_parallel_group())
    by_position = apply_rotary_pos_emb(x[:, None], freqs[plan.position_ids(rank)], config)[:, 0]
    error = torch.tensor((thd - by_position).abs().max().item())
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    parallel_state.destroy_model_parallel()
    return error.item()


def _error_cases() -> dict[str, str]:
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    from ringpack.integrations.megatron import RingpackCoreAttention, packed_seq_params, ringpack_layer_spec

    parallel_state.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    raised = {}
    for case, fn in {
        "dropout": lambda: RingpackCoreAttention(_with(_config(2), attention_dropout=0.1), 1, AttnMaskType.causal,
                                                 "self"),
        "arbitrary_mask": lambda: RingpackCoreAttention(_config(2), 1, AttnMaskType.arbitrary, "self"),
        "padding_rule": lambda: packed_seq_params([0, 5, 9]),
        "not_a_layer_spec": lambda: ringpack_layer_spec(ModuleSpec(module=torch.nn.Linear)),
        "sbhd": lambda: RingpackCoreAttention(_config(2), 1, AttnMaskType.causal, "self")(
            torch.zeros(4, 1, 4, 16), torch.zeros(4, 1, 2, 16), torch.zeros(4, 1, 2, 16), None),
    }.items():
        try:
            fn()
            raised[case] = ""
        except ValueError as e:
            raised[case] = str(e)
    parallel_state.destroy_model_parallel()
    return raised


def _with(config, **changes):
    for k, v in changes.items():
        setattr(config, k, v)
    return config


@pytest.fixture(scope="module")
def job():
    return run_distributed(2, _job)


@pytest.mark.parametrize("mask", ["causal", "window", "plain_params"])
def test_gpt_loss_and_every_gradient_match_one_process(job, mask):
    """Loss and every parameter gradient of a THD step on 2 context-parallel ranks equal Megatron's own
    attention run per document on one process (causal; a sliding window on alternate layers; and a plain
    ``PackedSeqParams`` without ringpack's per-batch context).

    Catches: tokens sharded in another layout than the plan's (zigzag over padded documents), padding
    leaking into attention, positions restarting at the wrong token, the window applied to the wrong
    layers or off by one, a context-parallel group taken from the wrong place. Tolerance: fp32, see ``TOL``.
    """
    errors = {k: v for k, v in job["errors"].items() if k.startswith(mask + "/")}
    assert any("/grad/" in k for k in errors), "no gradients were compared"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: relative error {errors[worst]:.3g} > {TOL}"


@pytest.mark.parametrize("case,words", [("dropout", "attention_dropout"), ("arbitrary_mask", "arbitrary"),
                                        ("padding_rule", "multiple of 2*cp"), ("sbhd", "qkv_format='thd'"),
                                        ("not_a_layer_spec", "core_attention")])
def test_unsupported_requests_raise(job, case, words):
    """Attention dropout, an arbitrary mask, documents not padded to Megatron's 2*cp rule, unpacked input and a
    spec without a core attention raise a ValueError saying what is supported, instead of doing something else."""
    message = job["raised"][case]
    assert message, f"{case}: no ValueError was raised"
    assert words in message, f"{case}: message does not mention {words!r}: {message}"


def test_megatron_thd_rope_agrees_with_the_plan_layout(job):
    """Megatron's THD rotary embedding, applied to the tokens ringpack's plan gives a rank, rotates each
    token by its own position in its document. Catches a plan layout that differs from Megatron's THD
    context-parallel layout (chunks r and 2cp-1-r of every padded document). Same fp32 ops on both
    sides, so the tolerance is a few ulps (1e-6)."""
    assert job["rope_layout"] <= 1e-6, f"THD RoPE differs from per-position RoPE by {job['rope_layout']:.3g}"
