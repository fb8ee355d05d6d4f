"""transformers integration: ``attn_implementation="ringpack"`` on 2 gloo ranks equals one process.

One 2-rank job runs every multi-rank check; each test below asserts on its part of the job's results. The
single-process side is transformers' own ``eager`` attention on the whole pack (it masks documents from
``position_ids``) or on each document alone, so the comparison shares no attention code with ringpack.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from dist_utils import run_distributed  # noqa: E402
from integration_utils import expect_value_error, grad_errors, max_over_ranks, rel_err, sum_grads  # noqa: E402

import ringpack  # noqa: E402
from ringpack.integrations import RingpackContext  # noqa: E402
from ringpack.integrations.transformers import model_inputs, prepare_model, register  # noqa: E402
from ringpack.packing import PackingCollator  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)
# Document lengths of the pack: a 1-token document, odd lengths, one long enough to cross the rank boundary
# and, for chunked attention (chunk 16), documents of 1, 2 and 3 chunks.
LENGTHS = (23, 1, 41, 9, 30)
# fp32 end to end: ring and eager sum the same softmax in a different order, ~1e-7 relative per op; 1e-5
# leaves room for two layers of that and still fails on any masking, shifting or sharding mistake (>1e-3).
TOL = 1e-5


def _configs():
    from transformers import (
        Gemma2Config,
        Llama4TextConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama": (LlamaConfig(**TINY), "balanced"),
        "qwen2": (Qwen2Config(**TINY), "balanced"),  # q/k/v biases
        "qwen3": (Qwen3Config(**TINY, head_dim=16), "balanced"),  # q/k RMSNorm
        "mistral_window": (MistralConfig(**TINY, sliding_window=8), "balanced"),  # layout mask (7, -1)
        # softcap on every layer, window on alternate layers: the global layers' plan keeps the windowed
        # layers' token layout (make_plan(..., layout=...)), so balanced serves both masks
        "gemma2_softcap_window": (Gemma2Config(**TINY, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
                                               query_pre_attn_scalar=16), "balanced"),
        # chunked attention (chunk 16) on layer 0, global NoPE attention on layer 1, MoE on layer 1
        "llama4_chunked": (Llama4TextConfig(**TINY, head_dim=16, intermediate_size_mlp=128, attention_chunk_size=16,
                                            num_local_experts=2, interleave_moe_layer_step=2, no_rope_layers=[1, 0]),
                           "balanced"),
        # the router load-balancing loss is a product of two means over the pack (coef 0.1 to make it count)
        "mixtral_router_aux": (MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2,
                                             output_router_logits=True, router_aux_loss_coef=0.1), "zigzag"),
    }


def _layer_mask(cfg, layer: int) -> tuple[bool, tuple[int, int], int | None]:
    """The (causal, window, chunk) mask transformers applies at ``layer`` of ``cfg``."""
    types = getattr(cfg, "layer_types", None)
    kind = types[layer] if types else "sliding_attention" if getattr(cfg, "sliding_window", None) else "full"
    if kind == "sliding_attention":
        return (True, (cfg.sliding_window - 1, -1), None)
    if kind == "chunked_attention":
        return (True, (-1, -1), cfg.attention_chunk_size)
    return (True, (-1, -1), None)


def _pairs(name, cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    # Each model gets its own config: from_config records the attention implementation in the config.
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ringpack", dtype=torch.float32)
    model.load_state_dict(reference.state_dict())
    reference.train()
    model.train()
    return reference, prepare_model(model)


def _batch():
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in LENGTHS]
    samples[2] = {"input_ids": samples[2], "labels": [-100] * 10 + samples[2][10:]}  # a masked prompt
    return PackingCollator()(samples)


def _compare(name, cfg, strategy, batch, group) -> dict[str, float]:
    reference, model = _pairs(name, cfg)
    # use_cache=False: with a cache, transformers does not derive the packed-document mask from position_ids.
    ref = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    shift_labels=batch["labels"], use_cache=False)
    ref.loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    layout = _layer_mask(cfg, 0)
    ctx = RingpackContext(batch["cu_seqlens"], group=group, strategy=strategy, window_size=layout[1])
    out = model(**model_inputs(batch, ctx))
    out.loss.backward()
    sum_grads(model, group)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, out.logits[0].detach(), group=group)
    logits = ringpack.unshard(parts, ctx.plan())
    masks = {_layer_mask(cfg, i) for i in range(cfg.num_hidden_layers)}
    errors = {f"{name}/loss": rel_err(loss, ref.loss), f"{name}/logits": rel_err(logits, ref.logits[0]),
              # one plan per distinct mask for the whole step, however many layers ran (0 when reused)
              f"{name}/extra_plans": float(len(set(ctx.plans) ^ masks))}
    errors.update({f"{name}/grad/{n}": e for n, e in grad_errors(model, ref_grads).items() if ref_grads[n] is not None})
    return errors


def _hf_batches(group) -> dict[str, float]:
    """Loss and gradients of DataCollatorWithFlattening batches against every document run alone (eager)."""
    from transformers import DataCollatorWithFlattening, LlamaConfig

    gen = torch.Generator().manual_seed(2)
    features = [{"input_ids": torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist()} for n in LENGTHS]
    features[2]["labels"] = [-100] * 10 + features[2]["input_ids"][10:]  # a masked prompt
    for f in features:
        f.setdefault("labels", list(f["input_ids"]))
    reference, model = _pairs("llama", LlamaConfig(**TINY))
    total, losses = 0, []
    for f in features:  # each document alone: transformers shifts its labels itself
        labels = torch.tensor(f["labels"])[None]
        count = int((labels[:, 1:] != -100).sum())
        if count:
            losses.append(reference(input_ids=torch.tensor(f["input_ids"])[None], labels=labels,
                                    use_cache=False).loss * count)
        total += count
    (sum(losses) / total).backward()
    want = sum(losses).detach() / total
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    errors = {}
    for flash in (False, True):
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash)(features)
        model.zero_grad()
        out = model(**model_inputs(batch, RingpackContext.from_batch(batch, group=group)))
        out.loss.backward()
        sum_grads(model, group)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss, group=group)
        errors[f"flash_kwargs={flash}/loss"] = rel_err(loss, want)
        errors.update({f"flash_kwargs={flash}/grad/{n}": e for n, e in grad_errors(model, ref_grads).items()})
    return errors


def _fsdp2(batch, group) -> dict[str, float]:
    """One step of a model sharded with FSDP2 (``fully_shard``, which averages gradients over the world) on the
    world's ranks, as the ring's group: each rank's loss share times the world size gives the full gradient."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig

    reference, model = _pairs("llama", LlamaConfig(**TINY))
    ref = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    shift_labels=batch["labels"], use_cache=False)
    ref.loss.backward()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    out = model(**model_inputs(batch, RingpackContext(batch["cu_seqlens"], group=group)))
    (out.loss * dist.get_world_size(group)).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return {f"fsdp2/grad/{n}": rel_err(grads[n], p.grad) for n, p in reference.named_parameters()}


def _different_packs(group) -> dict[str, str]:
    """What each rank raises when the ranks of one group are handed different packs."""
    rank = dist.get_rank(group)
    batch = _batch()
    other = dict(batch, input_ids=batch["input_ids"] + rank)  # same boundaries, other tokens on rank 1
    return {
        "boundaries": expect_value_error(lambda: RingpackContext((0, 10 + 5 * rank, 30), group=group)),
        "totals": expect_value_error(lambda: RingpackContext((0, 30) if rank == 0 else (0, 20, 32), group=group)),
        "tokens": expect_value_error(lambda: RingpackContext.from_batch(other, group=group)),
        "unchecked": expect_value_error(lambda: RingpackContext((0, 10 + 5 * rank, 30), group=group, verify=False)),
    }


def _error_cases(batch, group) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, attention_dropout=0.1), attn_implementation="ringpack")
    ctx = RingpackContext(batch["cu_seqlens"], group=group)
    inputs = model_inputs(batch, ctx)
    n = inputs["input_ids"].shape[1]
    model.train()
    dropout = expect_value_error(lambda: model(**inputs))
    model.eval()
    padded = expect_value_error(lambda: model(**inputs, attention_mask=torch.cat(
        [torch.ones(1, n - 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)], 1)))
    no_context = expect_value_error(lambda: model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]))
    two_rows = expect_value_error(lambda: model(input_ids=inputs["input_ids"].expand(2, -1),
                                                position_ids=inputs["position_ids"].expand(2, -1),
                                                ringpack_context=ctx))
    moe = AutoModelForCausalLM.from_config(MixtralConfig(**TINY, num_local_experts=2, output_router_logits=True),
                                           attn_implementation="ringpack")
    unprepared_moe = expect_value_error(lambda: moe(**inputs))
    hybrid = prepare_model(AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="ringpack"))
    hybrid.config.layer_types = ["full_attention", "linear_attention"]
    linear_layers = expect_value_error(lambda: hybrid(**inputs))
    return {"dropout": dropout, "padded": padded, "no_context": no_context, "two_rows": two_rows,
            "unprepared_moe": unprepared_moe, "linear_layers": linear_layers}


def _job():
    register()
    group = dist.group.WORLD
    batch = _batch()
    errors = {}
    for name, (cfg, strategy) in _configs().items():
        errors.update(_compare(name, cfg, strategy, batch, group))
    errors.update(_hf_batches(group))
    errors.update(_fsdp2(batch, group))
    return {"errors": max_over_ranks(errors, group), "raised": _error_cases(batch, group),
            "different_packs": _different_packs(group), "all_ones_mask_ok": _all_ones_mask_ok(batch, group)}


def _all_ones_mask_ok(batch, group) -> bool:
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="ringpack").eval()
    inputs = model_inputs(batch, RingpackContext(batch["cu_seqlens"], group=group))
    with torch.no_grad():
        plain = model(**inputs).logits
        masked = model(**inputs, attention_mask=torch.ones_like(inputs["input_ids"])).logits
    return bool(torch.equal(plain, masked))


@pytest.fixture(scope="module")
def job():
    return run_distributed(2, _job)


def _worst(errors: dict[str, float], prefix: str) -> tuple[str, float]:
    mine = {k: v for k, v in errors.items() if k.startswith(prefix)}
    assert any("/grad/" in k for k in mine), f"no gradients compared for {prefix}"
    worst = max(mine, key=mine.get)
    return worst, mine[worst]


@pytest.mark.parametrize("model", list(_configs()))
def test_loss_and_every_gradient_match_one_process(job, model):
    """Loss, logits and every parameter gradient of a 2-rank step equal transformers' eager run on one process.

    Catches: a wrong mask (sliding window off by one, softcap dropped, documents leaking, Llama-4's chunked
    layers run as plain causal attention because the mask's chunk size was dropped), labels shifted after
    sharding (loss differs), a lost rank-boundary label, a MoE router auxiliary loss counted once per rank
    (each rank's share added the whole coef x aux of its own tokens), a plan rebuilt per layer instead of once
    per mask (``extra_plans``), gradients not flowing through the ring. Tolerance: fp32, see ``TOL``.
    """
    worst, error = _worst(job["errors"], model + "/")
    assert error <= TOL, f"{worst}: relative error {error:.3g} > {TOL}"


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_flattening_collator_batches_match_each_document_alone(job, flash_kwargs):
    """A ``DataCollatorWithFlattening`` batch (unshifted labels, -100 at each document start; with
    ``return_flash_attn_kwargs`` also ``cu_seq_lens_q/k`` and ``max_length_q/k``) gives on 2 ranks the loss and
    gradients of every document run alone. Catches labels read as already shifted (every token learning to
    predict itself), targets shifted across a document or rank boundary, and the flash kwargs being rejected.
    Tolerance: fp32, ``TOL``."""
    worst, error = _worst(job["errors"], f"flash_kwargs={flash_kwargs}/")
    assert error <= TOL, f"{worst}: relative error {error:.3g} > {TOL}"


def test_fsdp2_gradients_match_one_process(job):
    """FSDP2 (``fully_shard``) on CPU averages gradients over the world like DDP: each rank's loss share scaled by
    the world size gives every (resharded) gradient of one process. Catches the ring's shares being averaged
    instead of summed. Tolerance: fp32, ``TOL``."""
    worst, error = _worst(job["errors"], "fsdp2/")
    assert error <= TOL, f"{worst}: relative error {error:.3g} > {TOL}"


@pytest.mark.parametrize("case,words", [
    ("boundaries", ["ranks 0: 30 tokens, 2 documents", "cu_seqlens[1] = 10 on ranks 0; 15 on ranks 1"]),
    ("totals", ["ranks 0: 30 tokens, 1 documents", "ranks 1: 32 tokens, 2 documents", "cu_seqlens[1] = 30 on"]),
    ("tokens", ["same boundaries but different tokens"]),
])
def test_ranks_holding_different_packs_are_named(job, case, words):
    """Ranks of one group given different packs (what a per-rank sampler does by default) raise on every rank,
    naming the ranks, their token totals, document counts and the first differing boundary, instead of running
    (same total: wrong numbers) or aborting deep in gloo (different totals). Same boundaries with other tokens
    are caught by the batch digest of ``RingpackContext.from_batch``."""
    message = job["different_packs"][case]
    for w in words:
        assert w in message, f"{case}: {w!r} not in: {message}"


def test_pack_check_can_be_turned_off(job):
    """``verify=False`` skips the exchange (for callers that guarantee identical packs themselves)."""
    assert job["different_packs"]["unchecked"] == ""


@pytest.mark.parametrize("case,words", [("dropout", "dropout"), ("padded", "attention_mask"),
                                        ("no_context", "ringpack_context"), ("two_rows", "one packed row"),
                                        ("unprepared_moe", "prepare_model"), ("linear_layers", "linear_attention")])
def test_unsupported_requests_raise(job, case, words):
    """Attention dropout, a padding mask, a multi-rank call without the batch context, a 2-row batch, a MoE model
    whose router loss would be counted per rank, and layers that mix tokens outside attention each raise a
    ValueError that says what to change, instead of computing the wrong result."""
    message = job["raised"][case]
    assert message, f"{case}: no ValueError was raised"
    assert words in message, f"{case}: message does not mention {words!r}: {message}"


def test_all_ones_mask_is_accepted(job):
    """A 2-D mask with no padding (what tokenizers return) means the packed-causal mask: same logits as none."""
    assert job["all_ones_mask_ok"]
