"""Probe the local kernels this machine offers: op signatures, return layouts, mask alignment, GQA.

Run on a GPU machine before trusting a backend there; writes one JSON of findings:

    python benchmarks/probe.py probe.json              # every probe
    python benchmarks/probe.py probe.json cudnn flash  # only these
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch


def _desc(x):
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "stride": list(x.stride()), "dtype": str(x.dtype), "device": str(x.device)}
    return repr(x)


def ref_attn(q, k, v, mask, scale):
    """q [Sq,H,D], k/v [Sk,Hk,D], mask [Sq,Sk] bool -> out [Sq,H,D] f64, lse [H,Sq]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1).double()
    v = v.repeat_interleave(g, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, v), lse


def main(path: str, only: tuple[str, ...] = ()) -> None:
    res: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": torch.cuda.device_count()}
    res["names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    H, Hk, D = 4, 2, 64
    scale = D ** -0.5

    def rnd(*s):
        return torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)

    def step(name, fn):
        if only and name not in only:
            return
        t = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - a probe records every failure
            res[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "tb": traceback.format_exc()[-1500:]}
        res[name + "_s"] = round(time.time() - t, 2)
        print(name, json.dumps(res[name])[:600], flush=True)

    # --- flash varlen: tall tile (q 100, k 10) with a band, plus a zero-key entry and a zero-query entry
    def flash():
        out = {}
        lens = [(100, 10), (7, 0), (0, 5), (30, 30)]
        cu_q = torch.tensor([0] + list(torch.tensor([a for a, _ in lens]).cumsum(0)), dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0] + list(torch.tensor([b for _, b in lens]).cumsum(0)), dtype=torch.int32, device=dev)
        tq, tk = int(cu_q[-1]), int(cu_k[-1])
        q, k, v = rnd(tq, H, D), rnd(tk, Hk, D), rnd(tk, Hk, D)
        for wl, wr, causal, maxk in ((-1, 20, False, 30), (-1, 20, False, 120), (-1, 0, True, 30), (5, 3, False, 30)):
            r = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 100, maxk, 0.0, causal, False,
                                                        scale=scale, window_size_left=wl, window_size_right=wr)
            o, lse = r[0], r[1]
            key = f"wl{wl}_wr{wr}_c{int(causal)}_maxk{maxk}"
            out[key + "_returns"] = [_desc(x) for x in r]
            errs = []
            for i, (a, b) in enumerate(lens):
                qa, ka = int(cu_q[i]), int(cu_k[i])
                if a == 0:
                    continue
                d = torch.arange(b, device=dev)[None] - torch.arange(a, device=dev)[:, None]
                hi = (b - a) + (0 if causal else wr) if (causal or wr >= 0) else 10 ** 9
                lo = (b - a) - wl if wl >= 0 else -10 ** 9
                mask = (d >= lo) & (d <= hi)
                ro, rl = ref_attn(q[qa:qa + a], k[ka:ka + b], v[ka:ka + b], mask, scale)
                errs.append({"entry": i, "out": float((o[qa:qa + a].double() - ro).abs().max()),
                             "lse_rows_noinf": float((lse[:, qa:qa + a].double() - rl).abs()
                                                     .nan_to_num(0, 0, 0).max()),
                             "lse_empty_vals": sorted({float(x) for x in lse[:, qa:qa + a][torch.isinf(rl)].cpu()})})
            out[key] = errs
        # backward with zero-length entries: are dq/dk/dv of gap rows zero?
        o, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 100, 30, 0.0, True, False,
                                                         scale=scale, window_size_left=-1, window_size_right=0)[:2]
        do = rnd(*o.shape)
        lse2 = torch.where(torch.isinf(lse), torch.full_like(lse, float("-inf")), lse)
        rng = torch.empty(2, dtype=torch.int64, device=dev)
        for name, lse_in in (("lse_inf", lse), ("lse_neginf", lse2)):
            dq, dk, dv = torch.ops.aten._flash_attention_backward(do, q, k, v, o, lse_in, cu_q, cu_k, 100, 30, 0.0,
                                                                  True, rng, torch.empty(0, device=dev), scale=scale,
                                                                  window_size_left=-1, window_size_right=0)
            out["bwd_" + name] = {"dq_gap_rows_absmax": float(dq[100:107].abs().max()),
                                  "dk_gap_rows_absmax": float(dk[10:15].abs().max()),
                                  "dv_gap_rows_absmax": float(dv[10:15].abs().max()),
                                  "finite": bool(torch.isfinite(dq).all() and torch.isfinite(dk).all()),
                                  "dtypes": [str(dq.dtype), str(dk.dtype)], "dk_shape": list(dk.shape)}
        return out

    step("flash", flash)

    def cudnn():
        out = {}
        for sq, sk, hk, causal in ((256, 256, H, True), (256, 384, H, False), (256, 256, Hk, True)):
            q = rnd(sq, H, D).unsqueeze(0).transpose(1, 2)
            k = rnd(sk, hk, D).unsqueeze(0).transpose(1, 2)
            v = rnd(sk, hk, D).unsqueeze(0).transpose(1, 2)
            key = f"q{sq}_k{sk}_hk{hk}_c{int(causal)}"
            try:
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                       scale=scale)
            except Exception as e:  # noqa: BLE001
                out[key] = f"fwd error {type(e).__name__}: {e}"[:500]
                continue
            out[key + "_returns"] = [_desc(x) for x in r]
            o, lse = r[0], r[1]
            mask = torch.ones(sq, sk, dtype=torch.bool, device=dev)
            if causal:
                mask = torch.arange(sk, device=dev)[None] <= torch.arange(sq, device=dev)[:, None]
            ro, rl = ref_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), mask, scale)
            out[key] = {"out": float((o[0].transpose(0, 1).double() - ro).abs().max()),
                        "lse": float((lse.reshape(H, sq).double() - rl).abs().max())}
            do = torch.randn_like(o)
            # the seed/offset the forward returned, or zeros with no sequence tables (as the cudnn backend calls it)
            zero = torch.zeros((), dtype=torch.int64, device=dev)
            variants = {"fwd_returns": (r[6], r[7], r[2], r[3]), "as_ringpack": (zero, zero, None, None)}
            for vname, (ps, po, cq, ck) in variants.items():
                for bias_name, bias in (("bias_none", None),):
                    try:
                        g3 = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                            do, q, k, v, o, lse, ps, po, bias, cq, ck, sq, sk, 0.0, causal, scale=scale)
                        out[f"{key}_bwd_{vname}_returns"] = [_desc(x) for x in g3]  # layouts of dq, dk, dv
                        qq = q.detach().double().requires_grad_()
                        kk = k.detach().double().requires_grad_()
                        vv = v.detach().double().requires_grad_()
                        ro2, _ = ref_attn(qq[0].transpose(0, 1), kk[0].transpose(0, 1), vv[0].transpose(0, 1),
                                          mask, scale)
                        gr = torch.autograd.grad((ro2 * do[0].transpose(0, 1).double()).sum(), (qq, kk, vv))
                        out[f"{key}_bwd_{vname}_{bias_name}"] = [float((a.double() - b).abs().max())
                                                                 for a, b in zip(g3, gr)]
                    except Exception as e:  # noqa: BLE001
                        out[f"{key}_bwd_{vname}_{bias_name}"] = f"error {type(e).__name__}: {e}"[:400]
        return out

    step("cudnn", cudnn)

    def cudnn_speed():
        S, Hq, Hkv, Dh = 8192, 32, 8, 128
        out = {}
        for hk in (Hkv, Hq):
            q = torch.randn(1, Hq, S, Dh, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hk, S, Dh, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hk, S, Dh, device=dev, dtype=torch.bfloat16)
            try:
                for _ in range(2):
                    torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(5):
                    torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
                torch.cuda.synchronize()
                dt = (time.perf_counter() - t) / 5
                out[f"hk{hk}_causal_fwd_tflops"] = 4 * S * S / 2 * Hq * Dh / dt / 1e12
            except Exception as e:  # noqa: BLE001
                out[f"hk{hk}"] = f"error {type(e).__name__}: {e}"[:300]
        qf = torch.randn(S, Hq, Dh, device=dev, dtype=torch.bfloat16)
        kf = torch.randn(S, Hkv, Dh, device=dev, dtype=torch.bfloat16)
        cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
        for _ in range(2):
            torch.ops.aten._flash_attention_forward(qf, kf, kf, cu, cu, S, S, 0.0, True, False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            torch.ops.aten._flash_attention_forward(qf, kf, kf, cu, cu, S, S, 0.0, True, False)
        torch.cuda.synchronize()
        out["flash_causal_fwd_tflops"] = 4 * S * S / 2 * Hq * Dh / ((time.perf_counter() - t) / 5) / 1e12
        return out

    step("cudnn_speed", cudnn_speed)

    def flex():
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
        fa = torch.compile(flex_attention, dynamic=True)
        out = {"has_from_kv_blocks": hasattr(BlockMask, "from_kv_blocks")}
        S = 1024
        q = rnd(1, H, S, D).requires_grad_()
        k = rnd(1, Hk, S, D).requires_grad_()
        v = rnd(1, Hk, S, D).requires_grad_()

        def causal(b, h, qi, ki):
            return ki <= qi

        bm = create_block_mask(causal, None, None, S, S, device=dev)
        t = time.time()
        r = fa(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, return_lse=True)
        out["returns"] = [_desc(x) for x in r] if isinstance(r, tuple) else _desc(r)
        o, lse = r
        out["fwd_compile_s"] = time.time() - t
        t = time.time()
        (o.float().sum() + lse.sum()).backward()
        out["bwd_compile_s"] = time.time() - t
        return out

    step("flex", flex)

    def ext():
        from ringpack import _ext
        if not _ext.available():
            return "extension not built"
        out_acc = torch.randn(50, 4, 3, 32, device=dev)[:, :, 1]
        lse_acc = torch.randn(4, 80, device=dev)[:, 10:60]
        out_b = rnd(50, 4, 32)
        lse_b = torch.randn(4, 50, device=dev)
        lse_b[0, :5] = float("-inf")
        lse_acc[0, :3] = float("-inf")
        a2, l2 = out_acc.clone(), lse_acc.clone()
        _ext.merge_(out_acc, lse_acc, out_b, lse_b)
        hi = torch.maximum(l2, lse_b)
        hi = torch.where(hi == float("-inf"), 0, hi)
        wa, wb = torch.exp(l2 - hi), torch.exp(lse_b - hi)
        tot = wa + wb
        ref_o = (a2 * (wa / tot).t()[..., None] + out_b.float() * (wb / tot).t()[..., None])
        ref_o = torch.where(tot.t()[..., None] > 0, ref_o, 0)
        return {"out": float((out_acc - ref_o).abs().max()),
                "lse": float((lse_acc - (hi + torch.log(tot))).abs().nan_to_num(0, 0, 0).max())}

    step("ext_merge", ext)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]))
