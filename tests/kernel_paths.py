"""Checks shared by the tests of the forward-only C++ kernels (titans, rat, aaren, agent's own): the
chunked form on the kernel (taken without autograd) against the entry's PyTorch path (taken when q
requires grad).

tests/ is on sys.path (tests/conftest.py): ``from kernel_paths import ...``.
"""
from __future__ import annotations

import torch


def pytorch_path(q: torch.Tensor) -> torch.Tensor:
    """``q`` requiring grad: the forward-only kernels decline it, so the call takes the entry's PyTorch path
    (which may still run the linear kernels, forward and backward)."""
    return q.clone().requires_grad_()


def segments(m, q, k, v, cuts, per_token=(), **params):
    """``m.scan`` over the segments ``cuts[i]:cuts[i + 1]`` (per-token parameters sliced along their axis 2),
    the state carried: ``(output, final state)``."""
    state, outs = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = {n: (x[:, :, a:b] if n in per_token else x) for n, x in params.items()}
        o, state = m.scan(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, **seg)
        outs.append(o)
    return torch.cat(outs, 2), state


def same_segments(m, q, k, v, cuts, tol, per_token=(), **params):
    """The kernel's segments equal the PyTorch path's, output and every state tensor."""
    fast, fast_state = segments(m, q, k, v, cuts, per_token, **params)
    slow, slow_state = segments(m, pytorch_path(q), k, v, cuts, per_token, **params)
    torch.testing.assert_close(fast, slow.detach(), atol=tol, rtol=tol)
    assert set(fast_state.tensors) == set(slow_state.tensors)
    for name in fast_state.tensors:
        torch.testing.assert_close(fast_state[name], slow_state[name].detach(), atol=tol, rtol=tol)
    return fast


def same_noncausal(m, q, k, v, tol, nan_at, **params):
    """Non-causal: the kernel equals the PyTorch path and the parallel form; a NaN key at index ``nan_at``
    (batch, head, position, channel) makes every row of that head NaN on both paths."""
    fast = m(q, k, v, causal=False, **params)
    torch.testing.assert_close(fast, m(pytorch_path(q), k, v, causal=False, **params).detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(fast, m(q, k, v, causal=False, impl="parallel", **params), atol=tol, rtol=tol)
    k = k.clone()
    k[nan_at] = float("nan")
    for query in (q, pytorch_path(q)):
        assert m(query, k, v, causal=False, **params)[nan_at[:2]].isnan().all()
