"""Hugging Face transformers: ``attn_implementation="ringpack"`` through the public ``AttentionInterface``.

Importing this module registers ``"ringpack"`` (``register(name)`` registers it under another name). Per
training step, on every rank of the context-parallel group::

    model = prepare_model(AutoModelForCausalLM.from_config(cfg, attn_implementation="ringpack"))   # once
    ctx = RingpackContext.from_batch(batch, group=cp_group)     # the global pack; checks the group holds it
    loss = model(**model_inputs(batch, ctx)).loss               # this rank's share of the global loss

The context travels as the forward kwarg ``ringpack_context``: transformers hands a model's extra
forward kwargs to every attention call, so each layer gets the same per-batch object and the plan of
its mask is made once per batch (:class:`~ringpack.integrations.context.RingpackContext`). Without a
context, a one-rank job takes the boundaries from the ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs or
from ``position_ids`` and plans each call; a multi-rank job must pass the context, since a shard's own
positions cannot tell where the other ranks' documents end.

Models: those whose class routes attention through ``AttentionInterface`` (``_supports_attention_backend``:
Llama, Mistral, Qwen2/3 and their MoE variants, Gemma 1-3, Llama-4 text, ...). Others (Falcon, ...) cannot run
ringpack; :func:`from_config`, :func:`from_pretrained` and :func:`prepare_model` say so before transformers fails.

Legend: ``B`` batch rows (must be 1: one packed row), ``S`` local tokens, ``H``/``Hk`` heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ringpack.integrations.batch import packed_batch
from ringpack.integrations.context import RingpackContext
from ringpack.integrations.hf_masks import ATTENTION_LAYER_TYPES, LayerMask, layer_window, probe, read_mask
from ringpack.integrations.hf_moe import exact_aux_loss
from ringpack.packing import IGNORE_INDEX, count_targets, position_ids_to_cu_seqlens

NAME = "ringpack"
# Attention inputs that change the scores and that ringpack does not apply: refused, never dropped.
UNSUPPORTED_INPUTS = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "a score bias",
                      "head_mask": "a head mask", "alibi_slopes": "ALiBi slopes"}
PREPARED = "prepare_model"  # the mark a prepared model's forward leaves on the batch's context


def register(name: str = NAME) -> str:
    """Register ringpack under ``name`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    The mask hook builds no mask (documents come from the packing): it reads what transformers asks for each
    layer type (sliding window, chunked attention, overlays) into a ``LayerMask`` that the model hands to the
    attention layers, and rejects a padding mask instead of transformers dropping it.
    """
    AttentionInterface.register(name, ringpack_attention_forward)
    AttentionMaskInterface.register(name, ringpack_mask)
    return name


def ringpack_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                  use_vmap: bool = False, config=None, **kwargs) -> LayerMask:
    """transformers mask function: accept no mask or a 2-D mask without padding; return the layer's ``LayerMask``."""
    _check_mask(attention_mask)
    return read_mask(mask_function, local_size, use_vmap, config)


def model_inputs(batch: Mapping, context: RingpackContext, *, labels_shifted: bool | None = None) -> dict:
    """This rank's forward kwargs for a causal LM, from a global packed batch.

    The batch may come from ringpack's ``PackingCollator`` or from transformers' ``DataCollatorWithFlattening``
    (with or without ``return_flash_attn_kwargs``) or TRL's padding-free collator; the fields read and how
    labels are told apart are those of :func:`ringpack.integrations.batch.packed_batch`. Targets are shifted
    inside each document of the global pack, then sharded with the batch's plan, and go in as ``shift_labels``
    (and ``labels``; transformers then does not shift again). ``num_items_in_batch`` is the global target count,
    so each rank's loss is its share of the pack's mean loss and the ranks' gradients add up to the
    single-process gradient (all-reduce them with SUM over the group). ``use_cache=False``: no KV cache.
    """
    pack = packed_batch(batch, labels_shifted=labels_shifted)
    if tuple(pack["cu_seqlens"].tolist()) != context.cu_seqlens:
        raise ValueError("the batch's document boundaries differ from the context's; make the context from this "
                         "batch (RingpackContext.from_batch)")
    local = context.shard(pack)
    inputs = {k: v for k, v in local.items() if k != "cu_seqlens"}
    inputs.update(ringpack_context=context, use_cache=False)
    if "shift_labels" in pack:
        inputs["labels"] = local["shift_labels"]
        inputs["num_items_in_batch"] = count_targets(pack["shift_labels"], IGNORE_INDEX)
    return inputs


def ringpack_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: LayerMask | torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, sliding_window: int | None = None,
                               softcap: float | None = None, ringpack_context: RingpackContext | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, H, S, D]``, ``key/value [1, Hk, S, D]`` -> ``([1, S, H, D], None)``.

    The mask is per document, causal unless the module says ``is_causal = False``, with the sliding window and
    chunks of the layer's ``LayerMask`` (or the ``sliding_window`` kwarg when transformers built no mask):
    causal ``sliding_window=w`` means a query sees the ``w`` most recent keys of its document, itself included.
    """
    _check_inputs(query, key, dropout, kwargs)
    mask = attention_mask if isinstance(attention_mask, LayerMask) else None
    if mask is None:
        _check_mask(attention_mask)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    window = layer_window(mask, sliding_window, causal)
    chunk = mask.chunk_size if mask is not None else None
    context = ringpack_context if ringpack_context is not None else _one_rank_context(query.shape[2], kwargs)
    _check_model_state(module, context)
    if mask is not None:
        seen = kwargs.get("position_ids")
        layout = context.plan()
        probe(mask, layout, context.rank, layout.position_ids(context.rank) if seen is None else seen,
              causal=causal, window=window, chunk=chunk)
    query, key, value = _autocast(query, key, value)
    out_SHD = context.attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                causal=causal, window_size=window, softmax_scale=scaling,
                                softcap=float(softcap or 0.0), chunk_size=chunk)
    return out_SHD[None], None


def _autocast(*qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, q/k/v arrive in mixed dtypes (rotary embeddings upcast q and k): run in autocast's dtype."""
    device = qkv[0].device.type
    if len({t.dtype for t in qkv}) > 1 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) for t in qkv)
    return qkv


def _check_inputs(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> None:
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


def _check_model_state(module: torch.nn.Module, context: RingpackContext) -> None:
    """Refuse what a shard cannot compute alone: terms of the whole pack the model adds outside attention."""
    if context.world_size == 1:
        return
    config = getattr(module, "config", None)
    if getattr(config, "output_router_logits", False) and PREPARED not in context.marks:
        raise ValueError("this MoE model adds a router auxiliary loss over its input tokens, which ringpack makes "
                         "exact over the context-parallel group only for a prepared model: call "
                         "ringpack.integrations.transformers.prepare_model(model) once")
    # Llama-4's NoPE layers scale queries by a function of the row index (not of position_ids), which is 1
    # below floor_scale tokens; beyond, a shard would scale by its own row indices instead of the pack's.
    floor = getattr(module, "floor_scale", None)
    if getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True) \
            and floor is not None and context.cu_seqlens[-1] >= floor:
        raise ValueError(f"this layer scales queries by their row index in the packed row (attn_temperature_tuning "
                         f"of a NoPE layer), which differs from 1 from row {floor - 1} on; the pack has "
                         f"{context.cu_seqlens[-1]} tokens over {context.world_size} ranks, and a rank's shard does "
                         "not hold its rows' indices. Use packs shorter than floor_scale or attn_temperature_tuning="
                         "False")


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


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Check that ``model`` runs ringpack attention, and make its pack-wide loss terms exact over the group.

    Raises a ValueError for a model whose class does not call attention through ``AttentionInterface`` and
    for one built with another ``attn_implementation``. Installs (once) forward hooks that, in a multi-rank
    forward with a ``ringpack_context``, refuse layers that mix tokens outside attention (linear-attention or
    convolution layers: a shard would mix only its own tokens) and replace a MoE model's per-rank router
    auxiliary loss by this rank's share of the pack's (``hf_moe.exact_aux_loss``). Returns ``model``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    check_model_class(type(base))
    implementation = getattr(base.config, "_attn_implementation", None)
    if not isinstance(implementation, str) or implementation not in ALL_ATTENTION_FUNCTIONS.valid_keys() \
            or ALL_ATTENTION_FUNCTIONS[implementation] is not ringpack_attention_forward:
        raise ValueError(f"{type(base).__name__} runs attn_implementation={implementation!r}, not ringpack: build "
                         f"it with attn_implementation={NAME!r} (registered by importing "
                         "ringpack.integrations.transformers, or by its register()) or call "
                         f"model.set_attn_implementation({NAME!r})")
    if not getattr(base, "_ringpack_hooks", None):
        base._ringpack_hooks = (base.register_forward_pre_hook(_before_forward, with_kwargs=True),
                                base.register_forward_hook(_after_forward, with_kwargs=True))
    return model


def check_model_class(cls: type) -> None:
    """Raise a ValueError naming ``cls`` unless it routes attention through transformers' ``AttentionInterface``."""
    if not getattr(cls, "_supports_attention_backend", False):
        raise ValueError(f"{cls.__name__} does not call attention through transformers' AttentionInterface, so "
                         "ringpack cannot run inside it; ringpack runs models whose class sets "
                         "_supports_attention_backend (Llama, Mistral, Qwen2/3, Gemma, Mixtral, Llama-4, ...)")


def from_config(config, **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config(config, attn_implementation="ringpack")``, checked and prepared."""
    check_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    return prepare_model(AutoModelForCausalLM.from_config(config, attn_implementation=NAME, **kwargs))


def from_pretrained(name_or_path: str, **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(..., attn_implementation="ringpack")``, checked and prepared."""
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(name_or_path)
    check_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
    return prepare_model(AutoModelForCausalLM.from_pretrained(name_or_path, config=config, attn_implementation=NAME,
                                                              **kwargs))


def _before_forward(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    context = kwargs.get("ringpack_context")
    if context is None or context.world_size == 1:
        return
    other = sorted(set(getattr(model.config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES))
    if other:
        raise ValueError(f"{type(model).__name__} has {', '.join(other)} layers, which mix tokens outside attention: "
                         "on a context-parallel shard they would see only this rank's tokens. ringpack runs models "
                         f"whose layers are {', '.join(ATTENTION_LAYER_TYPES)} only")
    context.marks.add(PREPARED)


def _after_forward(model: torch.nn.Module, args: tuple, kwargs: dict, output):
    context = kwargs.get("ringpack_context")
    if context is None or context.world_size == 1:
        return output
    if getattr(output, "aux_loss", None) is not None and getattr(output, "router_logits", None) is not None:
        exact_aux_loss(model, output, context)
    return output


register()
