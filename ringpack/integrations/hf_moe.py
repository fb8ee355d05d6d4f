"""The router load-balancing loss of mixture-of-experts models, exact over a context-parallel group.

transformers' MoE causal LMs (``output_router_logits=True``) add ``router_aux_loss_coef * aux`` to the loss,
where for the ``L`` layers' router logits of all ``R`` (layer, token) rows and ``E`` experts::

    aux = E * sum_e (C_e / R) * (P_e / R)     C_e: top-k assignments to expert e, P_e: sum of its router probabilities

Both factors are means over the whole pack, so a rank that computes ``aux`` from its own tokens adds a
different loss, and the sum over ranks is not the pack's (nor are the router gradients). ``C`` does not
carry gradients, so ``aux`` is linear in every rank's ``P``: with ``C`` and ``R`` summed over the group,
rank ``r``'s share ``E * sum_e (C_e / R) * (P_re / R)`` adds up over the ranks to ``aux``, value and gradient.

:func:`exact_aux_loss` replaces the model's per-rank term with that share. It first recomputes the model's
own value from the rank's router logits; a model whose auxiliary loss is another formula is refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringpack.integrations.context import RingpackContext

RTOL = 1e-3  # the recomputed local aux must match the model's to this (fp32 sums in another order; bf16 softmax)


def exact_aux_loss(model: torch.nn.Module, output, context: RingpackContext) -> None:
    """Make ``output.loss`` and ``output.aux_loss`` this rank's share of the pack's values (in place).

    ``output`` is a transformers MoE output with ``router_logits`` (per layer ``[.., E]``, this rank's tokens)
    and ``aux_loss``. Collective over ``context.group``: every rank of it must call this for the same forward.
    """
    config = model.config
    coef = float(getattr(model, "router_aux_loss_coef", getattr(config, "router_aux_loss_coef", 0.0)))
    top_k = getattr(model, "num_experts_per_tok", getattr(config, "num_experts_per_tok", None))
    layers = [g for g in (output.router_logits or ()) if g is not None]
    if top_k is None or not layers:
        raise ValueError("this model returns a router auxiliary loss, but ringpack cannot find its router logits "
                         "or top-k (config.num_experts_per_tok) to make it exact over the context-parallel group; "
                         "set output_router_logits=False or router_aux_loss_coef=0")
    experts = layers[0].shape[-1]
    counts, probs, rows = _statistics(layers, experts, int(top_k))
    local = experts * torch.sum((counts / rows) * (probs / rows))
    model_aux = output.aux_loss.detach().float()
    agrees = rows == 0 or torch.allclose(local.detach(), model_aux.to(local.device), rtol=RTOL, atol=1e-6)
    mismatch = 0.0 if agrees else 1.0  # a rank without tokens has no aux of its own to compare
    totals = torch.cat([counts, probs.detach(), torch.stack([rows, torch.tensor(mismatch, device=rows.device)])])
    dist.all_reduce(totals, group=context.group)  # counts, probabilities, rows, mismatches over the group
    if totals[-1] > 0:
        raise ValueError(f"this model's router auxiliary loss is not the load-balancing loss ringpack can make exact "
                         f"over ranks (recomputed {float(local):.6g}, model {float(model_aux):.6g} on at least one "
                         "rank); set output_router_logits=False or router_aux_loss_coef=0")
    all_counts, all_rows = totals[:experts], totals[-2]
    share = experts * torch.sum((all_counts / all_rows) * (probs / all_rows))
    if output.loss is not None:
        output.loss = output.loss - coef * output.aux_loss.to(output.loss.dtype) + coef * share.to(output.loss.dtype)
    output.aux_loss = share


def _statistics(layers: list[torch.Tensor], experts: int, top_k: int):
    """Top-k assignment counts ``[E]``, router probability sums ``[E]`` (differentiable) and the row count."""
    device = layers[0].device
    counts = torch.zeros(experts, dtype=torch.float32, device=device)
    probs = torch.zeros(experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in layers:
        weights = torch.softmax(logits.reshape(-1, experts).to(device), dim=-1)
        chosen = torch.topk(weights, top_k, dim=-1).indices
        counts = counts + torch.nn.functional.one_hot(chosen.reshape(-1), experts).sum(0).float()
        probs = probs + weights.float().sum(0)
        rows = rows + weights.shape[0]
    return counts, probs, rows
