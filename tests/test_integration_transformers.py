"""transformers integration: ``attn_implementation="ringpack"`` on 2 gloo ranks equals one process.

One 2-rank job runs every check; each test below asserts on its part of the job's results. The
single-process side is transformers' own ``eager`` attention on the whole pack (it masks documents from
``position_ids``), so the comparison shares no attention code with ringpack.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from dist_utils import run_distributed  # noqa: E402
from integration_utils import grad_errors, max_over_ranks, rel_err, sum_grads  # noqa: E402

import ringpack  # noqa: E402
from ringpack.integrations import RingpackContext  # noqa: E402
from ringpack.integrations.transformers import model_inputs, register  # noqa: E402
from ringpack.packing import PackingCollator  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)
# Document lengths of the pack: a 1-token document, odd lengths, one long enough to cross the rank boundary.
LENGTHS = (23, 1, 41, 9, 30)
# fp32 end to end: ring and eager sum the same softmax in a different order, ~1e-7 relative per op; 1e-5
# leaves room for two layers of that and still fails on any masking, shifting or sharding mistake (>1e-2).
TOL = 1e-5


def _configs():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": (LlamaConfig(**TINY), "balanced"),
        "qwen2": (Qwen2Config(**TINY), "balanced"),  # q/k/v biases
        "qwen3": (Qwen3Config(**TINY, head_dim=16), "balanced"),  # q/k RMSNorm
        "mistral_window": (MistralConfig(**TINY, sliding_window=8), "balanced"),  # layout mask (7, -1)
        # softcap on every layer, window on alternate layers: the global layers' plan keeps the windowed
        # layers' token layout (make_plan(..., layout=...)), so balanced serves both masks
        "gemma2_softcap_window": (Gemma2Config(**TINY, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
                                               query_pre_attn_scalar=16), "balanced"),
    }


def _batch():
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in LENGTHS]
    samples[2] = {"input_ids": samples[2], "labels": [-100] * 10 + samples[2][10:]}  # a masked prompt
    return PackingCollator()(samples)


def _compare(name, cfg, strategy, batch, group) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    # Each model gets its own config: from_config records the attention implementation in the config.
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ringpack", dtype=torch.float32)
    model.load_state_dict(reference.state_dict())
    reference.train()
    model.train()

    # use_cache=False: with a cache, transformers does not derive the packed-document mask from position_ids.
    ref = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    shift_labels=batch["labels"], use_cache=False)
    ref.loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    ctx = RingpackContext(batch["cu_seqlens"], group=group, strategy=strategy, window_size=_window(cfg, 0))
    out = model(**model_inputs(batch, ctx))
    out.loss.backward()
    sum_grads(model, group)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, out.logits[0].detach(), group=group)
    logits = ringpack.unshard(parts, ctx.plan())
    errors = {f"{name}/loss": rel_err(loss, ref.loss), f"{name}/logits": rel_err(logits, ref.logits[0]),
              # one plan per distinct mask for the whole step, however many layers ran (0 when reused)
              f"{name}/extra_plans": float(len(ctx.plans) - len({(True, _window(cfg, i)) for i in range(2)}))}
    errors.update({f"{name}/grad/{n}": e for n, e in grad_errors(model, ref_grads).items()})
    return errors


def _window(cfg, layer: int) -> tuple[int, int]:
    """The (left, right) window transformers applies at ``layer`` of ``cfg``."""
    sliding = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if sliding is None or (types is not None and types[layer] != "sliding_attention"):
        return (-1, -1)
    return (sliding - 1, -1)


def _expect_value_error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def _error_cases(batch, group) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, attention_dropout=0.1), attn_implementation="ringpack")
    ctx = RingpackContext(batch["cu_seqlens"], group=group)
    inputs = model_inputs(batch, ctx)
    n = inputs["input_ids"].shape[1]
    model.train()
    dropout = _expect_value_error(lambda: model(**inputs))
    model.eval()
    padded = _expect_value_error(lambda: model(**inputs, attention_mask=torch.cat(
        [torch.ones(1, n - 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)], 1)))
    no_context = _expect_value_error(lambda: model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]))
    two_rows = _expect_value_error(lambda: model(input_ids=inputs["input_ids"].expand(2, -1),
                                                 position_ids=inputs["position_ids"].expand(2, -1),
                                                 ringpack_context=ctx))
    return {"dropout": dropout, "padded": padded, "no_context": no_context, "two_rows": two_rows}


def _job():
    register()
    group = dist.group.WORLD
    batch = _batch()
    errors = {}
    for name, (cfg, strategy) in _configs().items():
        errors.update(_compare(name, cfg, strategy, batch, group))
    return {"errors": max_over_ranks(errors, group), "raised": _error_cases(batch, group),
            "all_ones_mask_ok": _all_ones_mask_ok(batch, group)}


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


@pytest.mark.parametrize("model", list(_configs()))
def test_loss_and_every_gradient_match_one_process(job, model):
    """Loss, logits and every parameter gradient of a 2-rank step equal transformers' eager run on one process.

    Catches: a wrong mask (sliding window off by one, softcap dropped, documents leaking), labels shifted
    after sharding (loss differs), a lost rank-boundary label, a plan rebuilt per layer instead of once
    per mask (``extra_plans``), gradients not flowing through the ring. Tolerance: fp32, see ``TOL``.
    """
    errors = {k: v for k, v in job["errors"].items() if k.startswith(model + "/")}
    assert any("/grad/" in k for k in errors), f"no gradients compared for {model}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: relative error {errors[worst]:.3g} > {TOL}"


@pytest.mark.parametrize("case,words", [("dropout", "dropout"), ("padded", "attention_mask"),
                                        ("no_context", "ringpack_context"), ("two_rows", "one packed row")])
def test_unsupported_requests_raise(job, case, words):
    """Attention dropout, a padding mask, a multi-rank call without the batch context and a 2-row batch
    each raise a ValueError that says what to change, instead of computing the wrong attention."""
    message = job["raised"][case]
    assert message, f"{case}: no ValueError was raised"
    assert words in message, f"{case}: message does not mention {words!r}: {message}"


def test_all_ones_mask_is_accepted(job):
    """A 2-D mask with no padding (what tokenizers return) means the packed-causal mask: same logits as none."""
    assert job["all_ones_mask_ok"]


def test_one_process_takes_boundaries_from_position_ids_or_cu_seqlens():
    """Without a context, a one-process run reads the documents from position_ids, or from the
    cu_seq_lens_q/k kwargs, and matches eager attention; mismatched boundaries are a ValueError.
    Catches documents leaking into each other when no context is given. Tolerance: fp32, ``TOL``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    register()
    batch = _batch()
    cfg = LlamaConfig(**TINY)
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ringpack").eval()
    model.load_state_dict(reference.state_dict())
    ids, pos, cu = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
    with torch.no_grad():
        want = reference(input_ids=ids, position_ids=pos, use_cache=False).logits
        from_pos = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        # position_ids still feed the rotary embedding; the boundaries come from cu_seq_lens_q first.
        from_cu = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False).logits
        assert rel_err(from_pos, want) <= TOL
        assert rel_err(from_cu, want) <= TOL
        with pytest.raises(ValueError, match="cover"):
            model(input_ids=ids[:, :-1], cu_seq_lens_q=cu, use_cache=False)


@pytest.mark.parametrize("name", ["s_aux", "sinks", "position_bias", "head_mask", "alibi_slopes"])
def test_score_changing_inputs_are_refused(name):
    """Attention sinks (gpt-oss), score biases or head masks must raise, not be dropped from the softmax."""
    from ringpack.integrations.transformers import ringpack_attention_forward

    q = torch.zeros(1, 4, 8, 16)
    kv = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=f"{name} .* is not supported by ringpack"):
        ringpack_attention_forward(torch.nn.Module(), q, kv, kv, None, **{name: torch.zeros(4)})
