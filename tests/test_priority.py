"""strategy="priority": priority sampling of neurons with unbiased weights max(1, tau / score) for the kept ones.

The weights make every neuron's expected weighted inclusion 1, so the weighted kept neurons estimate the dense MLP's
output (sparse forward) and gradients (both forward modes) without bias; checked against the fp64 masked reference
with the same weights and by Monte Carlo against the dense gradients."""
import pytest
import torch

import sat_kernels as sk
from sat_kernels.ops.reference import reference_mlp
from sat_kernels.ops.mlp.lora import LoRA
from sat_kernels.selection import priority_weights, select_neurons

from helpers import NAMES, fp64_copies, make_operands, out_and_grads, rel_rms, tiny_model


def test_weighted_inclusion_is_unbiased_and_big_scores_are_kept_for_sure():
    scores = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01])
    n, k, draws = scores.numel(), 4, 6000
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(draws):
        u = torch.rand(n, generator=gen)
        idx = select_neurons(scores, k, strategy="priority", uniform=u)
        w = priority_weights(scores, u, idx)
        assert idx.numel() == k and (w >= 1).all()
        total[idx] += w.double()
    mean = total / draws
    assert torch.allclose(mean, torch.ones(n, dtype=torch.float64), atol=0.12), mean
    # the two highest hold most of the mass: always kept, weight 1
    u = torch.rand(n, generator=gen)
    idx = select_neurons(scores, k, strategy="priority", uniform=u)
    assert {0, 1} <= set(idx.tolist())


def test_weights_of_zero_and_nan_scores_are_one():
    scores = torch.tensor([2.0, 0.0, float("nan"), 0.0])
    u = torch.full((4,), 0.5)
    idx = select_neurons(scores, 3, strategy="priority", uniform=u)
    assert idx.tolist() == [0, 1, 3]
    assert priority_weights(scores, u, idx).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_matches_the_weighted_masked_reference(forward, act):
    operands, dy = make_operands(24, 16, 40, torch.float64, seed=1)
    ours = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, strategy="priority", act=act, forward=forward,
                                               generator=torch.Generator().manual_seed(7), return_indices=True)[0],
                         operands, dy)
    _, idx = sk.sat_mlp(*operands, 0.5, strategy="priority", act=act, generator=torch.Generator().manual_seed(7),
                        return_indices=True)
    scores = sk.neuron_scores(*operands, act=act)
    weights = priority_weights(scores, torch.rand(40, generator=torch.Generator().manual_seed(7)), idx)
    assert (weights > 1).any(), "some kept neurons are sampled below the threshold"
    ref = out_and_grads(lambda *o: reference_mlp(*o, idx, act=act, forward=forward, weights=weights),
                        fp64_copies(operands), dy)
    for name, o, r in zip(NAMES, ours, ref):
        assert rel_rms(o, r) < 1e-12, name
    if forward == "dense":
        dense = out_and_grads(lambda *o: reference_mlp(*o, act=act), fp64_copies(operands), dy)
        assert torch.allclose(ours[0], dense[0]), "the exact forward"


def test_gradients_are_unbiased_where_topk_is_not():
    operands, dy = make_operands(16, 8, 12, torch.float64, seed=2)
    dense = out_and_grads(lambda *o: reference_mlp(*o), fp64_copies(operands), dy)
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    mean = [torch.zeros_like(t) for t in dense[1:]]
    for _ in range(draws):
        grads = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, strategy="priority", forward="dense", generator=gen),
                              operands, dy)[1:]
        for m, g in zip(mean, grads):
            m += g / draws
    topk = out_and_grads(lambda *o: sk.sat_mlp(*o, 0.5, forward="dense"), operands, dy)[1:]
    for name, m, t, d in zip(NAMES[1:], mean, topk, dense[1:]):
        assert rel_rms(m, d) < 0.04, (name, rel_rms(m, d))   # 0.015-0.023 measured; ~1/sqrt(draws)
        assert rel_rms(t, d) > 2 * rel_rms(m, d), (name, rel_rms(t, d))


def test_module_and_refusals():
    model = sk.replace_mlp(tiny_model("llama"), 0.5, strategy="priority")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    gate = model.model.layers[0].mlp.gate_proj.weight.grad
    assert int((gate != 0).any(dim=1).sum()) == sk.num_kept(136, 0.5)
    with pytest.raises(ValueError, match="strategy"):
        sk.replace_attention(tiny_model("llama"), 0.5, strategy="priority")
    operands, _ = make_operands(6, 8, 12, torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        sk.sat_attention(torch.randn(1, 4, 8), *(torch.randn(8, 8) for _ in range(4)), 0.5, num_heads=2,
                         num_kv_heads=2, strategy="priority")
    from sat_kernels.ops.mlp.lora import sat_lora_mlp
    lora = LoRA(torch.randn(2, 8), torch.randn(12, 2), 1.0, None)
    with pytest.raises(ValueError, match="priority"):
        sat_lora_mlp(*operands, (lora, None, None), 6, strategy="priority")


def _model_grads(seed, checkpoint=None, compiled=False):
    model = sk.replace_mlp(tiny_model("llama"), 0.5, strategy="priority").train()
    if checkpoint is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpoint})
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    run = torch.compile(model, backend="aot_eager") if compiled else model
    torch.manual_seed(seed)   # the noise of the selection comes from the global RNG
    run(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["reentrant checkpoint", "checkpoint", "compile"])
def test_checkpointing_and_compile_draw_the_same_sample(mode):
    plain = _model_grads(5)
    other = _model_grads(5, checkpoint={"reentrant checkpoint": True, "checkpoint": False}.get(mode),
                         compiled=mode == "compile")
    assert plain.keys() == other.keys()
    for name in plain:
        torch.testing.assert_close(other[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(_model_grads(6)["model.layers.0.mlp.gate_proj.weight"],
                           plain["model.layers.0.mlp.gate_proj.weight"]), "another draw keeps other neurons"
