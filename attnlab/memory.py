"""Titans' neural long-term memory: an MLP whose weights learn at test time (Behrouz et al. 2024/2025).

"Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv 2501.00663), section 3.
The memory ``M`` is an MLP without biases, ``depth`` layers, activation ``σ`` between layers::

    M(x) = σ(… σ(x W_1) W_2 …) W_depth          W_1: (D, h), …, W_depth: (h, Dv)   (depth 1: (D, Dv))

For every token ``t`` (key ``k_t``, value ``v_t``, query ``q_t``, rates ``θ_t >= 0``, ``η_t, α_t ∈ [0, 1]``)::

    ℓ(W; k, v) = ||M_W(k) - v||²                     the associative loss (section 3.1)
    u_t = ∇_W ℓ(W_{t'}; k_t, v_t)                     the "momentary surprise", at the chunk-start weights
    S_t = η_t S_{t-1} - θ_t u_t                       past surprise (momentum)
    W_t = (1 - α_t) W_{t-1} + S_t                     forgetting (weight decay)
    o_t = M_{W_t}(q_t)                                retrieval ("M*(q_t)", a read without a write)

``W_{t'}`` is the weights before the chunk of ``b`` tokens that contains ``t`` (chunks start at
multiples of ``b`` from the first token): section 3.2's mini-batch gradient descent, which makes a
chunk's gradients independent of each other. ``b = 1`` is plain online gradient descent
(``t' = t - 1``). Retrieval uses ``W_t``, the weights *after* token ``t``'s update: the paper reads the memory
once the token has been written (like linear attention's ``o_t = q_t S_t``), so a query can
recall its own token's pair. The recurrences are per layer and per weight (every matrix of
the MLP has its own ``S``).

Three computations of this one model, in float32 for half inputs (float64 stays float64):

- :func:`step` (recurrent form): one token through the state ``(W, S, G)``, ``G`` = the chunk-start
  weights ``W_{t'}``; ``G <- W`` after the last token of each chunk.
- :func:`chunk_explicit` (the parallel form's core): a run of tokens sharing ``G``; per-token
  gradients ``u_j = z_jᵀ δ_j`` materialized, then the two recurrences unrolled as sums,
  ``S_t = (Π_{m<=t} η_m) S + Σ_{j<=t} (Π_{j<m<=t} η_m)(-θ_j u_j)`` and
  ``W_t = (Π_{m<=t} (1-α_m)) W + Σ_{i<=t} (Π_{i<m<=t} (1-α_m)) S_i``, and every token's own weights
  applied to its query.
- :func:`chunk` (the chunked form's core): the same run without per-token weights. Substituting
  ``S_i`` into ``W_t`` gives ``W_t = A_t W + c_t S - Σ_j K_tj θ_j z_jᵀ δ_j`` with ``A_t = Π (1-α)``,
  ``c = R_α P_η``, ``K = R_α R_η`` (``R_x[t, j] = Π_{j<m<=t} x_m``, ``P_x[t] = Π_{m<=t} x_m``), so each
  layer's retrieval is attention-like: ``x W_t = A_t (x W) + c_t (x S) - ((x Zᵀ) ⊙ K θ) Δ`` (TTT's and
  the paper's matmul form).

The products are cumulative products of masked ``(n, n)`` matrices (no logarithms, no division), so
``η = 0`` or ``α = 1`` are exact and nothing overflows (every factor is in [0, 1]).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch

ACTIVATIONS = ("silu", "gelu", "tanh")
#: ℓ2-normalization floor of queries and keys (``x / max(||x||, eps)``).
NORM_EPS = 1e-6

Weights = List[torch.Tensor]  # one (B, H, in, out) tensor per layer


# --------------------------------------------------------------------------------------------
# The MLP
# --------------------------------------------------------------------------------------------
def layer_dims(d_in: int, d_out: int, depth: int, hidden: int) -> Tuple[Tuple[int, int], ...]:
    """``(in, out)`` of every layer: ``(D, h), (h, h), …, (h, Dv)``; depth 1 is ``(D, Dv)``."""
    sizes = (d_in,) + (hidden,) * (depth - 1) + (d_out,)
    return tuple(zip(sizes[:-1], sizes[1:]))


def param_count(dims: Sequence[Tuple[int, int]]) -> int:
    """Weights of one memory (one batch element and head): ``Σ in · out``."""
    return sum(a * b for a, b in dims)


def seeded_init(dims: Sequence[Tuple[int, int]], seed: int) -> Weights:
    """Deterministic initial weights: ``W_l ~ N(0, 1/in_l)`` from ``torch.Generator().manual_seed(seed)``,
    drawn in float64 on the CPU layer by layer (the same for every batch element and head)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(a, b, generator=gen, dtype=torch.float64) / math.sqrt(a) for a, b in dims]


def unflatten(flat: torch.Tensor, dims: Sequence[Tuple[int, int]]) -> Weights:
    """A ``(…, P)`` vector of all weights (layers concatenated, each row-major) -> ``(…, in, out)`` each."""
    out, at = [], 0
    for a, b in dims:
        out.append(flat[..., at:at + a * b].unflatten(-1, (a, b)))
        at += a * b
    return out


def act(name: str, a: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(a)
    if name == "gelu":  # exact (erf) GELU
        return torch.nn.functional.gelu(a)
    return torch.tanh(a)


def act_grad(name: str, a: torch.Tensor) -> torch.Tensor:
    """``σ'(a)``: silu ``s (1 + a (1 - s))``, s = sigmoid(a); gelu ``Φ(a) + a φ(a)``; tanh ``1 - tanh²``."""
    if name == "silu":
        s = torch.sigmoid(a)
        return s * (1 + a * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return 1 - torch.tanh(a) ** 2


def apply(W: Weights, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``M_W(x)`` for ``x`` (B, H, n, D) and weights (B, H, in, out)."""
    for i, w in enumerate(W):
        if i:
            x = act(activation, x)
        x = x @ w
    return x


def grads(W: Weights, k: torch.Tensor, v: torch.Tensor, activation: str) -> Tuple[List, List]:
    """Per-token gradients of ``||M_W(k_j) - v_j||²``, factored: ``∇_{W_l} = z_lᵀ δ_l`` (rank one).

    Returns ``(Z, Δ)``: ``Z[l]`` (B, H, n, in_l) the layer inputs, ``Δ[l]`` (B, H, n, out_l) the
    back-propagated errors ``δ_last = 2 (M(k) - v)``, ``δ_{l-1} = (δ_l W_lᵀ) ⊙ σ'(a_{l-1})``.
    """
    Z, pre, x = [], [], k
    for i, w in enumerate(W):
        if i:
            pre.append(x)
            x = act(activation, x)
        Z.append(x)
        x = x @ w
    delta = 2 * (x - v)
    D = [delta]
    for i in range(len(W) - 1, 0, -1):
        delta = (delta @ W[i].transpose(-1, -2)) * act_grad(activation, pre[i - 1])
        D.append(delta)
    return Z, D[::-1]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ℓ2-normalized rows ``x / max(||x||, NORM_EPS)`` (Titans section 4.4 normalizes queries and keys)."""
    return torch.nn.functional.normalize(x, dim=-1, eps=NORM_EPS)


# --------------------------------------------------------------------------------------------
# Products of the rates
# --------------------------------------------------------------------------------------------
def products(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``P[t] = Π_{m<=t} x_m`` (…, n) and ``R[t, j] = Π_{j<m<=t} x_m`` for ``t >= j``, 0 above (…, n, n)."""
    n = x.shape[-1]
    t = torch.arange(n, device=x.device)
    later = t[:, None] > t[None, :]  # entry (m, j): factor x_m belongs to R[., j] when m > j
    R = torch.where(later, x[..., :, None], torch.ones((), dtype=x.dtype, device=x.device)).cumprod(-2)
    R = torch.where(t[:, None] >= t[None, :], R, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.cumprod(-1), R


class Coefficients(NamedTuple):
    """What a run of ``n`` tokens sharing one ``G`` needs, leading dims broadcast like the rates."""

    keep_w: torch.Tensor  # A_t = Π_{m<=t} (1 - α_m)                      (…, n)
    keep_s: torch.Tensor  # P_η[t] = Π_{m<=t} η_m                            (…, n)
    from_s: torch.Tensor  # c_t = Σ_i R_α[t, i] P_η[i]                       (…, n)
    w_grad: torch.Tensor  # K[t, j] θ_j = Σ_i R_α[t, i] R_η[i, j] θ_j        (…, n, n)
    s_grad: torch.Tensor  # R_η[t, j] θ_j                                    (…, n, n)
    r_alpha: torch.Tensor  # R_α                                             (…, n, n)

    def select(self, dim: int, index: int) -> "Coefficients":
        return Coefficients(*(x.select(dim, index) for x in self))


def coefficients(theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor) -> Coefficients:
    """The unrolled recurrences' coefficients for rates of shape (…, n) (broadcast against each other)."""
    theta, eta, alpha = torch.broadcast_tensors(theta, eta, alpha)
    p_eta, r_eta = products(eta)
    p_keep, r_alpha = products(1 - alpha)
    th = theta[..., None, :]
    return Coefficients(p_keep, p_eta, (r_alpha @ p_eta[..., None])[..., 0], (r_alpha @ r_eta) * th,
                        r_eta * th, r_alpha)


# --------------------------------------------------------------------------------------------
# The three computations
# --------------------------------------------------------------------------------------------
def _col(x: torch.Tensor) -> torch.Tensor:
    """(…, n) -> (…, n, 1): a per-token factor against (…, n, features)."""
    return x[..., None]


def chunk(W: Weights, S: Weights, G: Weights, q, k, v, co: Coefficients, activation: str):
    """Chunked-form core: tokens ``0..n-1`` of one chunk (gradients at ``G``), from ``(W, S)``.

    Returns ``(o, W_n, S_n)``; per-token weights are never formed (module docstring).
    """
    Z, Dl = grads(G, k, v, activation)
    x = q
    for i in range(len(W)):
        a = (_col(co.keep_w) * (x @ W[i]) + _col(co.from_s) * (x @ S[i])
             - ((x @ Z[i].transpose(-1, -2)) * co.w_grad) @ Dl[i])
        x = act(activation, a) if i < len(W) - 1 else a
    last = lambda c: c[..., -1, None, None]  # noqa: E731  (the run's last token, as a (…, 1, 1) factor)
    W_new = [_update(last(co.keep_w) * w, z, co.w_grad[..., -1, :, None] * d, last(co.from_s), s)
             for w, s, z, d in zip(W, S, Z, Dl)]
    S_new = [_update(last(co.keep_s) * s, z, co.s_grad[..., -1, :, None] * d) for s, z, d in zip(S, Z, Dl)]
    return x, W_new, S_new


def _update(kept: torch.Tensor, z, d, b=None, s=None) -> torch.Tensor:
    """``kept + b s - zᵀ d`` accumulated into ``kept`` (a fresh tensor, broadcast to the batch and head
    dims of all terms): one pass over the weights per term instead of a temporary each (the weights
    are the chunked form's memory traffic)."""
    lead = torch.broadcast_shapes(kept.shape[:-2], z.shape[:-2], *([] if s is None else [s.shape[:-2]]))
    kept = kept.expand(*lead, *kept.shape[-2:]).contiguous()
    if s is not None:
        kept.addcmul_(s, b)
    flat = lambda x: x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])  # noqa: E731
    kept.view(-1, *kept.shape[-2:]).baddbmm_(flat(z.transpose(-1, -2)), flat(d), alpha=-1)
    return kept


def chunk_explicit(W: Weights, S: Weights, G: Weights, q, k, v, co: Coefficients, activation: str,
                   read: bool = True):
    """Parallel-form core: the same run with every token's gradient, momentum and weights materialized.

    ``u_j = z_jᵀ δ_j``; ``S_t`` and ``W_t`` by the unrolled sums of the module docstring; ``o_t = M_{W_t}(q_t)``.
    ``read=False`` skips the queries (and every ``W_t`` but the last): returns ``(None, W_n, S_n)``.
    """
    Z, Dl = grads(G, k, v, activation)
    Wt, S_new = [], []
    for w, s, z, d in zip(W, S, Z, Dl):
        u = (z[..., :, None] * d[..., None, :]).flatten(-2)  # (B, H, n, in·out): token j's gradient
        St = _col(co.keep_s) * s.flatten(-2)[..., None, :] - co.s_grad @ u  # S_t, flattened
        r_alpha = co.r_alpha if read else co.r_alpha[..., -1:, :]
        keep_w = co.keep_w if read else co.keep_w[..., -1:]
        Wt.append((_col(keep_w) * w.flatten(-2)[..., None, :] + r_alpha @ St).unflatten(-1, w.shape[-2:]))
        S_new.append(St[..., -1, :].unflatten(-1, s.shape[-2:]))
    W_new = [w[..., -1, :, :] for w in Wt]
    if not read:
        return None, W_new, S_new
    x = q
    for i, w in enumerate(Wt):  # token t through its own weights W_t
        if i:
            x = act(activation, x)
        x = (x[..., None, :] @ w)[..., 0, :]
    return x, W_new, S_new


def step(W: Weights, S: Weights, G: Weights, q_t, k_t, v_t, theta, eta, alpha, activation: str):
    """Recurrent form: one token ``(B, H, D)``; rates broadcast to ``(B, H)``. Returns ``(o_t, W, S)``."""
    Z, Dl = grads(G, k_t[:, :, None], v_t[:, :, None], activation)
    th, et, al = (_col(_col(r)) for r in (theta, eta, alpha))
    S = [et * s - th * (z.transpose(-1, -2) @ d) for s, z, d in zip(S, Z, Dl)]
    W = [(1 - al) * w + s for w, s in zip(W, S)]
    return apply(W, q_t[:, :, None], activation)[:, :, 0], W, S


__all__ = ["ACTIVATIONS", "NORM_EPS", "Coefficients", "act", "act_grad", "apply", "chunk", "chunk_explicit",
           "coefficients", "grads", "layer_dims", "normalize", "param_count", "products", "seeded_init", "step",
           "unflatten"]
