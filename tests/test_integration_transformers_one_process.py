"""transformers integration in one process: boundaries without a context, the masks transformers builds
(chunked attention computed, overlays refused), models that cannot run ringpack, and ``torch.compile``.

The reference is transformers' own ``eager`` attention (or each document run alone), in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from integration_utils import rel_err  # noqa: E402

import ringpack  # noqa: E402
from ringpack.integrations import RingpackContext  # noqa: E402
from ringpack.integrations.hf_masks import mask_keys  # noqa: E402
from ringpack.integrations.transformers import (  # noqa: E402
    from_config,
    model_inputs,
    prepare_model,
    ringpack_attention_forward,
    ringpack_mask,
)
from ringpack.packing import PackingCollator  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)
LENGTHS = (23, 1, 41, 9, 30)
TOL = 1e-5  # fp32, as in test_integration_transformers: any masking mistake is > 1e-3


def _batch(lengths=LENGTHS):
    gen = torch.Generator().manual_seed(0)
    return PackingCollator()([torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lengths])


def _pair(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ringpack").eval()
    model.load_state_dict(reference.state_dict())
    return reference, model


def test_one_process_takes_boundaries_from_position_ids_or_cu_seqlens():
    """Without a context, a one-process run reads the documents from position_ids, or from the
    cu_seq_lens_q/k kwargs, and matches eager attention; mismatched boundaries are a ValueError.
    Catches documents leaking into each other when no context is given. Tolerance: fp32, ``TOL``."""
    from transformers import LlamaConfig

    batch = _batch()
    reference, model = _pair(LlamaConfig(**TINY))
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
    q = torch.zeros(1, 4, 8, 16)
    kv = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=f"{name} .* is not supported by ringpack"):
        ringpack_attention_forward(torch.nn.Module(), q, kv, kv, None, **{name: torch.zeros(4)})


def test_chunked_attention_matches_eager_on_one_rank():
    """Llama-4's chunked layers (chunk 16, chunks counted from each document's start) give eager's logits.

    Catches the mask's ``local_size`` being dropped, which ran the chunked layers as plain causal attention
    (logits off by ~0.4 from position 16 on, on one rank already). Tolerance: fp32, ``TOL``."""
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(**TINY, head_dim=16, intermediate_size_mlp=128, attention_chunk_size=16,
                           num_local_experts=2, interleave_moe_layer_step=2, no_rope_layers=[1, 0])
    batch = _batch()
    reference, model = _pair(cfg)
    with torch.no_grad():
        want = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        context = RingpackContext.from_batch(batch).prepare(mask_keys(model.config))
        got = ringpack.unshard([model(**model_inputs(batch, context)).logits[0]], context.plan())
    assert (True, (-1, -1), 16) in context.plans, "the chunked layer did not ask for its chunked plan"
    assert rel_err(got, want[0]) <= TOL


def _layer_inputs(batch, heads=4, kv_heads=2, dim=16):
    n = int(batch["cu_seqlens"][-1])
    q = torch.randn(1, heads, n, dim)
    kv = torch.randn(1, kv_heads, n, dim)
    return q, kv, RingpackContext.from_batch(batch, strategy="contiguous")


def test_bidirectional_overlay_is_refused_by_name():
    """An ``or_mask_function`` overlay (Gemma-3's bidirectional attention; image-token blocks use the same
    path) changes which keys a query sees; ringpack must refuse it by name, not drop it."""
    from transformers import Gemma3TextConfig

    _, model = _pair(Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8, use_bidirectional_attention=True))
    batch = _batch()
    with pytest.raises(ValueError, match="or_mask_function"):
        model(**model_inputs(batch, RingpackContext.from_batch(batch)))


def test_block_overlay_is_caught_by_the_probe():
    """Image-token blocks given as ``block_sequence_ids`` reach the mask function with no flag at all; the
    probe of transformers' mask predicate must catch them where they touch this rank's tokens."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    cfg = LlamaConfig(**TINY)
    cfg._attn_implementation = "ringpack"
    batch = _batch()
    blocks = torch.full_like(batch["input_ids"], -1)
    blocks[0, 3:9] = 0  # six "image" tokens inside the first document, bidirectional among themselves
    embeds = torch.zeros(1, batch["input_ids"].shape[1], 8)
    plain = create_causal_mask(cfg, embeds, None, None, position_ids=batch["position_ids"])
    overlaid = create_causal_mask(cfg, embeds, None, None, position_ids=batch["position_ids"],
                                  block_sequence_ids=blocks)
    q, kv, context = _layer_inputs(batch)
    module = torch.nn.Module()
    ringpack_attention_forward(module, q, kv, kv, plain, ringpack_context=context,
                               position_ids=batch["position_ids"])
    with pytest.raises(ValueError, match="differs from the per-document mask"):
        ringpack_attention_forward(module, q, kv, kv, overlaid, ringpack_context=context,
                                   position_ids=batch["position_ids"])


def test_mask_local_size_must_be_the_window_or_the_chunk():
    """A mask ``local_size`` that is neither the config's sliding window nor its chunk size, or is both, cannot
    be read unambiguously: refused instead of guessed."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**TINY)
    with pytest.raises(ValueError, match="neither"):
        ringpack_mask(1, 8, 8, local_size=5, config=cfg)
    cfg.sliding_window = cfg.attention_chunk_size = 5
    with pytest.raises(ValueError, match="both"):
        ringpack_mask(1, 8, 8, local_size=5, config=cfg)


def test_models_outside_attention_interface_fail_early():
    """Falcon builds its attention from its own table (a bare ``KeyError: 'ringpack'`` deep inside
    transformers); ``from_config`` names the model and says why first. A model built with another
    implementation is refused by ``prepare_model``, which says how to get ringpack attention."""
    from transformers import AutoModelForCausalLM, FalconConfig, LlamaConfig

    with pytest.raises(ValueError, match="FalconForCausalLM does not call attention through"):
        from_config(FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128))
    sdpa = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa', not ringpack.*register\(\)"):
        prepare_model(sdpa)


def test_compiled_model_has_no_graph_breaks_from_planning():
    """With the batch's plans made up front (``RingpackContext.prepare``), ``torch.compile`` of a model whose
    layers alternate two masks (Gemma-2) breaks no graph inside planning code. Catches plans made inside the
    compiled forward (``make_plan`` is host code: each call broke the graph). The ring call's own breaks
    belong to the ring and are not counted here."""
    import torch._dynamo as dynamo
    from transformers import Gemma2Config

    model = from_config(Gemma2Config(**TINY, head_dim=16, sliding_window=8))
    batch = _batch((23, 1, 41))
    context = RingpackContext.from_batch(batch).prepare(mask_keys(model.config))
    explanation = dynamo.explain(model)(**model_inputs(batch, context))
    planning = [r.reason.splitlines()[0] for r in explanation.break_reasons
                if any(f.name == "make_plan" for f in r.user_stack)]
    assert len(context.plans) == 2
    assert not planning, f"{len(planning)} graph breaks from planning: {planning}"
