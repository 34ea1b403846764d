"""Head importance (Michel et al. 2019): the gate gradient equals a gate on the head outputs in front of
the output projection, and pruning by importance hurts less than pruning at random."""
import pytest
import torch

from attnlab.inspect import importance as I

TRAIN = (
    "The history of the city begins with a small fishing village on the river. Over the centuries, merchants "
    "arrived from the south and built warehouses along the docks. By the eighteenth century the town had a "
    "cathedral, a university and a busy market where farmers sold grain, wool and cheese. The railway reached the "
    "city in 1850, and factories soon lined the canals. Many families moved from the countryside to work in the "
    "mills, and the population doubled within thirty years. Today the old warehouses have become museums, "
    "restaurants and apartments, and tourists walk along the river to see the bridges and the cathedral.")
HELD_OUT = (
    "Bees are flying insects closely related to wasps and ants, known for their role in pollination and, in the "
    "case of the best-known species, the western honey bee, for producing honey. Some species live socially in "
    "colonies while most species are solitary. Bees are found on every continent except Antarctica, in every "
    "habitat on the planet that contains insect-pollinated flowering plants. Most bees feed on nectar and pollen; "
    "the pollen provides protein for the larvae, and the nectar gives the adults energy.")


def test_gate_gradient_equals_output_gate(smollm2):
    """Reference: Michel et al.'s gate on each head's output, i.e. on Llama's o_proj input reshaped
    to heads (per query head under GQA); importance = |dL/dxi| for a single example."""
    model, tok = smollm2
    ids = tok(TRAIN, return_tensors="pt")["input_ids"][:, :32]
    batch = {"input_ids": ids}
    n_layers, n_heads = I.head_counts(model)
    assert (n_layers, n_heads) == (30, 9)
    gate = torch.ones(n_layers, n_heads, requires_grad=True)
    handles = []
    for layer, block in enumerate(model.model.layers):
        def pre(mod, args, layer=layer):
            x = args[0]
            return ((x.unflatten(-1, (n_heads, -1)) * gate[layer].view(n_heads, 1)).flatten(-2),)
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        (ref,) = torch.autograd.grad(I.lm_loss(model, batch), gate)
    finally:
        for h in handles:
            h.remove()
    imp = I.head_importance(model, [batch])
    torch.testing.assert_close(imp.raw, ref.abs(), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(imp.normalized, ref.abs() / ref.abs().norm(dim=1, keepdim=True))
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert all(p.grad is None for p in model.parameters())   # only the gates got gradients


def test_pruning_by_importance_beats_random(smollm2):
    model, tok = smollm2
    train = I.lm_objective(tok, TRAIN)
    held_out = I.lm_objective(tok, HELD_OUT)
    imp = I.head_importance(model, train.batches, train.loss_fn)
    curves = I.pruning_curves(model, imp.normalized, held_out.batches, held_out.curve_fn,
                              fractions=[0, 0.2, 0.4, 0.6], random_orders=2, seed=0)
    assert curves.importance[0] == curves.random[0]
    # Michel et al. (Fig. 3): removing heads in order of importance degrades far less than at random
    assert curves.auc_importance < curves.auc_random
    assert curves.importance[-1] < curves.random[-1]
    d = curves.as_dict()
    assert d["auc_importance"] == pytest.approx(curves.auc_importance)


def test_encoder_objective_and_ablation_reference(minilm):
    model, tok = minilm
    train = I.embedding_objective(model, tok, TRAIN, probes=4)
    held_out = I.embedding_objective(model, tok, HELD_OUT, probes=1)
    assert I.mean_loss(model, held_out.batches, held_out.curve_fn) == pytest.approx(0.0, abs=1e-5)
    imp = I.head_importance(model, train.batches, train.loss_fn)
    assert imp.raw.shape == (6, 12) and (imp.raw > 0).all()
    curves = I.pruning_curves(model, imp.normalized, held_out.batches, held_out.curve_fn,
                              fractions=[0, 0.2, 0.4, 0.6], random_orders=3)
    assert curves.auc_importance < curves.auc_random
    # a zero gate is head ablation: compare with attnlab.inspect.interventions.HeadAblation
    from attnlab.inspect.interventions import HeadAblation

    pruned = [0 * 12 + 3, 2 * 12 + 5, 5 * 12 + 11]
    with torch.no_grad(), HeadAblation([(0, 3), (2, 5), (5, 11)]).apply(model):
        ref = held_out.curve_fn(model, held_out.batches[0]).item()
    assert I.mean_loss(model, held_out.batches, held_out.curve_fn, pruned=pruned) == pytest.approx(ref, rel=1e-5)
    assert ref > 1e-4


def test_bad_arguments(minilm):
    model, tok = minilm
    with pytest.raises(ValueError, match="batches"):
        I.head_importance(model, [])
    with pytest.raises(ValueError, match="shape"):
        I.pruning_curves(model, torch.ones(3, 3), [{}])
    with pytest.raises(ValueError, match="fractions"):
        I.pruning_curves(model, torch.ones(6, 12), [{}], fractions=[0.5, 0.2])
    with pytest.raises(ValueError, match="probes"):
        I.embedding_objective(model, tok, TRAIN, probes=0)
    with pytest.raises(ValueError, match="gate must be"):
        with I.head_gates(model, torch.ones(6, 11)):
            pass
