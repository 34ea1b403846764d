"""attnlab's C++ CPU kernels (``attnlab/csrc``), built on first use and cached.

Kernels, each the fused form of mathematics that also exists in PyTorch here (and is tested against
it); forward-only but for ``range_attention``, ``linear_chunks``, ``linear_noncausal``, ``aaren_scan``,
``rat_chunks``, ``rat_finals``, ``agent_noncausal`` and ``memory_chunks``, which have backward kernels
(:class:`RangeAttention`, :class:`attnlab.linear.Chunks`, :class:`attnlab.linear.NonCausal`, :class:`AarenScan`,
:class:`RatChunks`, :class:`RatFinals`, :class:`AgentNonCausal` and :class:`MemoryChunks`; first derivatives
only: a second one through them raises, torch's ``once_differentiable``, instead of coming out wrong):

``range_attention``  exact softmax attention where every query sees one or a few ranges of keys
                     (sliding windows, 1-D neighborhoods, causal, prefix-LM, documents, sinks
                     plus a window) and
``box_attention``    the same on a 2-D/3-D grid where every query sees one box of keys
                     (neighborhoods without dilation, windows): together the ``native``
                     implementation of mask-based mechanisms (:mod:`attnlab.patterns`).
``linear_chunks``    the causal chunked form of :mod:`attnlab.linear` (no decay, a per-head decay,
                     one gate per token or GLA's per-channel gates; the normalizer or InLine's
                     centred finish), walking the chunks of each (batch, head) with the state in
                     cache and applying elementwise or Taylor feature maps chunk by chunk.
``linear_noncausal`` the non-causal form without decay: the keys' state, then the queries' read-out
                     (raw, normalized, RALA's key weights or InLine's centred form).
``rat_chunks``       RAT's causal chunked form: each (batch, head) scans its tokens' gated summaries
                     and attends to the finished chunks' finals and its own summary in one pass
                     (``rat_finals``: the chunks' final summaries alone, for the non-causal form).
``agent_chunks``     agent attention's causal chunked form: per (batch, head) the agents' softmax
                     state walks the chunks, the logits never written out (``agent_noncausal``:
                     all keys into that state, then the queries' read-out).
``aaren_scan``       Aaren's outputs for one query, each (batch, head) walking its keys once as
                     the RNN with its (max, sum, weighted sum) state.
``memory_chunks``    the chunked form of Titans' neural memory (:mod:`attnlab.memory`): each
                     (batch, head) walks its chunks with the MLP's weights and momentum in cache.

All but ``box_attention`` do their GEMMs with the micro-kernel torch's own CPU attention uses
(oneDNN BRGEMM, through ATen; BLAS for a transposed operand); ``box_attention`` has register-blocked micro-kernels
of its own that read keys and values in place (tiles of a few queries waste less of a
neighbourhood than a GEMM's blocks). All run on torch's OpenMP thread pool. The module is
compiled with ``torch.utils.cpp_extension`` (a C++17 compiler and ninja are needed) into
``$ATTNLAB_NATIVE_DIR`` (default ``~/.cache/attnlab/native``), once per source change, torch
version and CPU capability; ``scripts/setup.sh`` builds it ahead (:func:`main`).
``ATTNLAB_NATIVE=0`` turns it off. When it cannot be built, :func:`unavailable` says why and every
caller falls back to the PyTorch path; nothing requires it.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

_SOURCES = ("bindings.cpp", "ranges.cpp", "boxes.cpp", "linear_chunks.cpp", "linear_backward.cpp", "memory.cpp",
            "rat.cpp", "aaren.cpp", "agent.cpp")
_STATE: dict = {}

#: Code generation per CPU capability torch reports (the kernels' own loops: exponentials,
#: masking, copies; the GEMMs dispatch at run time anyway).
_ARCH = {"AVX512": "-march=x86-64-v4", "AVX512_VNNI": "-march=x86-64-v4", "AVX512_BF16": "-march=x86-64-v4",
         "AMX": "-march=x86-64-v4", "AVX2": "-march=x86-64-v3"}


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def build_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_NATIVE_DIR", Path.home() / ".cache" / "attnlab" / "native"))


def module(verbose: bool = False):
    """The compiled module; builds it on first use. Raises ``RuntimeError`` when it cannot."""
    if "module" in _STATE:
        return _STATE["module"]
    if "error" in _STATE:
        raise RuntimeError(_STATE["error"])
    if os.environ.get("ATTNLAB_NATIVE", "1") == "0":
        raise RuntimeError("disabled by ATTNLAB_NATIVE=0")
    try:
        from torch.utils.cpp_extension import load

        cap = _capability()
        tag = f"torch{torch.__version__.replace('.', '_').replace('+', '_')}_{cap.lower()}"
        directory = build_dir() / tag
        directory.mkdir(parents=True, exist_ok=True)
        src = Path(__file__).parent / "csrc"
        # fast math (vectorized exp from glibc's vector library, contraction); the kernels keep NaN
        # rows NaN by integer tests where a max or a select could drop them (attnlab/csrc/simd.h)
        flags = ["-O3", "-ffast-math", "-fopenmp", "-std=c++17"] + ([_ARCH[cap]] if cap in _ARCH else [])
        _STATE["module"] = load(name=f"attnlab_native_{cap.lower()}", sources=[str(src / s) for s in _SOURCES],
                                extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(directory),
                                verbose=verbose)
    except Exception as e:  # compiler, ninja or headers missing; keep the reason, fall back
        _STATE["error"] = f"attnlab's C++ kernels could not be built: {type(e).__name__}: {str(e).strip()[:400]}"
        raise RuntimeError(_STATE["error"]) from e
    return _STATE["module"]


@contextlib.contextmanager
def disabled():
    """Within this block the kernels count as unavailable, so every caller takes its PyTorch path, as
    ``ATTNLAB_NATIVE=0`` makes them for a whole process: tests compare the two paths."""
    _STATE["off"] = _STATE.get("off", 0) + 1
    try:
        yield
    finally:
        _STATE["off"] -= 1


def unavailable() -> Optional[str]:
    """None when the kernels can be used, else why not (builds them on first call)."""
    if _STATE.get("off"):
        return "turned off by attnlab.native.disabled()"
    try:
        module()
    except RuntimeError as e:
        return str(e)
    return None


def unsupported(device, dtype, requires_grad: bool) -> Optional[str]:
    """None when the kernels serve tensors of this device and dtype (CPU, float32/float64, no
    autograd), else why not."""
    if torch.device(device).type != "cpu":
        return "the C++ kernels run on CPU"
    if dtype not in (torch.float32, torch.float64):
        return f"the C++ kernels take float32 or float64, got {dtype}"
    if requires_grad:
        return "the C++ kernels are forward-only (inputs require grad); use impl='tiled'"
    return unavailable()


def recording(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd records a call on these tensors (``None`` entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def serves(*tensors: Optional[torch.Tensor], backward: bool = False) -> bool:
    """True when the kernels serve these tensors (``None`` entries ignored): :func:`unsupported` for the
    first one's device and dtype, with autograd recording when any of them requires grad, unless the
    kernel to be called has a backward (``backward``)."""
    given = [t for t in tensors if t is not None]
    return unsupported(given[0].device, given[0].dtype, not backward and recording(*given)) is None


#: Query rows per work item and keys per online-softmax step of :func:`range_attention`. Measured
#: with the sliding window (w=512, causal) at L=8192 on this project's 2-core CPU: 64 rows beat 32
#: and 128 (less of the band's edge computed than with 128, bigger GEMMs than with 32).
BLOCK_Q, CHUNK = 64, 2048


def range_attention(q, k, v, start: torch.Tensor, end: torch.Tensor, scale: float):
    """``(out, lse)`` of softmax attention where query ``i`` sees keys ``start[i] <= j < end[i]``, or
    with ``(Lq, R)`` bounds the union of its ``R`` disjoint ranges (shared by every batch and head).
    q ``(B, H, Lq, D)``, k/v ``(B, Hkv, Lk, D|Dv)``. Differentiable (:class:`RangeAttention`'s backward
    kernel) when autograd records."""
    if recording(q, k, v):
        return RangeAttention.apply(q, k, v, start, end, float(scale))
    return tuple(module().range_attention(q, k, v, start, end, float(scale), BLOCK_Q, CHUNK))


class RangeAttention(torch.autograd.Function):
    """:func:`range_attention` with its backward kernel (FlashAttention-2's, over the same ranges; the
    gradient of ``lse`` too): ``apply(q, k, v, start, end, scale) -> (out, lse)``."""

    @staticmethod
    def forward(ctx, q, k, v, start, end, scale):
        out, lse = module().range_attention(q, k, v, start, end, scale, BLOCK_Q, CHUNK)
        ctx.save_for_backward(q, k, v, start, end, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, start, end, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = module().range_attention_backward(q, k, v, start, end, out, lse, dout, dlse, ctx.scale, BLOCK_Q,
                                                        CHUNK)
        B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
        if H != Hkv:  # per query head: each key/value head's group summed
            dk, dv = (x.view(B, Hkv, H // Hkv, *x.shape[2:]).sum(2) for x in (dk, dv))
        return dq, dk, dv, None, None, None


#: Largest union of key boxes one query tile of :func:`box_attention` may span for the ``native``
#: implementation to take a call (the kernel's score buffers grow with it); larger neighbourhoods use
#: the other implementations.
MAX_BOX_KEYS = 16384
#: Queries in one tile of :func:`box_attention` at most (its micro-kernels keep every query's
#: accumulators in registers), and the lanes of one of its vectors of keys (float32).
MAX_TILE, LANES = 8, 8


def _tile_unions(boxes: torch.Tensor, shape, tile) -> torch.Tensor:
    """``(tiles, 3)`` extents of the union of each query tile's boxes (0 where every box is empty);
    ``boxes`` ``(N, 6)`` as for :func:`box_attention`, raster order over ``shape``."""
    pad = (1,) * (3 - len(shape))
    shape3, tile3 = pad + tuple(shape), pad + tuple(tile)
    b = boxes.view(*shape3, 6)
    big = 1 << 40  # above any coordinate, and exact as the float F.pad takes
    nonempty = ((b[..., 3:] - b[..., :3]) > 0).all(-1)
    lo = torch.where(nonempty[..., None], b[..., :3], big)
    hi = torch.where(nonempty[..., None], b[..., 3:], -1)
    for a, t in enumerate(tile3):  # reduce each axis to one value per tile
        n = -(-shape3[a] // t) * t
        lo = torch.nn.functional.pad(lo.movedim(a, -1), (0, n - shape3[a]), value=big)
        hi = torch.nn.functional.pad(hi.movedim(a, -1), (0, n - shape3[a]), value=-1)
        lo = lo.unflatten(-1, (n // t, t)).amin(-1).movedim(-1, a)
        hi = hi.unflatten(-1, (n // t, t)).amax(-1).movedim(-1, a)
    return (hi - lo).clamp(min=0).reshape(-1, 3)


def box_union(boxes: torch.Tensor, shape, tile) -> int:
    """The most keys any query tile's union of boxes covers (``boxes`` ``(N, 6)`` as for
    :func:`box_attention`, raster order over ``shape``)."""
    return int(_tile_unions(boxes, shape, tile).prod(-1).max())


def box_tile(boxes: torch.Tensor, shape) -> tuple:
    """The query tile :func:`box_attention` runs these boxes with: of the tiles of at most
    :data:`MAX_TILE` queries, the one computing the fewest scores per query, counting whole vectors
    of :data:`LANES` keys along the last axis and weighing a tile of ``M`` queries by ``1 + 0.25/M``
    (each step of the scores kernel loads one value of every query: small tiles are bound by
    loads); tiles of fewer than 4 queries only where the grid has none bigger. Measured with 23x23
    (64x128 grid) and 8x8x8 (16x16x32) neighbourhoods: 2x2 fastest in 2-D (4x1, 4x2 and 3x2 within
    3-5%), 2x2x1 in 3-D (2x3x1 6% slower), 1x2 1.4x and 2x2x2 1.3x slower; the cost picks 2x2 and
    2x2x1."""
    import itertools

    n = len(shape)
    candidates = [t for t in itertools.product(range(1, MAX_TILE + 1), repeat=n)
                  if math.prod(t) <= MAX_TILE and all(a <= s for a, s in zip(t, shape))]
    biggest = max(math.prod(t) for t in candidates)
    best, best_cost = None, math.inf
    for t in candidates:
        M = math.prod(t)
        if M < min(4, biggest):
            continue
        ext = _tile_unions(boxes, shape, t).double()
        scores = ext[:, 0] * ext[:, 1] * torch.ceil(ext[:, 2] / LANES) * LANES
        cost = float(scores.mean()) * (1 + 0.25 / M)  # each query computes every score of its tile
        if cost < best_cost - 1e-9 or (abs(cost - best_cost) <= 1e-9 and M > math.prod(best)):
            best, best_cost = t, cost
    return best


def box_attention(q, k, v, boxes: torch.Tensor, shape, tile=None, scale: float = None):
    """``(out, lse)`` of softmax attention on a grid where query ``i`` sees the keys whose
    coordinates lie in ``[boxes[i, :3], boxes[i, 3:])`` (axes padded in front to three; shared by
    every batch and head). q ``(B, H, N, D)``, k/v ``(B, Hkv, N, D|Dv)`` in raster order over
    ``shape``. ``tile``: the query tile (at most :data:`MAX_TILE` queries; default
    :func:`box_tile`); ``scale`` defaults to ``D ** -0.5``."""
    tile = box_tile(boxes, shape) if tile is None else tuple(tile)
    if math.prod(tile) > MAX_TILE:
        raise ValueError(f"tile: at most {MAX_TILE} queries, got {tile}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return tuple(module().box_attention(q, k, v, boxes, list(shape), list(tile), float(scale)))


#: Feature maps :func:`linear_chunks` applies itself, chunk by chunk, by name (its ``feature`` codes):
#: see :func:`attnlab.linear.feature_map`.
LINEAR_FEATURES = ("identity", "elu+1", "relu", "taylor")


def linear_chunks(q, k, v, state: torch.Tensor, log_decay: Optional[torch.Tensor], chunk: int,
                  log_gates: Optional[torch.Tensor] = None, normalize_eps: Optional[float] = None,
                  feature: str = "identity", q_scale: float = 1.0, centre: Optional[tuple] = None,
                  feature_dim: int = 0, reverse: bool = False, strict: bool = False,
                  add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal chunked linear attention (see :func:`attnlab.linear.chunked`) of ``φ(q) · q_scale`` and
    ``φ(k)`` with ``φ`` one of :data:`LINEAR_FEATURES` (``taylor`` of the first ``feature_dim``
    channels), with a per-head decay or per-channel gates
    (``(B|1, H|1, L, F|1)``); ``state`` is updated in place. Returns the raw output, or with
    ``normalize_eps`` the normalized one ``num / (den + eps)`` (``state`` then has ``Dv + 1``
    columns, the last one the normalizer's, as :func:`attnlab.linear.with_ones` builds it), or with
    ``centre = (value_sum, scale, count)`` InLine's centred one (:func:`attnlab.linear.chunked_centred`;
    ``value_sum`` ``(B, H, Dv)`` is updated in place). For the raw output only: ``reverse`` reads the
    sequence backwards (the flipped inputs' causal form, flipped back: the anti-causal half of a
    bidirectional form), ``strict`` leaves each token's own pair out, ``add_to`` adds the output into
    that ``(B, H, L, Dv)`` tensor."""
    eps = None if normalize_eps is None else float(normalize_eps)
    vsum, cscale, count = centre if centre is not None else (None, 0.0, 0)
    return module().linear_chunks(q, k, v, state, log_decay, log_gates, int(chunk), eps,
                                  LINEAR_FEATURES.index(feature), int(feature_dim), float(q_scale), vsum, float(cscale),
                                  int(count), bool(reverse), bool(strict), add_to)


def linear_chunks_backward(q, k, v, state0: torch.Tensor, log_decay: Optional[torch.Tensor],
                           log_gates: Optional[torch.Tensor], dout: torch.Tensor, d_state: Optional[torch.Tensor],
                           chunk: int, out: Optional[torch.Tensor] = None, normalize_eps: Optional[float] = None,
                           feature: str = "identity", q_scale: float = 1.0, feature_dim: int = 0,
                           centre: Optional[tuple] = None, reverse: bool = False, strict: bool = False,
                           final_state: Optional[torch.Tensor] = None, gates_grad: bool = False):
    """The gradients ``(dq, dk, dv, d_state0)`` of :func:`linear_chunks` (without ``add_to``) for the
    output's gradient ``dout`` and the final state's ``d_state`` (None: zero);
    ``state0`` the initial state; with ``normalize_eps``, ``out`` the forward's output; with ``centre =
    (value_sum, scale, count)`` (the sum before the segment), that sum's gradient next; with ``gates_grad``
    the gates' gradient last (``final_state``: the forward's, needed with ``d_state``).
    See :class:`attnlab.linear.Chunks` for the gates' and the decay's."""
    eps = None if normalize_eps is None else float(normalize_eps)
    vsum, cscale, count = centre if centre is not None else (None, 0.0, 0)
    return tuple(module().linear_chunks_backward(q, k, v, state0, log_decay, log_gates, dout, d_state, int(chunk),
                                                 out, eps, LINEAR_FEATURES.index(feature), int(feature_dim),
                                                 float(q_scale), vsum, float(cscale), int(count), bool(reverse),
                                                 bool(strict), final_state, bool(gates_grad)))


def _writable(xs) -> list:
    """Contiguous copies of ``xs`` for a kernel that updates its state in place (the caller's stay as they are)."""
    return [x.clone(memory_format=torch.contiguous_format) for x in xs]


def memory_chunks(q, k, v, ws: list, g: list, coefficients, chunk: int, pos0: int, activation: str):
    """Titans' memory over one causal segment (see :func:`attnlab.memory.chunk`), chunk after chunk per
    (batch, head) with the weights in cache. ``ws``: per layer the stacked ``[W; S]`` ``(B, H, 2, in, out)``;
    ``g``: per layer the chunk-start weights ``(B, H, in, out)`` (read when ``pos0`` is inside a chunk;
    ``[]`` for ``chunk`` 1); ``coefficients``: :class:`attnlab.memory.Coefficients` of the segment's runs,
    ``(Bc, Hc, R, C[, C])`` (R = 1: the same for every run). Returns ``(out, ws, g)``: the output
    ``(B, H, L, Dv)`` and new ``[W; S]`` and chunk-start weights after the segment (the inputs are left
    as they are). Differentiable in ``q, k, v, ws, g`` (:class:`MemoryChunks`) when autograd records; the
    coefficients are constants here (rates that need gradients take the PyTorch path)."""
    from .memory import ACTIVATIONS  # the kernel's activation codes are their indices

    co = tuple(x.contiguous() for x in coefficients[:5])
    code = ACTIVATIONS.index(activation)
    if recording(q, k, v, *ws, *g):
        outs = MemoryChunks.apply(co, int(chunk), int(pos0), code, len(ws), q, k, v, *ws, *g)
        return outs[0], list(outs[1:1 + len(ws)]), list(outs[1 + len(ws):])
    ws, g = _writable(ws), _writable(g)
    return module().memory_chunks(q, k, v, ws, g, *co, int(chunk), int(pos0), code, False)[0], ws, g


class MemoryChunks(torch.autograd.Function):
    """:func:`memory_chunks` with its backward kernel (``csrc/memory.cpp``: the forward keeps each run's
    starting ``[W; S]``; the backward walks the runs in reverse, recomputing each run's gradients at G and
    its retrieval, the second-order terms through the memory's own gradient included):
    ``apply(coefficients, chunk, pos0, activation_code, depth, q, k, v, *ws, *g) -> (out, *ws, *g)``."""

    @staticmethod
    def forward(ctx, co, chunk, pos0, code, depth, q, k, v, *weights):
        ws0, g0 = weights[:depth], [x.contiguous() for x in weights[depth:]]
        ws, g = _writable(ws0), _writable(g0)
        out, *trace = module().memory_chunks(q, k, v, ws, g, *co, chunk, pos0, code, True)
        ctx.save_for_backward(q, k, v, *trace, *g0)
        ctx.co, ctx.chunk, ctx.pos0, ctx.code, ctx.depth = co, chunk, pos0, code, depth
        return (out, *ws, *g)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *grads):
        d = ctx.depth
        q, k, v, *saved = ctx.saved_tensors
        trace, g0 = saved[:d], saved[d:]
        dout = torch.zeros(*q.shape[:3], v.shape[3], dtype=q.dtype) if dout is None else dout
        d_ws = [torch.zeros(t.shape[:2] + t.shape[3:], dtype=t.dtype) if x is None else x
                for t, x in zip(trace, grads[:d])]
        d_g = [] if all(x is None for x in grads[d:]) else [torch.zeros_like(t) if x is None else x
                                                            for t, x in zip(g0, grads[d:])]
        res = module().memory_chunks_backward(q, k, v, trace, g0, *ctx.co, ctx.chunk, ctx.pos0, ctx.code, dout, d_ws,
                                              d_g)
        return (None,) * 5 + tuple(res)


def rat_finals(k, v, gk, gv, chunk: int):
    """RAT's final summary of every chunk (the last may be shorter), gates as :func:`rat_chunks`':
    ``(finals_k, finals_v)``, one (batch, head, chunk) per work item; differentiable (:class:`RatFinals`)
    when autograd records."""
    if recording(k, v, gk, gv):
        return RatFinals.apply(k, v, gk, gv, int(chunk))
    return tuple(module().rat_finals(k, v, gk, gv, int(chunk)))


class RatFinals(torch.autograd.Function):
    """:func:`rat_finals` with its backward kernel: each chunk's recurrence read backwards from its last row."""

    @staticmethod
    def forward(ctx, k, v, gk, gv, chunk):
        ctx.save_for_backward(k, v, gk, gv)
        ctx.chunk = chunk
        return tuple(module().rat_finals(k, v, gk, gv, chunk))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_fk, d_fv):
        k, v, gk, gv = ctx.saved_tensors
        n = -(-k.shape[2] // ctx.chunk)
        d_fk = k.new_zeros(*k.shape[:2], n, k.shape[3]) if d_fk is None else d_fk
        d_fv = v.new_zeros(*v.shape[:2], n, v.shape[3]) if d_fv is None else d_fv
        return (*module().rat_finals_backward(k, v, gk, gv, ctx.chunk, d_fk, d_fv), None)


def rat_chunks(q, k, v, gk, gv, past_k, past_v, carry_k, carry_v, chunk: int, pos0: int, scale: float):
    """RAT's causal chunked form over one segment (see :mod:`attnlab.entries.rat`): gates ``gk``
    ``(B, H, L, 1|D)``, ``gv`` ``(B, H, L, 1|Dv)``; ``past_k``/``past_v`` the finished chunks' final
    summaries before the segment, whose first token is at ``pos0``; ``carry_k``/``carry_v`` ``(B, H, D|Dv)``
    the running summary when ``pos0`` is inside a chunk. Returns ``(out, finals_k, finals_v, last_k,
    last_v)``: the finals after the segment (those of chunks ending in it appended) and the running
    summary after its last token."""
    if recording(q, k, v, gk, gv, past_k, past_v, carry_k, carry_v) and q.shape[2] > 0:
        return RatChunks.apply(q, k, v, gk, gv, past_k, past_v, carry_k, carry_v, int(chunk), int(pos0), float(scale))
    return tuple(module().rat_chunks(q, k, v, gk, gv, past_k, past_v, carry_k, carry_v, int(chunk), int(pos0),
                                     float(scale), None))


class RatChunks(torch.autograd.Function):
    """:func:`rat_chunks` with its backward kernel (``csrc/rat.cpp``: FlashAttention-2's backward over the
    finals and each row's own summary, then the gated recurrences read backwards): the same arguments and
    outputs, every floating input differentiable, the returned finals and last summary included."""

    @staticmethod
    def forward(ctx, q, k, v, gk, gv, past_k, past_v, carry_k, carry_v, chunk, pos0, scale):
        lse = q.new_empty(q.shape[:3])
        out, fin_k, fin_v, last_k, last_v = module().rat_chunks(q, k, v, gk, gv, past_k, past_v, carry_k, carry_v,
                                                                chunk, pos0, scale, lse)
        ctx.save_for_backward(q, k, v, gk, gv, carry_k, carry_v, out, fin_k, fin_v, lse)
        ctx.past, ctx.chunk, ctx.pos0, ctx.scale = past_k.shape[2], chunk, pos0, scale
        return out, fin_k, fin_v, last_k, last_v

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, d_fin_k, d_fin_v, d_last_k, d_last_v):
        q, k, v, gk, gv, carry_k, carry_v, out, fin_k, fin_v, lse = ctx.saved_tensors
        zero = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        grads = module().rat_chunks_backward(q, k, v, gk, gv, carry_k, carry_v, ctx.past, ctx.chunk, ctx.pos0,
                                             ctx.scale, out, fin_k, fin_v, lse, zero(dout, out), zero(d_fin_k, fin_k),
                                             zero(d_fin_v, fin_v), zero(d_last_k, carry_k), zero(d_last_v, carry_v))
        return (*grads, None, None, None)


def agent_noncausal(q, k, v, agents, scale: float, chunk: int) -> torch.Tensor:
    """Non-causal agent attention (cross lengths too): the agents' softmax over all keys (online, chunk
    by chunk), then each query's softmax over the agents; ``agents`` ``(B, H, n, D)``. Differentiable
    (:class:`AgentNonCausal`) when autograd records."""
    if recording(q, k, v, agents):
        return AgentNonCausal.apply(q, k, v, agents, float(scale), int(chunk))
    return module().agent_noncausal(q, k, v, agents, float(scale), int(chunk), False)[0]


class AgentNonCausal(torch.autograd.Function):
    """:func:`agent_noncausal` with its backward kernel (``csrc/agent.cpp``: from the forward's agents'
    softmax state (``n (Dv + 2)`` floats per head, saved), the queries' softmax's gradient, then the keys'):
    ``apply(q, k, v, agents, scale, chunk) -> out``."""

    @staticmethod
    def forward(ctx, q, k, v, agents, scale, chunk):
        out, saved = module().agent_noncausal(q, k, v, agents, scale, chunk, True)
        ctx.save_for_backward(q, k, v, agents, saved)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, agents, saved = ctx.saved_tensors
        return (*module().agent_noncausal_backward(q, k, v, agents, dout, saved, ctx.scale, ctx.chunk), None, None)


def aaren_scan(query, k, v, m, u, w, scale: float, causal: bool):
    """Aaren's outputs for one query per (batch, head) (see :mod:`attnlab.entries.aaren`), the keys
    walked once from the state ``(m, u, w)`` (``(B, H)``, ``(B, H)``, ``(B, H, Dv)``; ``u = 0``: empty).
    Returns ``(out, m, u, w)``: every prefix's output ``(B, H, L, Dv)`` (with ``causal=False`` the last one,
    ``(B, H, 1, Dv)``) and the state after the keys. Differentiable (:class:`AarenScan`) when autograd
    records."""
    if recording(query, k, v, m, u, w):
        return AarenScan.apply(query, k, v, m, u, w, float(scale), bool(causal))
    m, u, w = _writable((m, u, w))
    return module().aaren_scan(query, k, v, m, u, w, float(scale), bool(causal), None), m, u, w


class AarenScan(torch.autograd.Function):
    """:func:`aaren_scan` with its backward kernel (one reverse pass per (batch, head), see
    ``csrc/aaren.cpp``): ``apply(query, k, v, m0, u0, w0, scale, causal) -> (out, m, u, w)``, the
    state before the keys given and the one after returned (``m`` is a stabiliser: no gradient)."""

    @staticmethod
    def forward(ctx, query, k, v, m0, u0, w0, scale, causal):
        m, u, w = _writable((m0, u0, w0))
        trace = k.new_empty(*k.shape[:3], 2)  # each prefix's (max, sum) for the backward
        out = module().aaren_scan(query, k, v, m, u, w, float(scale), bool(causal), trace)
        ctx.save_for_backward(query, k, v, out, trace, m0, u0)
        ctx.scale, ctx.causal = float(scale), bool(causal)
        ctx.mark_non_differentiable(m)
        return out, m, u, w

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dm, du, dw):
        query, k, v, out, trace, m0, u0 = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        du = torch.zeros_like(u0) if du is None else du
        dw = out.new_zeros(out.shape[:2] + out.shape[3:]) if dw is None else dw
        dq, dk, dv, du0, dw0 = module().aaren_scan_backward(query, k, v, out, trace, dout, du, dw, m0, u0, ctx.scale,
                                                            ctx.causal)
        return dq, dk, dv, None, du0, dw0, None, None


def agent_chunks(q, k, v, agents, r, Z, U, scale: float, chunk: int):
    """Agent attention's causal chunked form (see :mod:`attnlab.entries.agent`): ``agents`` ``(B, H, n, D)``,
    the per-agent state ``r``, ``Z`` ``(B, H, n)`` and ``U`` ``(B, H, n, Dv)`` (contiguous, updated in place;
    ``Z = 0``: empty). Returns ``(out, ok)``; ``ok`` is False when a prefix's normalizer left the dtype's
    safe range (or a logit is NaN): ``out`` and the state are then incomplete."""
    return module().agent_chunks(q, k, v, agents, r, Z, U, float(scale), int(chunk))


def map_features(x: torch.Tensor, feature: str, feature_dim: int = 0) -> torch.Tensor:
    """``φ(x)`` over the last axis as the linear kernels apply it (one vectorized pass)."""
    return module().map_features(x, LINEAR_FEATURES.index(feature), int(feature_dim))


def linear_noncausal(q, k, v, chunk: int, normalize_eps: Optional[float] = None, feature: str = "identity",
                     q_scale: float = 1.0, feature_dim: int = 0, rala_scale: float = 0.0,
                     centred: bool = False, save: bool = False):
    """Non-causal linear attention without decay (see :func:`attnlab.linear.noncausal`; cross attention
    too): ``φ(q) · q_scale`` against ``φ(k)`` (with ``rala_scale > 0`` each key weighted by RALA's
    ``softmax_j(rala_scale · q̄·φ(k_j))``, :mod:`attnlab.entries.rala`),
    ``φ`` one of :data:`LINEAR_FEATURES` applied chunk by chunk; the raw output ``φ(q) S``, with
    ``normalize_eps`` ``num / (den + eps)``, or ``centred`` InLine's ``φ(q) (S - z ūᵀ) + ū``
    (:mod:`attnlab.entries.inline`; ``z = Σ φ(k)``, ``ū`` the mean value). With ``save``, ``(out, saved)``:
    ``saved`` the keys' state per (batch, head), which :func:`linear_noncausal_backward` takes instead of
    building it again."""
    eps = None if normalize_eps is None else float(normalize_eps)
    outs = module().linear_noncausal(q, k, v, int(chunk), eps, LINEAR_FEATURES.index(feature), int(feature_dim),
                                     float(q_scale), float(rala_scale), bool(centred), bool(save))
    return tuple(outs) if save else outs[0]


def linear_noncausal_backward(q, k, v, dout: torch.Tensor, saved: torch.Tensor, out: Optional[torch.Tensor],
                              chunk: int, normalize_eps: Optional[float] = None, feature: str = "identity",
                              q_scale: float = 1.0, feature_dim: int = 0, rala_scale: float = 0.0,
                              centred: bool = False):
    """The gradients ``(dq, dk, dv)`` of :func:`linear_noncausal` (RALA's weights, InLine's centring too) for
    the output's gradient ``dout`` (:class:`attnlab.linear.NonCausal`), from the forward's keys' state
    ``saved`` (``save=True``) and, normalized, output ``out`` (else None): no pass over the keys to build the
    state again."""
    eps = None if normalize_eps is None else float(normalize_eps)
    return tuple(module().linear_noncausal_backward(q, k, v, dout, int(chunk), eps, LINEAR_FEATURES.index(feature),
                                                    int(feature_dim), float(q_scale), float(rala_scale),
                                                    bool(centred), saved, out))


def main() -> int:
    """Build the kernels now and say where (``scripts/setup.sh`` runs it); exit status 1 when they
    cannot be built."""
    import sys

    try:
        module(verbose="-v" in sys.argv)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"attnlab native kernels ready in {build_dir()}")
    return 0
