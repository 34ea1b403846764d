"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality") found with a passkey needle-in-a-haystack test.

**Needle** (:func:`needle_task`): the passkey prompt of Mohtashami & Jaggi 2023 (Landmark
Attention): an instruction, the filler "The grass is green. The sky is blue. ..." repeated up to
about ``context_tokens`` tokens, and at relative depth ``depth`` the needle sentence
``" The pass key is K. Remember it. K is the pass key."`` with ``K`` a seeded random string of
``digits`` digits; the prompt ends with "What is the pass key? The pass key is". The needle's
token span ``[start, end)`` is exact (the three parts are tokenized separately and concatenated).

**Retrieval score** (:func:`retrieval_scores`): the model answers by greedy decoding, one
token per step for as many steps as ``" K"`` has tokens. At decoding step ``t`` the model
emits token ``w_t``; head ``h`` of layer ``l`` *hits* at that step when the key position it
attends to most, ``j* = argmax_j a_{l,h}(t, j)`` (the attention row of the query that produced
``w_t``), lies inside the needle and holds the emitted token:

    hit_{l,h}(t) = [start <= j* < end]  and  [x_{j*} = w_t]
    score_{l,h}  = mean over trials of  ( sum_t hit_{l,h}(t) ) / (end - start)

(Wu et al.'s ``|g_h ∩ k| / |k|`` with top-1 attention, as in their detection code). Heads with
``score > 0.1`` are retrieval heads. Wu et al. find them in every model they test, and few:
under 5% of all heads. Scores count every decoding step, answered correctly or not; the share
of trials answered exactly is reported as ``accuracy``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .streaming import require_causal_lm

#: The passkey filler of Mohtashami & Jaggi 2023 (Landmark Attention), repeated to length.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there. ")
QUESTION = "\nWhat is the pass key? The pass key is"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."

#: Wu et al.'s threshold: a head with a retrieval score above it is a retrieval head.
THRESHOLD = 0.1


@dataclass(frozen=True)
class Needle:
    """One passkey prompt: token ids, the needle's span ``[start, end)``, the expected answer."""

    input_ids: Tuple[int, ...]
    start: int
    end: int
    passkey: str
    answer_ids: Tuple[int, ...]  # tokens of " " + passkey, what a correct answer emits
    depth: float

    @property
    def needle_ids(self) -> Tuple[int, ...]:
        return self.input_ids[self.start:self.end]


def _ids(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def needle_task(tokenizer, *, context_tokens: int = 256, depth: float = 0.5, seed: int = 0,
                digits: int = 8) -> Needle:
    """A passkey prompt of about ``context_tokens`` tokens with the needle at relative ``depth``.

    ``seed`` picks the passkey (``digits`` decimal digits). The haystack is cut at a sentence
    boundary, so the depth is approximate (within one filler sentence).
    """
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 64:
        raise ValueError(f"needle_task: context_tokens must be an int >= 64, got {context_tokens!r}")
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle_task: depth must be a number in [0, 1], got {depth!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 64:
        raise ValueError(f"needle_task: digits must be an int in [1, 64], got {digits!r}")
    if not callable(tokenizer):
        raise TypeError(f"needle_task: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    rng = random.Random(seed)
    key = "".join(rng.choice("0123456789") for _ in range(digits))
    needle = _ids(tokenizer, NEEDLE.format(key=key), False)
    fixed = len(_ids(tokenizer, INSTRUCTION, True)) + len(needle) + len(_ids(tokenizer, QUESTION, False))
    per_filler = max(1, len(_ids(tokenizer, FILLER, False)))
    sentences = (FILLER.strip().replace(". ", ".|").split("|"))
    n_sent = max(len(sentences), round(max(0, context_tokens - fixed) / per_filler * len(sentences)))
    hay = [sentences[i % len(sentences)] for i in range(n_sent)]
    cut = round(depth * n_sent)
    before = INSTRUCTION + " ".join(hay[:cut])
    after = (" " if cut < n_sent else "") + " ".join(hay[cut:]) + QUESTION
    pre = _ids(tokenizer, before, True)
    ids = pre + needle + _ids(tokenizer, after, False)
    return Needle(input_ids=tuple(ids), start=len(pre), end=len(pre) + len(needle), passkey=key,
                  answer_ids=tuple(_ids(tokenizer, " " + key, False)), depth=float(depth))


@dataclass
class RetrievalResult:
    """Retrieval scores ``(layers, heads)`` averaged over the trials, and what each trial answered."""

    scores: torch.Tensor
    threshold: float
    trials: List[dict] = field(default_factory=list)

    @property
    def heads(self) -> List[Tuple[int, int, float]]:
        """``(layer, head, score)`` of the retrieval heads (``score > threshold``), best first."""
        found = [(int(l), int(h), float(self.scores[l, h])) for l, h in (self.scores > self.threshold).nonzero()]
        return sorted(found, key=lambda t: -t[2])

    @property
    def fraction(self) -> float:
        """Share of all heads that are retrieval heads."""
        return len(self.heads) / self.scores.numel()

    @property
    def accuracy(self) -> float:
        """Share of trials whose greedy answer is exactly the passkey."""
        return sum(t["correct"] for t in self.trials) / max(1, len(self.trials))

    def as_dict(self) -> dict:
        return {"scores": self.scores.tolist(), "threshold": self.threshold,
                "heads": [list(h) for h in self.heads], "fraction": self.fraction, "accuracy": self.accuracy,
                "trials": self.trials}


def _n_layers_heads(model) -> Tuple[int, int]:
    cfg = model.config
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


def trial_hits(model, needle: Needle) -> Tuple[torch.Tensor, List[int]]:
    """Greedy-decode the answer to one needle; return hits per head ``(layers, heads)`` and the tokens.

    ``hits[l, h]`` counts the decoding steps at which head ``(l, h)``'s top-1 key lies in the
    needle and holds the emitted token (see the module docstring).
    """
    from .hooks import attention_hooks

    n_layers, n_heads = _n_layers_heads(model)
    top: dict = {}

    def hook(site, weights):  # the last query row is the one that produces the next token
        top[site.layer] = weights[0, :, -1, :].argmax(dim=-1)

    seq = torch.tensor(needle.input_ids, dtype=torch.long)
    hits = torch.zeros(n_layers, n_heads)
    emitted: List[int] = []
    cur, past = seq.unsqueeze(0), None
    with torch.no_grad(), attention_hooks(model, hook):
        for _ in range(len(needle.answer_ids)):
            top.clear()
            out = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = out.past_key_values
            w = int(out.logits[0, -1].argmax())
            if len(top) != n_layers:
                raise RuntimeError(f"retrieval: the attention hooks saw {len(top)} of {n_layers} layers")
            for layer, j in top.items():
                inside = (j >= needle.start) & (j < needle.end)
                hits[layer] += (inside & (seq[j] == w)).float()
            emitted.append(w)
            seq = torch.cat([seq, torch.tensor([w])])
            cur = torch.tensor([[w]])
    return hits, emitted


def retrieval_scores(model, tokenizer, *, trials: int = 4, context_tokens: int = 256,
                     depths: Optional[Sequence[float]] = None, seed: int = 0, digits: int = 8,
                     threshold: float = THRESHOLD, progress=None) -> RetrievalResult:
    """Wu et al.'s retrieval score of every head, averaged over ``trials`` passkey prompts.

    Trial ``t`` uses passkey seed ``seed + t`` and depth ``depths[t % len(depths)]`` (default:
    evenly spaced in [0.1, 0.9]). ``progress(done, total)`` is called after each trial.
    """
    require_causal_lm(model, "retrieval_scores")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"retrieval_scores: trials must be an int >= 1, got {trials!r}")
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"retrieval_scores: threshold must be a number in [0, 1), got {threshold!r}")
    if depths is None:
        depths = [0.5] if trials == 1 else [0.1 + 0.8 * t / (trials - 1) for t in range(trials)]
    depths = list(depths)
    if not depths:
        raise ValueError("retrieval_scores: depths must not be empty")
    n_layers, n_heads = _n_layers_heads(model)
    total = torch.zeros(n_layers, n_heads)
    record = []
    for t in range(trials):
        needle = needle_task(tokenizer, context_tokens=context_tokens, depth=depths[t % len(depths)], seed=seed + t,
                             digits=digits)
        hits, emitted = trial_hits(model, needle)
        total += hits / (needle.end - needle.start)
        record.append({"passkey": needle.passkey, "depth": needle.depth, "tokens": len(needle.input_ids),
                       "needle": [needle.start, needle.end], "answer": tokenizer.decode(emitted),
                       "correct": tuple(emitted) == needle.answer_ids})
        if progress is not None:
            progress(t + 1, trials)
    return RetrievalResult(scores=total / trials, threshold=float(threshold), trials=record)
