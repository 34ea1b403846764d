"""attnlab's neighborhood / GNA outputs equal NATTEN 0.21's on the same inputs.

NATTEN is the reference implementation of (dilated, generalized) neighborhood attention; on
CPU it runs its FlexAttention backend uncompiled, forward only, float32, head dims that are
powers of two. Its layout is heads-last ``(B, *spatial, H, D)``; attnlab's is heads-first.
"""
import pytest
import torch

import attnlab

natten = pytest.importorskip("natten", minversion="0.21")

CASES = [
    # (grid, kernel_size, stride, dilation, is_causal)
    ((20,), 5, 1, 1, False),
    ((20,), 4, 1, 1, False),
    ((21,), 5, 2, 2, False),
    ((19,), 6, 3, 1, False),
    ((20,), 5, 1, 1, True),
    ((23,), 4, 2, 2, True),
    ((9, 10), (3, 5), 1, (2, 1), False),
    ((9, 10), (4, 3), (2, 3), 1, False),
    ((8, 9), 3, 1, 1, (True, False)),
    ((8, 8), (4, 4), (4, 4), 1, False),
    ((4, 5, 6), 3, 1, 1, False),
    ((5, 6, 7), (2, 3, 4), (2, 1, 4), (1, 2, 1), False),
    ((4, 5, 6), 3, 1, 1, (True, False, False)),
]


def _natten(q, k, v, kernel_size, stride, dilation, is_causal):
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[q.dim() - 3]
    to_last = lambda x: x.movedim(1, -2).contiguous()  # noqa: E731  (B, H, *S, D) -> (B, *S, H, D)
    out = fn(to_last(q), to_last(k), to_last(v), kernel_size=kernel_size, stride=stride, dilation=dilation,
             is_causal=is_causal)
    return out.movedim(-2, 1)


@pytest.mark.parametrize("grid,kernel_size,stride,dilation,is_causal", CASES)
@pytest.mark.parametrize("impl", ["reference", "tiled", "flex", "native"])
def test_neighborhood_equals_natten(grid, kernel_size, stride, dilation, is_causal, impl):
    if impl == "native" and dilation not in (1, (1,) * len(grid)):
        pytest.skip("native serves neighbourhoods without dilation (a dilated window is not one range or box)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, *grid, 16) for _ in range(3))
    expected = _natten(q, k, v, kernel_size, stride, dilation, is_causal)
    all_causal = is_causal is True or (isinstance(is_causal, tuple) and all(is_causal))
    kw = dict(kernel_size=kernel_size, stride=stride, dilation=dilation)
    if all_causal:
        out = attnlab.mechanism("gna")(q, k, v, causal=True, impl=impl, **kw)
    else:
        out = attnlab.mechanism("gna")(q, k, v, impl=impl, is_causal=is_causal if is_causal else None, **kw)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_neighborhood_gqa_equals_natten():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 9, 10, 16)
    k, v = torch.randn(1, 2, 9, 10, 16), torch.randn(1, 2, 9, 10, 16)
    expected = _natten(q, k, v, (3, 5), 1, 1, False)
    for impl in ("tiled", "native"):
        out = attnlab.mechanism("neighborhood")(q, k, v, kernel_size=(3, 5), impl=impl)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
