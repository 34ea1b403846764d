"""StreamingLLM evaluation of a causal LM: perplexity with full attention, a sliding window, and
window + attention sinks.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks" (StreamingLLM):
a causal LM whose attention is restricted to the last ``w`` tokens degrades sharply once the
first tokens leave the window, because the model parks surplus attention on them (attention
sinks); keeping the first ``s`` tokens (``s = 4`` in the paper) visible next to the window
restores the perplexity of full attention.

Evaluation here is one forward pass under a mask (through
:func:`attnlab.inspect.hooks.attention_hooks`'s ``mask_mod``): query ``i`` sees key ``j`` iff

    window:          i - w < j <= i
    window + sinks:  i - w < j <= i   or   j < s

(:func:`attnlab.inspect.interventions.window_mask`, ANDed with the model's own causal / padding
mask: the catalogue's ``sink_window`` pattern under a causal mask).

This single pass gives the same logits as token-by-token decoding with a rolling KV cache that
keeps the first ``s`` entries and the last ``w`` (the paper's "window attention" and
StreamingLLM, Fig. 1 b and d): in such decoding, token ``j``'s keys and values at every layer
are computed once, when ``j`` is processed, from what ``j``'s own mask lets it see, which is
exactly what the masked pass computes; ``tests/inspect/test_streaming.py`` checks the equality.
(The paper's "sliding window with re-computation" baseline, which rebuilds the cache from the
window's raw tokens at every step, is a different method.) One difference from StreamingLLM
remains, by construction: positional encodings are those of the full sequence (token ``j``
keeps position ``j``), whereas StreamingLLM assigns positions inside the cache (sinks at
0..s-1, the window right after them). With RoPE this leaves the query-to-window distances
unchanged and makes the sinks look farther away than in the paper.

Perplexity over the predicted tokens ``x_1 .. x_{L-1}``:

    PPL = exp( -1/(L-1) * sum_{i=0}^{L-2} log p(x_{i+1} | x_{<=i} seen through the mask) )
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch


def require_causal_lm(model, who: str) -> None:
    """TypeError naming ``who`` unless ``model`` is a transformers causal LM (it can generate)."""
    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()):
        raise TypeError(f"{who}: model must be a causal language model (a transformers *ForCausalLM that can "
                        f"generate), got {type(model).__name__}")


def _check_ids(input_ids, who: str) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        what = (f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__)
        raise TypeError(f"{who}: input_ids must be a (batch, length) torch.long tensor, got {what}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"{who}: input_ids must hold at least 2 tokens (one to predict), got {input_ids.shape[1]}")
    return input_ids


def next_token_nll(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean negative log-likelihood (nats) of ``x_{i+1}`` given the prefix, over non-padding targets.

    Differentiable (no ``no_grad`` here): :mod:`attnlab.inspect.importance` uses it as the loss.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none").view_as(targets)
    if attention_mask is None:
        return nll.mean()
    keep = attention_mask[:, 1:].to(nll.dtype)
    return (nll * keep).sum() / keep.sum()


def _check_int(name: str, value, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {lowest}, got {value!r}")
    if value < lowest:
        raise ValueError(f"{name} must be >= {lowest}, got {value}")


def perplexity(model, input_ids: torch.Tensor, *, window: Optional[int] = None, sinks: int = 0) -> float:
    """Perplexity of ``input_ids`` with full attention (``window=None``) or under the window mask."""
    require_causal_lm(model, "perplexity")
    input_ids = _check_ids(input_ids, "perplexity")
    if window is None:
        if sinks:
            raise ValueError(f"perplexity: sinks={sinks} needs a window (sinks only matter when a window drops keys)")
        with torch.no_grad():
            return math.exp(next_token_nll(model, input_ids).item())
    from .hooks import attention_hooks
    from .interventions import window_mask

    with torch.no_grad(), attention_hooks(model, mask_mod=window_mask(window, sinks)):
        return math.exp(next_token_nll(model, input_ids).item())


@dataclass(frozen=True)
class StreamingEval:
    """Perplexities of one text under full attention, a window, and window + sinks."""

    tokens: int
    window: int
    sinks: int
    full: float
    window_only: float
    window_sinks: float

    def as_dict(self) -> dict:
        return asdict(self)


def streaming_eval(model, input_ids: torch.Tensor, *, window: int, sinks: int = 4) -> StreamingEval:
    """StreamingLLM's comparison on one text: full attention vs ``window`` vs ``window`` + ``sinks``.

    The text must be longer than ``window + sinks`` tokens, or the window drops nothing.
    """
    require_causal_lm(model, "streaming_eval")
    input_ids = _check_ids(input_ids, "streaming_eval")
    _check_int("window", window, 1)
    _check_int("sinks", sinks, 1)
    n = input_ids.shape[1]
    if n <= window + sinks:
        raise ValueError(f"streaming_eval: the text has {n} tokens; it must be longer than window + sinks = "
                         f"{window + sinks} for the window to drop any key (use a smaller window)")
    return StreamingEval(tokens=n, window=window, sinks=sinks, full=perplexity(model, input_ids),
                         window_only=perplexity(model, input_ids, window=window),
                         window_sinks=perplexity(model, input_ids, window=window, sinks=sinks))
