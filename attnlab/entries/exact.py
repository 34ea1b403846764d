"""Exact softmax attention: ``dense`` (the oracle, SDPA fast path) and ``tiled`` (FlashAttention)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import tiled as _tiled
from ..catalogue import PATTERNS, Call, Implementation, Mechanism, Param, register
from ..patterns import executor as ex
from ..patterns.base import ScoreMod
from ..patterns.mods import softcap
from ..patterns.sequence import from_tensor
from ..reference import causal_mask

SCORE_MOD = Param("score_mod", "score", None, "extra score modifier (ALiBi, soft-capping, ...) composed on top",
                  optional=True)


def _bias_mod(bias: torch.Tensor) -> ScoreMod:
    def build(g):
        full = bias.expand(g.batch, g.heads, g.q_len, g.kv_len)
        return lambda s, b, h, q, kv: s + full[b, h, torch.clamp(q, max=g.q_len - 1), torch.clamp(kv, max=g.kv_len - 1)].to(s.dtype)

    return ScoreMod(f"bias{tuple(bias.shape)}", build, None, per_head=True, per_batch=True, tensors=(bias,))


def dense_spec(call: Call):
    """Mask / modifier of a dense call: a boolean ``mask``, a float ``mask`` or ``bias`` as additive bias."""
    mask, bias, extra = call.params["mask"], call.params["bias"], call.params["score_mod"]
    m = s = None
    if mask is not None:
        if mask.dtype == torch.bool:
            m = from_tensor(mask)
        else:
            s = _bias_mod(mask)
    if bias is not None:
        s = _bias_mod(bias) if s is None else s + _bias_mod(bias)
    if extra is not None:
        s = extra if s is None else s + extra
    return m, s


def _check_dense(call: Call):
    shape = (call.batch, call.q_heads, call.q_len, call.kv_len)
    for name in ("mask", "bias"):
        t = call.params[name]
        if t is None:
            continue
        if t.device != call.device:
            raise ValueError(f"dense: {name} must be on {call.device}, got {t.device}")
        if name == "bias" and not t.is_floating_point():
            raise TypeError(f"dense: bias must be a floating-point tensor, got {t.dtype}")
        if name == "mask" and not (t.dtype == torch.bool or t.is_floating_point()):
            raise TypeError(f"dense: mask must be boolean (True = attend) or floating (additive), got {t.dtype}")
        try:
            # broadcast_shapes is symmetric: also require that the result is (B, H, Lq, Lk) itself, so a
            # (.., Lk) bias given with a shorter key axis is rejected here rather than failing mid-kernel.
            ok = t.dim() <= 4 and tuple(torch.broadcast_shapes(t.shape, shape)) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"dense: {name} of shape {tuple(t.shape)} does not broadcast to (B, H, Lq, Lk) = {shape}")


def run_dense_sdpa(call: Call, q, k, v):
    """SDPA directly: ``is_causal`` when it means the same (self attention), else an explicit mask."""
    mask, bias = call.params["mask"], call.params["bias"]
    kw = dict(scale=call.scale, enable_gqa=call.q_heads != call.kv_heads)
    if mask is None and bias is None:
        if not call.causal:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        if call.q_len == call.kv_len:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    allowed = causal_mask(call.q_len, call.kv_len, q.device) if call.causal else None
    additive = None
    for t in (mask, bias):
        if t is None:
            continue
        if t.dtype == torch.bool:
            allowed = t if allowed is None else allowed & t
        else:
            additive = t.to(q.dtype) if additive is None else additive + t.to(q.dtype)
    if additive is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **kw)
    # SDPA takes one mask: fold the boolean part into the additive one; rows that see no key
    # would give NaN there, so zero them explicitly (the library's documented convention).
    if allowed is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive, **kw)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=additive.masked_fill(~allowed, float("-inf")), **kw)
    empty = ~allowed.any(-1, keepdim=True)
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


def _dense_sdpa_supports(call: Call) -> Optional[str]:
    if call.return_lse:
        return "scaled_dot_product_attention does not return the log-sum-exp"
    if call.params["score_mod"] is not None:
        return "scaled_dot_product_attention cannot apply a score modifier"
    return None


register(Mechanism(
    name="dense",
    family="exact",
    paper="Attention Is All You Need (Vaswani et al. 2017); CAB (Zhang et al. 2022)",
    summary="Scaled dot-product attention: MHA, GQA, MQA; boolean masks, additive bias; the oracle",
    formula=("o_i = sum_j softmax_j(scale * q_i.k_j + bias_ij)[mask_ij] v_j; scale = 1/sqrt(D); "
             "causal: j <= i + Lk - Lq; a row that sees no key is 0 (lse = -inf)"),
    layout="sequence",
    patterns=PATTERNS,
    params=(
        Param("mask", "tensor", None, "boolean (True = attend) or additive float mask, broadcastable to (B,H,Lq,Lk)",
              optional=True),
        Param("bias", "tensor", None, "additive float bias broadcastable to (B,H,Lq,Lk); receives gradients",
              optional=True),
        SCORE_MOD,
    ),
    impls=(
        Implementation("sdpa", run_dense_sdpa, _dense_sdpa_supports, doc="torch scaled_dot_product_attention"),
        ex.FLEX, ex.TILED, ex.REFERENCE,
    ),
    spec=dense_spec,
    check_params=_check_dense,
    # Conformance examples (callables get the number of query heads). Biases and masks vary along the key
    # axis (a per-row constant would cancel in the softmax); 37 = the conformance suite's key length.
    # The boolean mask hides key 0, so causal self row 0 sees no key at all (it must come out as zeros).
    examples=({}, {"bias": lambda heads: torch.randn(1, heads, 1, 37)},
              {"mask": lambda heads: (torch.rand(1, heads, 1, 37) > 0.25) & (torch.arange(37) > 0),
               "score_mod": softcap(5.0)},
              {"mask": lambda heads: torch.randn(1, heads, 1, 37)}),
))


def run_tiled_entry(call: Call, q, k, v):
    return _tiled.attention(q, k, v, causal=call.causal, scale=call.scale, block_q=call.params["block_q"],
                            block_k=call.params["block_k"], return_lse=True)


register(Mechanism(
    name="tiled",
    family="exact",
    paper="FlashAttention (Dao et al. 2022); FlashAttention-2 (Dao 2023)",
    summary="Exact attention by blocks with an online softmax: O(L) memory, returns LSE, mergeable partials",
    formula=("per query block: m' = max(m, rowmax(s)); l = l e^(m-m') + rowsum(e^(s-m')); "
             "acc = acc e^(m-m') + e^(s-m') V; o = acc / l; lse = m + log l. Backward recomputes tiles "
             "(dS = P (dP - rowsum(dO o) + dlse)). merge(partials): o = sum_p e^(lse_p - L) o_p, L = logsumexp lse_p"),
    layout="sequence",
    patterns=PATTERNS,
    params=(
        Param("block_q", "int", _tiled.DEFAULT_BLOCK, "queries per block", ge=1),
        Param("block_k", "int", _tiled.DEFAULT_BLOCK, "keys per block", ge=1),
    ),
    impls=(Implementation("tiled", run_tiled_entry, doc="FlashAttention-2 forward/backward in PyTorch"), ex.REFERENCE),
    examples=({}, {"block_q": 8, "block_k": 16}),
    extras={"merge": _tiled.merge},
))
