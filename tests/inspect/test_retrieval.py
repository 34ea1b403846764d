"""Retrieval heads on SmolLM2 (Wu et al. 2024): a few heads copy the needle; the score's decoding path
agrees with a recompute from the full sequence."""
import pytest
import torch

from attnlab.inspect import retrieval


def test_needle_task(smollm2):
    _, tok = smollm2
    n = retrieval.needle_task(tok, context_tokens=200, depth=0.5, seed=3)
    assert n == retrieval.needle_task(tok, context_tokens=200, depth=0.5, seed=3)  # seeded
    assert len(n.passkey) == 8 and n.passkey.isdigit()
    assert tok.decode(list(n.needle_ids)) == retrieval.NEEDLE.format(key=n.passkey)
    assert tok.decode(list(n.answer_ids)).strip() == n.passkey
    assert 170 <= len(n.input_ids) <= 230
    assert tok.decode(list(n.input_ids)).rstrip().endswith("The pass key is")
    # the answer's tokens (the passkey) are in the needle, so a copying head can find them there
    assert set(n.answer_ids) - {n.answer_ids[0]} <= set(n.needle_ids)
    starts = [retrieval.needle_task(tok, context_tokens=200, depth=d, seed=3).start for d in (0.1, 0.5, 0.9)]
    assert starts[0] < starts[1] < starts[2]
    assert retrieval.needle_task(tok, context_tokens=200, seed=4).passkey != n.passkey


def test_retrieval_heads_are_a_small_fraction(smollm2):
    model, tok = smollm2
    r = retrieval.retrieval_scores(model, tok, trials=3, context_tokens=200)
    assert r.scores.shape == (30, 9)
    assert r.accuracy >= 2 / 3, r.trials  # the model does retrieve the passkey
    # Wu et al.: retrieval heads exist in every model and are sparse (under 5% of heads there)
    assert 0 < len(r.heads) < 0.25 * r.scores.numel()
    assert all(s > retrieval.THRESHOLD for _, _, s in r.heads)
    assert ((r.scores >= 0) & (r.scores <= 1)).all()
    d = r.as_dict()
    assert d["fraction"] == pytest.approx(len(r.heads) / 270) and len(d["trials"]) == 3


def test_hits_equal_a_recompute_on_the_full_sequence(smollm2):
    """Reference: one forward pass over prompt + answer (no KV cache); the query producing answer
    token t is at position len(prompt) - 1 + t."""
    model, tok = smollm2
    needle = retrieval.needle_task(tok, context_tokens=96, depth=0.3, seed=1)
    hits, emitted = retrieval.trial_hits(model, needle)
    seq = torch.tensor(list(needle.input_ids) + emitted)
    rows = {}
    from attnlab.inspect.hooks import attention_hooks

    def hook(site, w):
        rows[site.layer] = w[0].detach().clone()

    with torch.no_grad(), attention_hooks(model, hook):
        logits = model(input_ids=seq[None]).logits[0]
    p = len(needle.input_ids)
    assert logits[p - 1:-1].argmax(-1).tolist() == emitted  # greedy decoding, recomputed
    ref = torch.zeros_like(hits)
    for layer, w in rows.items():
        for t, tok_t in enumerate(emitted):
            j = w[:, p - 1 + t].argmax(-1)
            ref[layer] += ((j >= needle.start) & (j < needle.end) & (seq[j] == tok_t)).float()
    assert torch.equal(hits, ref)
    assert hits.sum() > 0


def test_bad_arguments(smollm2, minilm):
    model, tok = smollm2
    with pytest.raises(ValueError, match="context_tokens"):
        retrieval.needle_task(tok, context_tokens=10)
    with pytest.raises(ValueError, match="depth"):
        retrieval.needle_task(tok, depth=1.5)
    with pytest.raises(ValueError, match="trials"):
        retrieval.retrieval_scores(model, tok, trials=0)
    with pytest.raises(TypeError, match="causal language model"):
        retrieval.retrieval_scores(minilm[0], minilm[1])
