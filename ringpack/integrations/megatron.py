"""Megatron-core: a core-attention module for THD (packed) batches over the context-parallel group.

``RingpackCoreAttention`` has the constructor and forward signature of
``megatron.core.transformer.dot_product_attention.DotProductAttention`` and goes where that module goes
in a layer spec (``ringpack_layer_spec`` does the swap). It reads the document boundaries from
``PackedSeqParams`` (``qkv_format="thd"``) and the group from ``parallel_state`` (or the module's
``pg_collection``).

Token layout: Megatron's THD context parallelism pads every document to a multiple of ``2 * cp`` and
gives rank ``r`` chunks ``r`` and ``2*cp - 1 - r`` of each padded document; its rotary embedding assumes
exactly that. That is ringpack's ``"zigzag"`` plan over the *padded* boundaries, so that is the plan used,
and ``ringpack.shard(x, plan, rank)`` (or ``context.shard(batch)``) produces Megatron's layout. Padding
sits at the end of each document, so under a causal mask no real token sees it: exact. A non-causal
mask with padding is refused.

Legend: ``t`` local tokens, ``np`` local query heads, ``ng`` local KV groups, ``hn`` head dim.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from ringpack.integrations.context import RingpackContext
from ringpack.plan import validate_cu_seqlens

_CAUSAL = {AttnMaskType.causal: True, AttnMaskType.padding_causal: True, AttnMaskType.causal_bottom_right: True,
           AttnMaskType.no_mask: False, AttnMaskType.padding: False}


@dataclass
class RingpackPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` that also carries the batch's :class:`RingpackContext`, so every layer reuses its plans."""

    ringpack_context: RingpackContext | None = None


def packed_seq_params(cu_seqlens: Sequence[int] | torch.Tensor, *, cu_seqlens_padded=None, group=None,
                      backend: str = "auto") -> RingpackPackedSeqParams:
    """THD ``PackedSeqParams`` for a global pack, with its ringpack context (plans made once per batch).

    ``cu_seqlens`` are the real document boundaries; ``cu_seqlens_padded`` (default: the same) the padded
    ones, every padded length a multiple of ``2 * cp`` when ``cp > 1`` (Megatron's THD rule). ``group``
    defaults to ``parallel_state.get_context_parallel_group()``.
    """
    group = parallel_state.get_context_parallel_group() if group is None else group
    real = validate_cu_seqlens(cu_seqlens)
    padded = real if cu_seqlens_padded is None else validate_cu_seqlens(cu_seqlens_padded)
    context = _context(real, padded, group, backend)
    longest = max((b - a for a, b in zip(padded[:-1], padded[1:])), default=0)
    real_t, padded_t = torch.tensor(real, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32)
    return RingpackPackedSeqParams(qkv_format="thd", cu_seqlens_q=real_t, cu_seqlens_kv=real_t.clone(),
                                   cu_seqlens_q_padded=padded_t, cu_seqlens_kv_padded=padded_t.clone(),
                                   max_seqlen_q=longest, max_seqlen_kv=longest, cp_group=group,
                                   ringpack_context=context)


def _context(real: tuple[int, ...], padded: tuple[int, ...], group, backend: str) -> RingpackContext:
    if len(real) != len(padded):
        raise ValueError(f"cu_seqlens has {len(real) - 1} documents but cu_seqlens_padded has {len(padded) - 1}")
    context = RingpackContext(padded, group=group, strategy="zigzag", backend=backend)
    cp = context.world_size
    for d, (a, b, pa, pb) in enumerate(zip(real[:-1], real[1:], padded[:-1], padded[1:])):
        if pb - pa < b - a or (cp > 1 and (pb - pa) % (2 * cp)):
            raise ValueError(f"document {d}: {b - a} tokens padded to {pb - pa}; a padded length must be >= the "
                             f"real length and, with {cp} context-parallel ranks, a multiple of 2*cp = {2 * cp}")
    return context


def ringpack_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a GPT layer spec whose self-attention uses :class:`RingpackCoreAttention`."""
    spec = copy.deepcopy(spec)
    attention = getattr(getattr(spec, "submodules", None), "self_attention", None)
    if attention is None or not hasattr(getattr(attention, "submodules", None), "core_attention"):
        raise ValueError("ringpack_layer_spec expects a transformer layer spec with "
                         "submodules.self_attention.submodules.core_attention (e.g. get_gpt_layer_local_spec())")
    attention.submodules.core_attention = RingpackCoreAttention
    return spec


class RingpackCoreAttention(MegatronModule):
    """Ring attention as Megatron-core core attention (THD only; same signature as ``DotProductAttention``)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout={dropout} is not supported by ringpack (exact attention); set "
                             "TransformerConfig(attention_dropout=0.0)")
        if attn_mask_type not in _CAUSAL:
            raise ValueError(f"attn_mask_type {attn_mask_type.name} is not supported; supported: "
                             f"{', '.join(t.name for t in _CAUSAL)}")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by ringpack; supported: 'vanilla'")
        if getattr(config, "qk_clip", False):
            raise ValueError("qk_clip=True needs the attention logits' maxima, which ringpack does not report")
        self.attn_mask_type = attn_mask_type
        self.layer_number = max(1, layer_number)
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the scores back
        # before the softmax: no change to the result, so the plain scale is used.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            self.window_size = tuple(int(w) for w in config.window_size)
        else:
            self.window_size = (-1, -1)
        if pg_collection is not None and hasattr(pg_collection, "cp"):
            self.cp_group = pg_collection.cp
        else:
            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        """``query [t, np, hn]``, ``key/value [t, ng, hn]`` (THD, this rank's tokens) -> ``[t, np * hn]``."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            fmt = None if packed_seq_params is None else packed_seq_params.qkv_format
            raise ValueError(f"RingpackCoreAttention needs packed THD input (PackedSeqParams(qkv_format='thd')), "
                             f"got qkv_format={fmt!r}; build it with ringpack.integrations.megatron.packed_seq_params")
        if attention_mask is not None:
            raise ValueError("RingpackCoreAttention takes the mask from the packed boundaries; "
                             "pass attention_mask=None")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by ringpack")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in _CAUSAL:
            raise ValueError(f"attn_mask_type {mask_type.name} is not supported; supported: "
                             f"{', '.join(t.name for t in _CAUSAL)}")
        causal = _CAUSAL[mask_type]
        context = self._context(packed_seq_params, causal)
        window = self.window_size
        if window != (-1, -1) and causal:
            window = (window[0], -1)  # under a causal mask the right edge of the window is moot
        out = context.attention(query, key, value, causal=causal, window_size=window,
                                softmax_scale=self.softmax_scale, softcap=0.0)
        return out.reshape(out.shape[0], -1)

    def _context(self, params: PackedSeqParams, causal: bool) -> RingpackContext:
        context = getattr(params, "ringpack_context", None)
        real = validate_cu_seqlens(params.cu_seqlens_q)
        if context is None:  # a plain PackedSeqParams: plan this call (one host sync and plan per layer)
            if (params.cu_seqlens_kv is not None and validate_cu_seqlens(params.cu_seqlens_kv) != real) or (
                    params.cu_seqlens_kv_padded is not None and params.cu_seqlens_q_padded is not None
                    and validate_cu_seqlens(params.cu_seqlens_kv_padded)
                    != validate_cu_seqlens(params.cu_seqlens_q_padded)):
                raise ValueError("cu_seqlens_q and cu_seqlens_kv (or their padded forms) differ; ringpack computes "
                                 "self-attention over one pack")
            padded = real if params.cu_seqlens_q_padded is None else validate_cu_seqlens(params.cu_seqlens_q_padded)
            context = _context(real, padded, self.cp_group, "auto")
        if not causal and context.cu_seqlens != real:
            raise ValueError("a non-causal mask over padded documents would let tokens see the padding; pass "
                             "unpadded cu_seqlens or use a causal mask")
        return context
