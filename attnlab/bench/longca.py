"""LongCA-bench's mask set (Bu et al. 2025, *Long-Context Attention Benchmark: From Kernel
Efficiency to Distributed Context Parallelism*), composed from :mod:`attnlab.patterns` masks.

Each mask is a benchmark pseudo-mechanism ``longca:NAME`` (not a catalogue entry): a sequence
layout :class:`~attnlab.catalogue.Mechanism` whose parameters are the mask's drawn quantities
(document lengths, prefix, window, ...), run by the shared block-sparse executor
(:data:`attnlab.patterns.executor.MASKED_IMPLS`: ``flex``, ``tiled``, ``sdpa``, ``reference``)
exactly like a catalogue entry. ``attnlab bench --mechanisms longca`` runs all of them,
``longca:share_question`` one. Positions ``i`` (query) and ``j`` (key) are 0-based; ``doc(p)``
is the index of the document holding ``p``, ``start(d)`` the first position of document ``d``.

=========================  ================================================================  =======
mask                       visible iff                                                       causal
=========================  ================================================================  =======
``full``                   always                                                            no
``causal``                 ``j <= i``                                                        yes
``causal_document``        ``doc(i) == doc(j) and j <= i``                                   yes
``full_document``          ``doc(i) == doc(j)``                                              no
``sliding_window``         ``|i - j| <= w``  (window_size ``(w, w)``)                        no
``sliding_window_causal``  ``i - w <= j <= i``  (window_size ``(w, 0)``)                     yes
``prefix_lm_causal``       ``j < p or j <= i``                                               no
``prefix_lm_document``     ``doc(i) == doc(j) and (j - start(doc(j)) < f or j <= i)``        no
``share_question``         ``j <= i and (doc(i) == doc(j) or doc(j) == 0)``                  yes
``causal_blockwise``       ``j <= i and (doc(i) == doc(j) or doc(i) == last)``               yes
``global_sliding_window``  ``|i - j| <= w or i < 2w or j < 2w``                              no
``block_causal_document``  ``doc(i) == doc(j) and j // b <= i // b``                         no
=========================  ================================================================  =======

The definitions follow LongCA-bench's mask generator (query/key ranges with FULL or
bottom-right CAUSAL areas); ``global_sliding_window`` and the ``(w, w)`` window follow its
FlexAttention kernel benchmark (global rows and columns of ``2w`` tokens, FlashAttention's
window convention ``i - w <= j <= i + w``). A mask listed as causal is a subset of the causal
mask and runs as a causal call (CAB pattern ``causal_self``; its SDPA baseline is causal too);
the others run non-causal (``noncausal_self``). ``tests/test_bench_longca.py`` checks every
mask against LongCA-bench's range construction, pair by pair.

**Drawn quantities (seeded).** Document lengths are drawn from a long-tailed log-normal
distribution, median 256 tokens and log-standard-deviation 1.48, fitted to the quantiles of the
Pile document-length histogram LongCA-bench samples from at these lengths (about 25% / 50% /
90% of documents shorter than 100 / 256 / 1700 tokens); documents are drawn until the sequence is
full and the last one is cut to fit (LongCA-bench's ``generate_seqlens``). As in LongCA-bench,
the prefix of ``prefix_lm_causal`` is uniform in ``[1, L]``, the in-document prefix ``f`` of
``prefix_lm_document`` uniform in ``[1, first document length]``, the window of
``global_sliding_window`` uniform in ``[1, L // 3 - 1]``, and a ``block_causal_document``
document is 1 to 8 whole blocks (uniform). To keep one mask's shape comparable across a length
sweep, the uniform draws use one random number per (seed, mask) scaled to each length; document
lengths are drawn per (seed, mask, length). **Scaled to CPU lengths** (LongCA-bench runs 1K-48K
tokens on H100s): the sliding windows use ``w = 512`` (LongCA-bench: 1024) and the blocks of
``block_causal_document`` ``b = 128`` tokens (LongCA-bench: 1024).

**FLOPs** are LongCA-bench's area count, ``4 * area * heads * head_dim`` forward and 2.5x
that backward, with ``area`` the exact number of visible pairs (:mod:`attnlab.bench.flops`).
"""
from __future__ import annotations

import math
import random
import zlib
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..catalogue import Call, Mechanism, Param
from ..patterns import executor as ex
from ..patterns import sequence as seq
from ..patterns.base import Mask, causal, take

PREFIX = "longca"

#: mask name -> runs causal (a subset of the causal mask)
MASKS: Dict[str, bool] = {
    "full": False,
    "causal": True,
    "causal_document": True,
    "full_document": False,
    "sliding_window": False,
    "sliding_window_causal": True,
    "prefix_lm_causal": False,
    "prefix_lm_document": False,
    "share_question": True,
    "causal_blockwise": True,
    "global_sliding_window": False,
    "block_causal_document": False,
}

WINDOW = 512  # LongCA-bench: 1024 at 1K-48K tokens
BLOCK = 128  # LongCA-bench: 1024
MAX_BLOCKS_PER_DOCUMENT = 8
#: Log-normal document lengths fitted to the Pile histogram LongCA-bench samples from.
DOC_MEDIAN = 256.0
DOC_SIGMA = 1.48

_DOCS = ("causal_document", "full_document", "prefix_lm_document", "share_question", "causal_blockwise",
         "block_causal_document")


def is_longca(name: str) -> bool:
    return name == PREFIX or name.startswith(PREFIX + ":")


def names() -> List[str]:
    """Every pseudo-mechanism name: ``longca:full``, ``longca:causal``, ..."""
    return [f"{PREFIX}:{m}" for m in MASKS]


# --------------------------------------------------------------------------------------------
# Seeded draws
# --------------------------------------------------------------------------------------------
def _rng(*parts) -> random.Random:
    return random.Random(zlib.crc32("/".join(map(str, parts)).encode()))


def document_lengths(total: int, rng: random.Random) -> List[int]:
    """Documents packed into ``total`` tokens: log-normal lengths (median :data:`DOC_MEDIAN`,
    log-sd :data:`DOC_SIGMA`), at least 1 token, drawn until full; the last one is cut to fit."""
    out: List[int] = []
    left = total
    while left > 0:
        n = max(1, int(round(rng.lognormvariate(math.log(DOC_MEDIAN), DOC_SIGMA))))
        out.append(min(n, left))
        left -= out[-1]
    return out


def block_documents(total: int, block: int, rng: random.Random) -> List[int]:
    """Documents of 1..:data:`MAX_BLOCKS_PER_DOCUMENT` whole blocks (uniform); the last is cut to fit."""
    out: List[int] = []
    left = total
    while left > 0:
        out.append(min(rng.randint(1, MAX_BLOCKS_PER_DOCUMENT) * block, left))
        left -= out[-1]
    return out


def draw_params(mask: str, length: int, seed: int = 0) -> Dict[str, Any]:
    """The drawn quantities of ``mask`` at ``length`` tokens for run seed ``seed`` (JSON-able)."""
    if mask not in MASKS:
        raise ValueError(f"LongCA-bench mask must be one of {', '.join(MASKS)}, got {mask!r}")
    L = int(length)
    u = _rng("longca", seed, mask).random()  # one uniform per (seed, mask): the same shape at every length
    docs = _rng("longca-docs", seed, mask, L)
    if mask in ("sliding_window", "sliding_window_causal"):
        return {"window": min(WINDOW, L)}
    if mask == "prefix_lm_causal":
        return {"prefix": 1 + int(u * L)}
    if mask == "global_sliding_window":
        hi = max(1, L // 3 - 1)
        return {"window": 1 + int(u * hi)}
    if mask == "block_causal_document":
        return {"document_lengths": block_documents(L, BLOCK, docs), "block_size": BLOCK}
    if mask in _DOCS:
        lengths = document_lengths(L, docs)
        if mask == "prefix_lm_document":
            return {"document_lengths": lengths, "prefix": 1 + int(u * lengths[0])}
        return {"document_lengths": lengths}
    return {}


# --------------------------------------------------------------------------------------------
# Masks: compositions of attnlab.patterns masks (plus three small rules of LongCA-bench's own)
# --------------------------------------------------------------------------------------------
def _queries_from(start: int) -> Mask:
    """Every key visible from queries at positions ``i >= start``."""
    return Mask(f"queries_from({start})", lambda g: (lambda b, h, q, kv: g.q_pos(q) >= start),
                ("longca_queries_from", start))


def _queries_before(n: int) -> Mask:
    """Every key visible from the first ``n`` queries (global rows)."""
    return Mask(f"queries_before({n})", lambda g: (lambda b, h, q, kv: g.q_pos(q) < n), ("longca_queries_before", n))


def _document_prefix(lengths: Tuple[int, ...], f: int) -> Mask:
    """Keys among the first ``f`` tokens of their document: ``j - start(doc(j)) < f``."""

    def build(g):
        lens = torch.as_tensor(lengths, dtype=torch.long)
        starts = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens).to(g.device)
        return lambda b, h, q, kv: kv - take(starts, kv) < f

    return Mask(f"document_prefix({f})", build, ("longca_document_prefix", lengths, f))


def _block_causal(block: int) -> Mask:
    """Key blocks up to the query's block: ``j // block <= i // block``."""
    return Mask(f"block_causal({block})", lambda g: (lambda b, h, q, kv: kv // block <= g.q_pos(q) // block),
                ("longca_block_causal", block))


def mask_of(mask: str, params: Dict[str, Any]) -> Optional[Mask]:
    """The attnlab mask of LongCA-bench mask ``mask`` with drawn ``params``; its causal part is
    added by the executor for the causal masks (:data:`MASKS`). None: no mask (full, causal)."""
    docs = tuple(params.get("document_lengths") or ())
    if mask in ("full", "causal"):
        return None
    if mask in ("causal_document", "full_document"):
        return seq.document(docs)
    if mask in ("sliding_window", "sliding_window_causal"):
        return seq.sliding_window(params["window"] + 1)  # attnlab's window w' means |i - j| < w'
    if mask == "prefix_lm_causal":
        return seq.prefix_lm(params["prefix"])
    if mask == "prefix_lm_document":
        return seq.document(docs) & (_document_prefix(docs, params["prefix"]) | causal())
    if mask == "share_question":
        return seq.document(docs) | seq.sinks(docs[0])
    if mask == "causal_blockwise":
        return seq.document(docs) | _queries_from(sum(docs) - docs[-1])
    if mask == "global_sliding_window":
        w = params["window"]
        return seq.sliding_window(w + 1) | seq.sinks(2 * w) | _queries_before(2 * w)
    if mask == "block_causal_document":
        return seq.document(docs) & _block_causal(params["block_size"])
    raise ValueError(f"LongCA-bench mask must be one of {', '.join(MASKS)}, got {mask!r}")


# --------------------------------------------------------------------------------------------
# Pseudo-mechanisms
# --------------------------------------------------------------------------------------------
_PARAMS = (
    Param("document_lengths", "ints", None, "lengths of the packed documents (sum = L)", ge=1, optional=True),
    Param("prefix", "int", 1, "prefix length (prefix_lm_causal) or in-document prefix (prefix_lm_document)", ge=0),
    Param("window", "int", WINDOW, "window w: keys with |i - j| <= w", ge=0),
    Param("block_size", "int", BLOCK, "block size of block_causal_document", ge=1),
)


def _check(call: Call):
    name = call.mechanism.name.split(":", 1)[1]
    docs = call.params["document_lengths"]
    if name in _DOCS:
        if docs is None:
            raise ValueError(f"{call.mechanism.name}: document_lengths are required")
        if sum(docs) != call.kv_len:
            raise ValueError(f"{call.mechanism.name}: document_lengths must sum to the sequence length "
                             f"{call.kv_len}, got {sum(docs)}")
    if call.q_len != call.kv_len:
        raise ValueError(f"{call.mechanism.name}: LongCA-bench masks are self-attention masks (Lq == Lk), got "
                         f"Lq={call.q_len}, Lk={call.kv_len}")


@lru_cache(maxsize=None)
def mechanism(name: str) -> Mechanism:
    """The pseudo-mechanism ``longca:MASK`` (cached: one object per mask)."""
    mask = name.split(":", 1)[1] if ":" in name else ""
    if not name.startswith(PREFIX + ":") or mask not in MASKS:
        import difflib

        close = difflib.get_close_matches(mask or name, list(MASKS), n=3)
        hint = f"; did you mean {', '.join(f'{PREFIX}:{c}' for c in close)}?" if close else ""
        raise KeyError(f"no LongCA-bench mask {name!r} (masks: {', '.join(MASKS)}; 'longca' runs all){hint}")
    pattern = "causal_self" if MASKS[mask] else "noncausal_self"
    return Mechanism(
        name=name, family="longca", paper="LongCA-bench (Bu et al. 2025) mask set", summary=f"LongCA-bench {mask} mask",
        formula=f"see attnlab.bench.longca ({mask})", layout="sequence", patterns=(pattern,), params=_PARAMS,
        impls=ex.MASKED_IMPLS, spec=lambda call: (mask_of(mask, call.params), None), check_params=_check,
    )


def pattern_of(name: str) -> str:
    return mechanism(name).patterns[0]


__all__ = ["MASKS", "WINDOW", "BLOCK", "is_longca", "names", "document_lengths", "block_documents", "draw_params",
           "mask_of", "mechanism", "pattern_of"]
