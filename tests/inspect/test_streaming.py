"""StreamingLLM evaluation on SmolLM2: sinks restore windowed perplexity (Xiao et al. 2024), and the
one-pass masked evaluation equals token-by-token decoding with a rolling KV cache."""
import pytest
import torch

from attnlab.inspect import streaming

TEXT = (
    "The history of the city begins with a small fishing village on the river. Over the centuries, merchants "
    "arrived from the south and built warehouses along the docks. By the eighteenth century the town had a "
    "cathedral, a university and a busy market where farmers sold grain, wool and cheese. The railway reached the "
    "city in 1850, and factories soon lined the canals. Many families moved from the countryside to work in the "
    "mills, and the population doubled within thirty years. Today the old warehouses have become museums, "
    "restaurants and apartments, and tourists walk along the river to see the bridges and the cathedral.\n\n"
    "Bees are flying insects closely related to wasps and ants, known for their role in pollination and, in the "
    "case of the best-known species, the western honey bee, for producing honey. Some species live socially in "
    "colonies while most species are solitary. Bees are found on every continent except Antarctica, in every "
    "habitat on the planet that contains insect-pollinated flowering plants. Most bees feed on nectar and pollen; "
    "the pollen provides protein for the larvae, and the nectar gives the adults energy.")


def test_sinks_restore_windowed_perplexity(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :200]
    assert ids.shape[1] == 200
    r = streaming.streaming_eval(model, ids, window=32, sinks=4)
    assert (r.tokens, r.window, r.sinks) == (200, 32, 4)
    # StreamingLLM (Xiao et al. 2024, Fig. 3 / Table 1): window attention collapses once the first
    # tokens are evicted; keeping 4 initial tokens brings perplexity back near full attention.
    assert r.window_sinks < r.window_only
    assert r.window_only > 1.5 * r.full
    assert r.window_sinks < 1.25 * r.full
    # the full-attention value is the model's own (no hooks involved)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert r.full == pytest.approx(torch.exp(loss).item(), rel=1e-4)


def test_masked_pass_equals_rolling_cache_decoding(smollm2):
    """The docstring's claim: one masked forward pass == decoding one token at a time where token i
    sees only the first `sinks` tokens and the last `window` ones (its own included), original positions."""
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :20]
    window, sinks = 6, 2
    from attnlab.inspect.hooks import attention_hooks
    from attnlab.inspect.interventions import window_mask

    with torch.no_grad():
        with attention_hooks(model, mask_mod=window_mask(window, sinks)):
            masked = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        past, steps = None, []
        for i in range(ids.shape[1]):  # plain model, a 2-D key mask per step, cache of every token
            keep = torch.zeros(1, i + 1, dtype=torch.long)
            keep[0, :sinks] = 1
            keep[0, max(0, i - window + 1):] = 1
            out = model(input_ids=ids[:, i:i + 1], attention_mask=keep, past_key_values=past, use_cache=True,
                        position_ids=torch.tensor([[i]]))
            past = out.past_key_values
            steps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    torch.testing.assert_close(masked, torch.stack(steps), atol=2e-3, rtol=1e-3)
    # ... and the window really matters on this sequence: full attention differs
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    assert (full[-1] - masked[-1]).abs().max() > 1e-2


def test_bad_arguments(smollm2, minilm):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt")["input_ids"][:, :40]
    with pytest.raises(ValueError, match="longer than window"):
        streaming.streaming_eval(model, ids, window=64)
    with pytest.raises(ValueError, match="window must be"):
        streaming.streaming_eval(model, ids, window=0)
    with pytest.raises(TypeError, match="input_ids"):
        streaming.perplexity(model, ids[0])
    with pytest.raises(ValueError, match="sinks=4 needs a window"):
        streaming.perplexity(model, ids, sinks=4)
    with pytest.raises(TypeError, match="causal language model"):
        streaming.perplexity(minilm[0], ids)
