"""Training-mode forwards without gradients (``torch.no_grad()``, ``torch.inference_mode()``) run the dense modules:
no backward to accelerate, and TRL's DPO reference pass and GRPO rollouts run the policy in training mode that way.
The first pass of a reentrant activation checkpoint (grad mode off too) keeps selecting, as its recompute will."""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import sat_kernels as sk

from helpers import tiny_model

PATCH = {"mlp": sk.replace_mlp, "attention": sk.replace_attention}


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_no_grad_training_forward_is_the_dense_model_and_records_nothing(kind, forward):
    ids = _ids()
    with torch.no_grad():
        dense = tiny_model("llama").train()(ids, labels=ids)
    model = PATCH[kind](tiny_model("llama"), 0.5, forward=forward).train()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = model(ids, labels=ids)
        assert torch.equal(out.logits, dense.logits) and torch.equal(out.loss, dense.loss), context.__name__
        assert sk.sat_stats(model) == {kind: {"layers": {}, "summary": {}}}, "no selection recorded"

    loss = model(ids, labels=ids).loss     # grad mode on: the SAT forward, which selects and records
    loss.backward()
    stats = sk.sat_stats(model)[kind]
    assert len(stats["layers"]) == 2 and stats["summary"]["kept_min"] == (sk.num_kept(136, 0.5) if kind == "mlp" else 2)
    if forward == "sparse":
        assert not torch.allclose(loss.detach(), dense.loss)
    else:
        torch.testing.assert_close(loss.detach(), dense.loss, rtol=1e-6, atol=0)
    with torch.no_grad():
        model(_ids(1), labels=_ids(1))
    assert sk.sat_stats(model)[kind]["layers"] == stats["layers"], "a no-grad pass leaves the last statistics"


def test_no_grad_training_forward_continues_a_kv_cache():
    """GRPO's rollouts: ``generate`` in training mode under ``no_grad`` with SAT attention and MLP, and an explicit
    prefill + decode step, give the unpatched model's tokens and logits."""
    prompt = _ids(shape=(2, 5))
    ref = tiny_model("llama").train()
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse"), 0.5,
                                 forward="sparse").train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.generate(prompt, max_new_tokens=6, do_sample=False)
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want)
        assert model.training and all(m.training for _, m in sk.sat_modules(model))
        steps = []
        for run in (ref, model):
            first = run(prompt, use_cache=True)
            nxt = first.logits[:, -1:].argmax(-1)
            steps.append(run(nxt, past_key_values=first.past_key_values, use_cache=True).logits)
    assert torch.equal(steps[1], steps[0])
    assert sk.sat_stats(model) == {"mlp": {"layers": {}, "summary": {}}, "attention": {"layers": {}, "summary": {}}}


class _ReentrantCheckpoint(torch.autograd.Function):
    """A minimal reentrant checkpoint written as other libraries write theirs (DeepSpeed's, Megatron's): the forward
    runs the function without grad, the backward runs it again with grad and differentiates it."""

    @staticmethod
    def forward(ctx, run_function, x):
        ctx.run_function = run_function
        ctx.save_for_backward(x)
        ctx.rng = torch.get_rng_state()
        with torch.no_grad():
            return run_function(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_()
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.set_rng_state(ctx.rng)
            y = ctx.run_function(x)
        torch.autograd.backward(y, dy)
        return None, x.grad


CHECKPOINTS = {"torch reentrant": lambda fn, x: checkpoint(fn, x, use_reentrant=True),
               "torch non-reentrant": lambda fn, x: checkpoint(fn, x, use_reentrant=False),
               "custom Function": _ReentrantCheckpoint.apply}


@pytest.mark.parametrize("strategy", ["topk", "sample"])
@pytest.mark.parametrize("how", list(CHECKPOINTS))
def test_reentrant_checkpoint_first_pass_selects_like_its_recompute(how, strategy):
    """Grad mode is off in a reentrant checkpoint's first pass, yet it must be SAT's (the sparse forward's output,
    the same draws as the recompute): the output and every gradient equal those without checkpointing."""
    def run(wrap):
        model = sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse", strategy=strategy).train()
        mlp = model.model.layers[0].mlp
        x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(3)
        y = wrap(mlp, x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, mlp.gate_proj.weight.grad, sk.sat_stats(model)["mlp"]["layers"]

    plain, ckpt = run(lambda fn, x: fn(x)), run(CHECKPOINTS[how])
    for a, b in zip(plain[:3], ckpt[:3]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert ckpt[3]["model.layers.0.mlp"]["kept"] == sk.num_kept(136, 0.5)
    with torch.no_grad():
        model = sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse").train()
        x = torch.randn(2, 7, 48)
        mlp = model.model.layers[0].mlp
        assert torch.equal(mlp(x), mlp.dense_module(x)), "outside a checkpoint, no grad is dense"


def test_compiled_no_grad_training_forward_is_dense():
    """Under torch.compile the no-grad training forward is the dense model too (the stack walk that looks for a
    reentrant checkpoint is a graph break), and the compiled SAT forward with grad mode on is unchanged."""
    torch._dynamo.reset()
    try:
        ids = _ids()
        with torch.no_grad():
            dense = tiny_model("llama").train()(ids).logits
        model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse"), 0.5,
                                     forward="sparse").train()
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, dense, rtol=1e-6, atol=1e-6)
        sat = compiled(ids).logits.detach()
        assert torch.equal(sat, model(ids).logits.detach()) and not torch.allclose(sat, dense)
    finally:
        torch._dynamo.reset()
