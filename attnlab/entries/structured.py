"""Structured sparsity (MECHANISMS.md section 2): every entry is a mask and/or score modifier run
by the one block-sparse executor (:mod:`attnlab.patterns.executor`).

Each entry's ``formula`` states the exact rule; ``causal=True`` always ANDs ``j <= i`` on top.
"""
from __future__ import annotations

import torch

from ..catalogue import PATTERNS, Call, Mechanism, Param, register
from ..patterns import executor as ex
from ..patterns import mods, sequence as seq, spatial as sp
from ..patterns.neighborhood import neighborhood as na_mask, simulate_tiles
from .exact import SCORE_MOD

SELF = ("noncausal_self", "causal_self")


def _with_score(mask_fn, score_fn=None):
    """spec(call) = (mask_fn(call), score_fn(call) + the call's extra score_mod)."""

    def spec(call: Call):
        score = score_fn(call) if score_fn else None
        extra = call.params.get("score_mod")
        if extra is not None:
            score = extra if score is None else score + extra
        return (mask_fn(call) if mask_fn else None), score

    return spec


def structured(name, paper, summary, formula, mask_fn=None, score_fn=None, *, params=(), patterns=PATTERNS,
               layout="sequence", spatial_dims=(1, 2, 3), check=None, examples=({},), extras=None):
    """Register a masked mechanism with the shared executor backends."""
    return register(Mechanism(
        name=name, family="structured", paper=paper, summary=summary, formula=formula, layout=layout,
        patterns=patterns, params=tuple(params) + (SCORE_MOD,), impls=ex.MASKED_IMPLS,
        spec=_with_score(mask_fn, score_fn), check_params=check, examples=examples, spatial_dims=spatial_dims,
        extras=extras or {},
    ))


def _fail(call: Call, msg: str):
    raise ValueError(f"{call.mechanism.name}: {msg}")


# ---------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------
structured(
    "sliding_window", "Longformer / Mistral sliding window; FreeSwim; BASED; AllMem",
    "Each query sees the keys within `window` positions",
    "visible iff |i - j| < window (causal: i - window < j <= i, the last `window` keys incl. self)",
    lambda c: seq.sliding_window(c.params["window"]),
    params=(Param("window", "int", 512, "keys within this distance are visible", ge=1),),
    examples=({"window": 5}, {"window": 1}),
)

structured(
    "sink_window", "Efficient Streaming Language Models with Attention Sinks (StreamingLLM); DuoAttention; SinkLoRA",
    "Attention sinks (first tokens) always visible plus a recent window",
    ("visible iff j < sinks or |i - j| < window (causal: sinks plus the last `window` keys incl. self, "
     "StreamingLLM's generation-path rule; its perplexity script keeps one more)"),
    lambda c: seq.sink_window(c.params["sinks"], c.params["window"]),
    params=(Param("sinks", "int", 4, "number of initial tokens always visible", ge=0),
            Param("window", "int", 512, "recent window size", ge=1)),
    examples=({"sinks": 2, "window": 4}, {"sinks": 0, "window": 3}),
)


def _check_s2(call: Call):
    g = call.params["group_size"] or call.kv_len // 4
    if call.params["group_size"] is None and g < 2:
        _fail(call, f"the default group_size (L // 4) needs L >= 8, got L = {call.kv_len}; pass group_size")
    if g > call.kv_len:
        _fail(call, f"group_size must be <= the sequence length {call.kv_len}, got {g}")
    if call.params["cyclic"] and call.kv_len % g:
        _fail(call, f"cyclic shifting needs the sequence length ({call.kv_len}) to be a multiple of group_size ({g})")


structured(
    "shifted_sparse", "LongLoRA (Chen et al. 2024) S2-Attn; SinkLoRA",
    "Attention within token groups; half of the heads use groups shifted by half a group",
    ("group(p) = p // G for heads h < H/2; for h >= H/2: (p + G/2) // G (LongLoRA's flash path: the first "
     "and last half-groups are separate), or with cyclic=True ((p - G/2) mod L) // G (its roll path: they join). "
     "visible iff group(i) == group(j). G defaults to L // 4 (LongLoRA). Causal calls apply j <= i on original "
     "positions, so the roll path's known leak (first half-group seeing the last) is not reproduced"),
    lambda c: seq.shifted_sparse(c.params["group_size"] or c.kv_len // 4, c.q_heads, c.params["cyclic"]),
    params=(Param("group_size", "int", None, "tokens per group (default L // 4)", ge=2, optional=True),
            Param("cyclic", "bool", False, "wrap the shifted groups around (LongLoRA's roll implementation)")),
    patterns=SELF, check=_check_s2,
    examples=({"group_size": 8}, {"group_size": 6, "cyclic": False}, {"group_size": 10, "cyclic": True}, {}),
    # The groups depend on L when group_size is left to default (L // 4) or wraps (cyclic): a prefix is then
    # a different mechanism, so CAB's prefix check does not apply (the perturbation check still does).
    extras={"prefix_check": lambda p: ("group_size defaults to L // 4, so a prefix has other groups"
                                       if p.get("group_size") is None else
                                       "cyclic groups wrap around modulo L" if p.get("cyclic") else None),
            "example_length": 40},  # a multiple of the cyclic example's group_size
)


def _s2_mask(c: Call):
    p = c.params
    step = p["head_step"] or max(1, p["vert_stride"] // c.kv_heads)
    return seq.head_sharded(p["block_size"], p["local_blocks"], p["vert_stride"], step, p["head_offset"],
                            c.q_heads // c.kv_heads)


structured(
    "head_sharded", "S2-Attention: Sparsely-Sharded Attention (DKernel)",
    "Each head attends to a different strided shard of key blocks plus local blocks; union covers the context",
    ("r = i // block_size, c = j // block_size, g = kv head of h. visible iff (c + g*head_step + head_offset) % "
     "vert_stride == 0 or |r - c| < local_blocks (DKernel's 'absolute' layout; head_step defaults to "
     "max(1, vert_stride // kv_heads) so kv_heads >= vert_stride shards cover every block)"),
    _s2_mask,
    params=(Param("block_size", "int", 64, "tokens per block", ge=1),
            Param("local_blocks", "int", 16, "local blocks kept by every head (incl. the query's own)", ge=1),
            Param("vert_stride", "int", 8, "a head sees one key block in every vert_stride", ge=1),
            Param("head_step", "int", None, "shard offset between consecutive kv heads", ge=1, optional=True),
            Param("head_offset", "int", 0, "shard offset of kv head 0", ge=0)),
    examples=({"block_size": 4, "local_blocks": 2, "vert_stride": 3}, {"block_size": 2, "local_blocks": 1,
                                                                       "vert_stride": 2, "head_offset": 1}),
)


def _check_strided(call: Call):
    if call.params["summary"] > call.params["stride"]:
        _fail(call, f"summary must be <= stride ({call.params['stride']}), got {call.params['summary']}")


structured(
    "strided", "Generating Long Sequences with Sparse Transformers (Child et al. 2019)",
    "Sparse Transformer factorized pattern: local band plus strided (or fixed summary) columns",
    ("strided: visible iff |i - j| < stride or (i - j) % stride == 0; fixed: visible iff i // stride == j // stride "
     "or j % stride >= stride - summary (openai/sparse_attention; both heads' patterns merged in one)"),
    lambda c: seq.strided(c.params["stride"], c.params["mode"], c.params["summary"]),
    params=(Param("stride", "int", 128, "local band width / stride l", ge=1),
            Param("mode", "choice", "strided", "which factorization", choices=("strided", "fixed")),
            Param("summary", "int", 1, "fixed mode: summary columns c at the end of each block", ge=1)),
    check=_check_strided,
    examples=({"stride": 4}, {"stride": 5, "mode": "fixed", "summary": 2}),
)

structured(
    "prefix_lm", "UniLM / T5 prefix LM; LongCA-bench mask set",
    "Bidirectional attention over a prefix, causal after it",
    "visible iff j < prefix or j <= i (the mask contains its causal part: call with causal=False)",
    lambda c: seq.prefix_lm(c.params["prefix"]),
    params=(Param("prefix", "int", 0, "length of the bidirectional prefix", ge=0),),
    patterns=("noncausal_self",),
    examples=({"prefix": 5}, {"prefix": 0}),
)


def _lengths_param(c: Call, what: str, total: int):
    return seq.lengths_from(c.params[f"{what}_lengths"], c.params[f"{what}_offsets"], total, what, c.mechanism.name)


def _check_doc(call: Call):
    _lengths_param(call, "document", call.kv_len)


structured(
    "document", "Packed variable-length sequences (FlashAttention varlen); LongCA-bench",
    "Block-diagonal attention over documents packed into one sequence",
    ("doc(p) = index of the document containing p; visible iff doc(i) == doc(j). Documents are given as lengths "
     "or cu_seqlens-style offsets and must cover the sequence exactly"),
    lambda c: seq.document(_lengths_param(c, "document", c.kv_len)),
    params=(Param("document_lengths", "ints", None, "lengths of the packed documents", ge=1, optional=True),
            Param("document_offsets", "ints", None, "cu_seqlens offsets: 0, l1, l1+l2, ..., L", ge=0,
                  optional=True)),
    patterns=SELF, check=_check_doc,
    examples=({"document_lengths": (10, 20, 7)}, {"document_offsets": (0, 1, 30, 37)}),
    extras={"example_length": 37},
)


def _segment_mask(c: Call):
    return seq.segment_stream(c.params["segment_lengths"], c.params["target_lengths"])


def _check_segments(call: Call):
    src, tgt = call.params["segment_lengths"], call.params["target_lengths"]
    total = sum(src) + (sum(tgt) if tgt else 0)
    if total != call.kv_len:
        _fail(call, f"segment_lengths{' + target_lengths' if tgt else ''} must sum to the sequence length "
                    f"{call.kv_len}, got {total}")
    if tgt is not None and len(tgt) != len(src):
        _fail(call, f"target_lengths needs one entry per segment ({len(src)}), got {len(tgt)}")


structured(
    "segment_stream", "Think While Watching (segment-level streaming causal mask)",
    "Causal over segments, full inside a segment; optional per-segment output stream",
    ("source segments S_0..S_n-1 then (optional) target segments T_0..T_n-1. Source token i sees source j iff "
     "seg(j) <= seg(i). Target token i of T_t sees source j iff seg(j) <= t, and target j iff j <= i; source "
     "never sees target"),
    _segment_mask,
    params=(Param("segment_lengths", "ints", None, "lengths of the input (source) segments", ge=1),
            Param("target_lengths", "ints", None, "lengths of the per-segment outputs, packed after the sources",
                  ge=1, optional=True)),
    patterns=("noncausal_self",), check=_check_segments,
    examples=({"segment_lengths": (10, 20, 7)}, {"segment_lengths": (8, 9, 5), "target_lengths": (5, 6, 4)}),
    extras={"example_length": 37},
)


def _check_alibi(call: Call):
    s = call.params["slopes"]
    if s is not None and (s.dim() != 1 or s.shape[0] != call.q_heads):
        _fail(call, f"slopes must have shape ({call.q_heads},) (one per query head), got {tuple(s.shape)}")


structured(
    "alibi", "Train Short, Test Long: ALiBi (Press et al. 2022)",
    "Linear distance penalty per head added to the scores",
    "s_ij - m_h |i - j|; m_h = 2^(-8(h+1)/H) (non-powers of two: the paper's interleaving)",
    None, lambda c: mods.alibi(c.q_heads, c.params["slopes"]),
    params=(Param("slopes", "tensor", None, "per-head slopes (default: the paper's geometric sequence)",
                  optional=True),),
    check=_check_alibi,
)


def _check_relbias(call: Call):
    t = call.params["table"]
    if t.dim() != 2 or t.shape[0] != call.q_heads or t.shape[1] % 2 != 1:
        _fail(call, f"table must have shape ({call.q_heads}, 2*max_distance + 1), got {tuple(t.shape)}")


structured(
    "relative_bias", "Self-Attention with Relative Position Representations (Shaw et al.); RCMHA",
    "Learnable per-head bias indexed by clipped relative distance",
    "s_ij + T[h, clip(j - i, -M, M) + M] with T of shape (H, 2M + 1); T receives gradients",
    None, lambda c: mods.relative_bias(c.params["table"]),
    params=(Param("table", "tensor", None, "bias table (H, 2M + 1)"),),
    check=_check_relbias,
    examples=({"table": lambda heads: torch.randn(heads, 9)},),
)

structured(
    "softcap", "Gemma 2 / Grok logit soft-capping",
    "Scores squashed into (-cap, cap) by tanh",
    "s_ij -> cap * tanh(s_ij / cap)",
    None, lambda c: mods.softcap(c.params["cap"]),
    params=(Param("cap", "float", 30.0, "soft cap", ge=1e-6),),
    examples=({"cap": 2.0},),
)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
def _na_check(call: Call):
    p = call.params
    for a, n in enumerate(call.shape):
        k, s, d = p["kernel_size"][a], p["stride"][a], p["dilation"][a]
        if k * d > n:
            _fail(call, f"kernel_size * dilation must be <= the axis size on every axis; axis {a}: {k} * {d} > {n}")
        if s > k:
            _fail(call, f"stride must be <= kernel_size on every axis; axis {a}: stride {s} > kernel_size {k}")
    if call.causal and p["is_causal"] is not None and not all(p["is_causal"]):
        _fail(call, "causal=True makes every axis causal; leave is_causal unset or use causal=False with is_causal")


def _na_mask(c: Call):
    p = c.params
    axes = c.ndim
    is_causal = (True,) * axes if c.causal else (p["is_causal"] or (False,) * axes)
    return na_mask(p["kernel_size"], p["stride"], p["dilation"], is_causal, c.shape)


_NA_PARAMS = (
    Param("kernel_size", "int", 7, "window size per axis", ge=1, per_axis=True),
    Param("stride", "int", 1, "queries per stride group sharing one window (GNA); 1 = sliding, kernel = blocked",
          ge=1, per_axis=True),
    Param("dilation", "int", 1, "dilation per axis (DiNA)", ge=1, per_axis=True),
    Param("is_causal", "bool", None, "causal per axis (with causal=False); causal=True makes all axes causal",
          per_axis=True, optional=True),
)

_NA_FORMULA = ("per axis (NATTEN 0.21): dilation group x % d, coordinate c = x // d, group size n_g; non-causal "
               "leader = min((c//s)*s + s//2, n_g-1), window [start, start+k) with start = clamp(leader - k//2, 0, "
               "n_g - k), so every query sees exactly k keys; causal leader = min((c//s)*s + s-1, n_g-1), keys "
               "max(leader-k+1, 0) <= c_k <= c. Visible iff visible on every axis")

structured(
    "neighborhood", "Neighborhood Attention; Dilated Neighborhood Attention; Faster Neighborhood Attention (NATTEN)",
    "Each query attends to its k nearest neighbours per axis, windows clamped at the borders",
    _NA_FORMULA, _na_mask, params=_NA_PARAMS, patterns=SELF, layout="spatial", check=_na_check,
    examples=(((11,), {"kernel_size": 3}), ((6, 7), {"kernel_size": (3, 5), "dilation": (2, 1)}),
              ((4, 5, 6), {"kernel_size": 3, "is_causal": (True, False, False)}), ((9,), {"kernel_size": 4,
                                                                                         "dilation": 2})),
    extras={"simulator": simulate_tiles},
)

structured(
    "gna", "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light",
    "Neighborhood attention with a stride: groups of `stride` queries share the window of their centre query",
    _NA_FORMULA + ". stride = kernel_size gives blocked attention, stride = 1 sliding NA",
    _na_mask, params=_NA_PARAMS, patterns=SELF, layout="spatial", check=_na_check,
    examples=(((12,), {"kernel_size": 4, "stride": 2}), ((6, 8), {"kernel_size": (3, 4), "stride": (3, 2)}),
              ((4, 5, 6), {"kernel_size": (2, 3, 4), "stride": (2, 3, 4)})),
    extras={"simulator": simulate_tiles},
)


structured(
    "window", "Swin Transformer (window attention); MaxViT block attention",
    "Non-overlapping windows: attention inside each window",
    "visible iff coord_i // w == coord_j // w on every axis (border windows of non-divisible grids are smaller)",
    lambda c: sp.window(c.params["window_size"]),
    params=(Param("window_size", "int", 7, "window size per axis", ge=1, per_axis=True),),
    patterns=("noncausal_self",), layout="spatial",
    examples=(((10,), {"window_size": 4}), ((6, 8), {"window_size": (3, 4)}), ((4, 4, 6), {"window_size": 2})),
)


def _shift(c: Call):
    ws, sh = c.params["window_size"], c.params["shift"]
    return sh if sh is not None else tuple(w // 2 for w in ws)


def _check_shift(call: Call):
    for a, (w, s) in enumerate(zip(call.params["window_size"], _shift(call))):
        if s >= w:
            _fail(call, f"shift must be < window_size on every axis; axis {a}: {s} >= {w}")


structured(
    "shifted_window", "Swin Transformer (shifted windows); RGA-Net DHA",
    "Windows shifted by `shift` (default half a window); the wrapped border windows stay separate",
    ("band(t) = (t + w - shift) // w per axis; visible iff band(coord_i) == band(coord_j) on every axis "
     "(timm's roll + region mask, on original positions)"),
    lambda c: sp.shifted_window(c.params["window_size"], _shift(c)),
    params=(Param("window_size", "int", 7, "window size per axis", ge=1, per_axis=True),
            Param("shift", "int", None, "shift per axis (default window_size // 2)", ge=0, per_axis=True,
                  optional=True)),
    patterns=("noncausal_self",), layout="spatial", check=_check_shift,
    examples=(((10,), {"window_size": 4}), ((8, 8), {"window_size": 4, "shift": (2, 1)})),
)

structured(
    "halo", "Scaling Local Self-Attention for Parameter Efficient Visual Backbones (HaloNet)",
    "Blocked local attention: a query block sees its block grown by a halo",
    ("B = coord_i // b; visible iff B*b - halo <= coord_j < (B+1)*b + halo on every axis. Halo positions outside "
     "the grid are masked (HaloNet/timm zero-pad them, adding keys of score 0 and value 0)"),
    lambda c: sp.halo(c.params["block_size"], c.params["halo_size"]),
    params=(Param("block_size", "int", 8, "query block size per axis", ge=1, per_axis=True),
            Param("halo_size", "int", 3, "halo width per axis", ge=0, per_axis=True)),
    patterns=("noncausal_self",), layout="spatial",
    examples=(((12,), {"block_size": 4, "halo_size": 1}), ((8, 8), {"block_size": 4, "halo_size": (1, 2)})),
)


def _check_grid(call: Call):
    for a, (n, g) in enumerate(zip(call.shape, call.params["grid_size"])):
        if n % g:
            _fail(call, f"every axis must be divisible by grid_size; axis {a}: {n} % {g} != 0")


structured(
    "grid", "MaxViT: Multi-Axis Vision Transformer (grid attention)",
    "Dilated global attention: tokens with the same offset inside their grid cell attend to each other",
    "stride S/G per axis; visible iff coord_i % (S/G) == coord_j % (S/G) on every axis (S divisible by G)",
    lambda c: sp.grid(c.params["grid_size"], c.shape),
    params=(Param("grid_size", "int", 7, "grid size G per axis", ge=1, per_axis=True),),
    patterns=("noncausal_self",), layout="spatial", check=_check_grid,
    examples=(((12,), {"grid_size": 3}), ((6, 8), {"grid_size": (2, 4)})),
)


def _check_tile3d(call: Call):
    if call.params["global_frames"] > call.shape[0]:
        _fail(call, f"global_frames must be <= the number of frames {call.shape[0]}, got {call.params['global_frames']}")


structured(
    "tile3d", "Efficient-vDiT: Efficient Video Diffusion Transformers With Attention Tile",
    "Video (T, H, W): each frame attends to itself and to k global reference frames (k:(T-k) tile mask)",
    ("f = frame of a token; visible iff f(i) == f(j) or f(j) < k or f(i) < k (the first k latent frames are global "
     "rows and columns; inferred from the paper's figure and sparsity table, the official code being unavailable)"),
    lambda c: sp.tile3d(c.params["global_frames"]),
    params=(Param("global_frames", "int", 1, "global reference frames k", ge=0),),
    patterns=("noncausal_self",), layout="spatial", spatial_dims=(3,), check=_check_tile3d,
    examples=(((4, 3, 3), {"global_frames": 1}), ((5, 2, 3), {"global_frames": 2})),
)
