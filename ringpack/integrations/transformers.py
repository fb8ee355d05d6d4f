"""Hugging Face transformers: ``attn_implementation="ringpack"`` through the public ``AttentionInterface``.

Usage, per training step on every rank of the context-parallel group::

    register()                                                  # once
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ringpack")
    ctx = RingpackContext(batch["cu_seqlens"], group=cp_group)  # the global pack's boundaries
    loss = model(**model_inputs(batch, ctx)).loss               # this rank's share of the global loss

The context travels as the forward kwarg ``ringpack_context``: transformers hands a model's extra
forward kwargs to every attention call, so each layer gets the same per-batch object and the plan of
its mask is made once per batch (:class:`~ringpack.integrations.context.RingpackContext`). Without a
context, a one-rank job takes the boundaries from the ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs or
from ``position_ids`` and plans each call; a multi-rank job must pass the context, since a shard's own
positions cannot tell where the other ranks' documents end.

Legend: ``B`` batch rows (must be 1: one packed row), ``S`` local tokens, ``H``/``Hk`` heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ringpack.integrations.context import RingpackContext
from ringpack.packing import IGNORE_INDEX, count_targets, position_ids_to_cu_seqlens

NAME = "ringpack"
# Attention inputs that change the scores and that ringpack does not apply: refused, never dropped.
UNSUPPORTED_INPUTS = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "a score bias",
                      "head_mask": "a head mask", "alibi_slopes": "ALiBi slopes"}


def register(name: str = NAME) -> str:
    """Register ringpack under ``name`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    The mask hook builds no mask (documents come from the packing); it exists so that a padding mask
    reaches ringpack and is rejected, instead of transformers dropping it for an implementation that
    has no mask function.
    """
    AttentionInterface.register(name, ringpack_attention_forward)
    AttentionMaskInterface.register(name, ringpack_mask)
    return name


def ringpack_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """transformers mask function: accept no mask or a 2-D mask without padding, and build none."""
    _check_mask(attention_mask)
    return None


def model_inputs(batch: Mapping[str, torch.Tensor], context: RingpackContext) -> dict:
    """This rank's forward kwargs for a causal LM, from a global packed batch (``PackingCollator`` output).

    Tokens are sharded with the batch's plan. The labels are already shifted per document, so they go in
    as ``shift_labels`` (transformers then does not shift again); ``num_items_in_batch`` is the global
    target count, so each rank's loss is its share of the global mean and the ranks' gradients add up
    to the single-process gradient (all-reduce them with SUM over the group). ``use_cache=False``: a
    training step has no use for a KV cache.
    """
    local = context.shard(batch)
    inputs = {"input_ids": local["input_ids"], "position_ids": local["position_ids"], "ringpack_context": context,
              "use_cache": False}
    if "labels" in local:
        inputs["labels"] = local["labels"]
        inputs["shift_labels"] = local["labels"]
        inputs["num_items_in_batch"] = count_targets(batch["labels"], IGNORE_INDEX)
    return inputs


def ringpack_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, sliding_window: int | None = None,
                               softcap: float | None = None, ringpack_context: RingpackContext | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, H, S, D]``, ``key/value [1, Hk, S, D]`` -> ``([1, S, H, D], None)``.

    The mask is per document, causal unless the module says ``is_causal = False``; ``sliding_window=w``
    means a query sees the ``w`` most recent keys of its document, itself included (transformers'
    convention), i.e. ``window_size=(w - 1, -1)``.
    """
    if dropout:
        raise ValueError(f"attention dropout={dropout} is not supported by ringpack (exact attention); set the "
                         "config's attention_dropout to 0.0 or run the model in eval mode")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported by ringpack: attention weights are never "
                         "materialised; use attn_implementation='eager' to inspect them")
    for name, what in UNSUPPORTED_INPUTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} ({what}) is not supported by ringpack attention: it would be ignored and the "
                             "result wrong; use another attn_implementation for this model")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"ringpack attention takes one packed row: query [1, heads, tokens, head_dim], got shape "
                         f"{tuple(query.shape)}; pack the batch with ringpack.packing.PackingCollator")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"ringpack attention computes self-attention over the packed tokens, but there are "
                         f"{key.shape[2]} keys for {query.shape[2]} queries (a KV cache?); call the model with "
                         "use_cache=False")
    _check_mask(attention_mask)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, -1 if causal else sliding_window - 1)
    context = ringpack_context if ringpack_context is not None else _one_rank_context(query.shape[2], kwargs)
    out_SHD = context.attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                causal=causal, window_size=window, softmax_scale=scaling, softcap=float(softcap or 0.0))
    return out_SHD[None], None


def _check_mask(attention_mask) -> None:
    """Accept no mask, or a 2-D padding mask that masks nothing; boundaries come from the packing, not a mask."""
    if attention_mask is None:
        return
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and bool(attention_mask.all()):
        return
    shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
    raise ValueError(f"ringpack attention takes the packed-causal mask from the document boundaries; got an "
                     f"attention_mask of shape {shape} that is not all ones. Pass attention_mask=None with "
                     "position_ids (or a RingpackContext) describing the packed documents, without padding")


def _one_rank_context(tokens: int, kwargs: dict) -> RingpackContext:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("ringpack attention in a multi-rank job needs the batch's context: pass "
                         "ringpack_context=RingpackContext(global cu_seqlens, group=...) to the model's forward "
                         "(see ringpack.integrations.transformers.model_inputs)")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        if cu_k is not None and not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ; ringpack computes self-attention over one pack")
        cu = cu_q
    elif kwargs.get("position_ids") is not None:
        cu = position_ids_to_cu_seqlens(kwargs["position_ids"])
    else:
        cu = [0, tokens]
    # The tokens arrive in global order, unsharded: "contiguous" is the one-rank plan that keeps that order.
    context = RingpackContext(cu, group=dist.group.WORLD if dist.is_available() and dist.is_initialized() else None,
                              strategy="contiguous")
    if context.cu_seqlens[-1] != tokens:
        raise ValueError(f"the document boundaries cover {context.cu_seqlens[-1]} tokens but the attention input "
                         f"has {tokens}")
    return context
