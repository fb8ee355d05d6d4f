"""``torch_flash``: PyTorch's built-in varlen FlashAttention-2 kernels, called through their aten ops.

Legend: ``q_NHD`` local queries, ``k_MKD``/``v_MKD`` the source rank's keys/values (``K`` KV heads);
``lse_HN`` fp32. One wave runs as one varlen call per distinct window of its trimmed tiles
(``layout.varlen_groups``); each call spans the wave's whole query hull, rows it does not compute
come back as out 0, lse +inf, so several calls combine with one add and one minimum.

Kernel facts relied on (torch 2.11): causal and windows are bottom-right aligned per sequence; a
sequence with no key gives out 0 and lse +inf; GQA needs no repeated heads; the backward reads
``out`` only through ``rowsum(dout * out)``, which is how the gradient of the lse enters (below).
"""

from __future__ import annotations

import functools

import torch

from ringpack.backends import layout
from ringpack.backends.base import AttnSpec, Backend, cuda_reasons
from ringpack.merge import accumulation_dtype
from ringpack.schedule import Wave

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync (pinned staging, non-blocking copy) on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def cumulative(lengths) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@functools.lru_cache(maxsize=4096)
def cu_seqlens_on(group: layout.VarlenGroup, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 ``cu_seqlens_q`` and ``cu_seqlens_k`` of a varlen call on ``device``, staged once.

    A plan is reused by every layer of a step, so each group's tables are copied to the device once
    instead of twice per call (a pinned staging copy each, host time that a small ring step feels).
    """
    return tuple(staged(torch.tensor(cumulative(lens), dtype=torch.int32), device)
                 for lens in (group.q_lens, group.k_lens))


def gathered_keys(k_hull: torch.Tensor, group: layout.VarlenGroup) -> torch.Tensor:
    """The key buffer of one varlen group: a view when contiguous, else the concatenated runs."""
    if group.k_runs is None:
        return k_hull[group.k_offset:group.k_offset + group.total_k]
    return torch.cat([k_hull[s:s + n] for s, n in group.k_runs])


def scatter_keys_(dst_hull: torch.Tensor, src: torch.Tensor, group: layout.VarlenGroup) -> None:
    """Add a group's key gradients back into the key hull (runs may overlap: each adds)."""
    if group.k_runs is None:
        dst_hull[group.k_offset:group.k_offset + group.total_k] += src
        return
    pos = 0
    for s, n in group.k_runs:
        dst_hull[s:s + n] += src[pos:pos + n]
        pos += n


def lse_adjusted_out(out_NHD: torch.Tensor, dout_NHD: torch.Tensor, dlse_HN: torch.Tensor) -> torch.Tensor:
    """``out'`` with ``rowsum(dout * out') = rowsum(dout * out) - dlse`` per row and head.

    The flash backward computes ``ds = p * (dp - rowsum(dout * out))``; the gradient of the lse adds
    ``p * dlse``, so shifting ``out`` along ``dout`` by ``dlse / |dout|^2`` makes the same kernel exact.
    Rounding ``out'`` to 16 bits perturbs the row sum by about ``eps * (|out||dout| + |dlse|)``, the
    size of the kernel's own rounding. A row with ``dout = 0`` and ``dlse != 0`` gets NaN (visible).
    """
    acc = accumulation_dtype(out_NHD.dtype)
    dout = dout_NHD.to(acc)
    norm = (dout * dout).sum(-1)  # [N, H]
    dlse = dlse_HN.t().to(acc)
    coef = torch.where(dlse == 0, torch.zeros_like(dlse), dlse / norm)
    return (out_NHD.to(acc) - coef[..., None] * dout).to(out_NHD.dtype)


def common_reasons(spec: AttnSpec, name: str, *, softcap: bool = False) -> list[str]:
    """What every fused 16-bit CUDA kernel here needs: a CUDA device, fp16/bf16, a head dim it was built for;
    and softcap support, unless the kernel has it (``softcap=True``)."""
    why = cuda_reasons(spec, DTYPES)
    if spec.head_dim > MAX_HEAD_DIM or spec.head_dim % 8:
        why.append(f"head_dim {spec.head_dim} is not a multiple of 8 up to {MAX_HEAD_DIM}")
    if spec.softcap and not softcap:
        why.append(f"{name} has no softcap")
    return why


class TorchFlashBackend(Backend):
    name = "torch_flash"
    grads_in_input_dtype = True

    def __init__(self) -> None:
        # The two aten ops, held here so that a test can put a float64 emulation in their place.
        self.fwd_op = getattr(torch.ops.aten, "_flash_attention_forward", None)
        self.bwd_op = getattr(torch.ops.aten, "_flash_attention_backward", None)

    def not_supported_reasons(self, spec: AttnSpec) -> list[str]:
        why = common_reasons(spec, self.name)
        if self.fwd_op is None or self.bwd_op is None:
            why.append("this torch has no aten::_flash_attention_forward/_backward")
        return why

    # One varlen call of each direction; a backend over another entry point to the same kernels overrides these.

    def varlen_fwd(self, q, k, v, g: layout.VarlenGroup, scale: float, softcap: float):
        """``(out, lse)`` of one varlen group; rows of key-less sequences come back as out 0, lse +inf."""
        return self.fwd_op(q, k, v, *cu_seqlens_on(g, q.device), g.max_q, g.max_k, 0.0, g.causal, False, scale=scale,
                           window_size_left=g.left, window_size_right=g.right)[:2]

    def varlen_bwd(self, dout, q, k, v, out, lse, g: layout.VarlenGroup, scale: float, softcap: float):
        """``(dq, dk, dv)`` of one varlen group, against the final ``out``/``lse``."""
        rng, unused = torch.empty(2, dtype=torch.int64, device=q.device), torch.empty(0, device=q.device)
        return self.bwd_op(dout, q, k, v, out, lse, *cu_seqlens_on(g, q.device), g.max_q, g.max_k, 0.0, g.causal, rng,
                           unused, scale=scale, window_size_left=g.left, window_size_right=g.right)

    def fwd(self, q_NHD, k_MKD, v_MKD, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        q, k_hull, v_hull = q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1]
        out = lse = None
        for g in layout.varlen_groups(wave):
            o, l_ = self.varlen_fwd(q, gathered_keys(k_hull, g), gathered_keys(v_hull, g), g, scale, softcap)
            # Rows this group does not compute are exactly 0 with lse +inf: add and take the minimum.
            out, lse = (o, l_) if out is None else (out.add_(o), torch.minimum(lse, l_))
        return out, lse.masked_fill_(lse == float("inf"), float("-inf"))

    def bwd(self, dout_NHD, q_NHD, k_MKD, v_MKD, out_NHD, lse_HN, dlse_HN, wave: Wave, *, scale, softcap):
        (q0, q1), (k0, k1) = wave.q_span, wave.k_span
        q, k_hull, v_hull = q_NHD[q0:q1], k_MKD[k0:k1], v_MKD[k0:k1]
        dout = dout_NHD[q0:q1].contiguous()
        out = out_NHD[q0:q1]
        if dlse_HN is not None:
            out = lse_adjusted_out(out, dout, dlse_HN[:, q0:q1])
        lse = lse_HN[:, q0:q1].contiguous()
        # Rows no tile of this wave computes may have lse -inf (they see nothing anywhere): the kernel never reads them.
        groups = layout.varlen_groups(wave)
        dq = dk = dv = None
        for g in groups:
            dq_g, dk_g, dv_g = self.varlen_bwd(dout, q, gathered_keys(k_hull, g), gathered_keys(v_hull, g), out, lse, g,
                                               scale, softcap)
            if len(groups) == 1 and g.k_runs is None and g.k_offset == 0 and g.total_k == k1 - k0:
                return dq_g, dk_g, dv_g  # the common case: one call covers both hulls exactly
            if dq is None:
                dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
                dk = torch.zeros(k_hull.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
                dv = torch.zeros_like(dk)
            dq += dq_g
            scatter_keys_(dk, dk_g, g)
            scatter_keys_(dv, dv_g, g)
        return dq, dk, dv
