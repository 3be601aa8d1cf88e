"""Liger-Kernel with SAT: Liger's SwiGLU applied after ``replace_mlp`` replaces the SAT modules' forward and switches
SAT off; it is reported by ``patch_summary``, ``set_omission_rate``, ``sat_stats`` and ``SATCallback``. The other
order is refused with the remedy (``swiglu=False``), and Liger without its SwiGLU leaves SAT whole. Liger's kernels
themselves run in ``tests/liger_interpreter_cases.py`` (Triton interpreter, subprocess)."""
import functools
import importlib.util
import re
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sat_kernels as sk
from sat_kernels.forwards import replaced_forward

from helpers import run_interpreter_cases, tiny_model

CASES = Path(__file__).with_name("liger_interpreter_cases.py")
LIGER_SWIGLU = "liger_kernel.transformers.swiglu.LigerSwiGLUMLP.forward"
MLPS = ("model.layers.0.mlp", "model.layers.1.mlp")


@pytest.fixture
def apply_liger(monkeypatch):
    """Liger's ``apply_liger_kernel_to_llama``; the names of transformers' Llama module it rebinds are put back
    afterwards."""
    liger = pytest.importorskip("liger_kernel.transformers")
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    return liger.apply_liger_kernel_to_llama


def _no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def _trainer_hooks():
    from transformers import TrainerControl, TrainerState
    return None, TrainerState(max_steps=4), TrainerControl()


def test_liger_swiglu_after_replace_mlp_is_reported(apply_liger):
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    fresh = sk.replace_mlp(tiny_model("llama"), 0.5)   # built first: Liger also patches transformers' Llama classes
    apply_liger(model=model)   # Liger's defaults: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    assert [replaced_forward(model.get_submodule(name)) for name in MLPS] == [LIGER_SWIGLU] * 2
    summary = sk.patch_summary(model)["mlp"]
    assert not summary.complete and summary.replaced_forwards == {name: LIGER_SWIGLU for name in MLPS}
    assert summary.patched_layers == MLPS, "still SAT modules, running another forward"
    text = str(summary)
    assert re.search(r"forward replaced in 2 SAT modules \(model\.layers\.0\.mlp, model\.layers\.1\.mlp run "
                     r"liger_kernel\.transformers\.swiglu\.LigerSwiGLUMLP\.forward\): SAT does not run there\. "
                     r"Liger-Kernel's SwiGLU .* swiglu=False", text), text

    with pytest.warns(RuntimeWarning, match=r"set_omission_rate: forward replaced in 2 SAT modules .*swiglu=False"):
        sk.set_omission_rate(model, 0.25)
    _no_warning(lambda: sk.set_omission_rate(model, 0.5))   # once per module
    cb = sk.SATCallback(sk.LadderOmissionScheduler(0.5))
    with pytest.raises(ValueError, match=r"SATCallback: forward replaced in 2 SAT modules .*LigerSwiGLUMLP.*"
                                         r"swiglu=False.*the schedule would change nothing there"):
        cb.on_train_begin(*_trainer_hooks(), model=model)

    apply_liger(model=fresh, rope=False, rms_norm=False, fused_linear_cross_entropy=False)
    with pytest.warns(RuntimeWarning, match=r"sat_stats: forward replaced in 2 SAT modules .*swiglu=False"):
        assert sk.sat_stats(fresh) == {"mlp": {"layers": {}, "summary": {}}}
    _no_warning(lambda: sk.set_omission_rate(fresh, 0.5))


def test_liger_swiglu_after_replace_mlp_stops_the_trainer(apply_liger, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    apply_liger(model=model)
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[sk.SATCallback(sk.LadderOmissionScheduler(0.5))])
    with pytest.raises(ValueError, match=r"SATCallback: forward replaced .*swiglu=False"):
        trainer.train()


def _dense_mlp_forward(self, x):
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("how", ["instance attribute", "class attribute", "class swapped"])
def test_any_replaced_forward_is_reported(how, monkeypatch):
    """The forward replaced as kernel libraries do it, without Liger: bound as an instance attribute (Liger's
    ``_bind_method_to_module``), patched on the class, or the class swapped; wrappers that keep the SAT forward as
    ``__wrapped__`` (accelerate's hooks) are not replacements."""
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    mlp = model.model.layers[1].mlp
    if how == "instance attribute":
        mlp.__dict__["forward"] = types.MethodType(_dense_mlp_forward, mlp)
    elif how == "class attribute":
        monkeypatch.setattr(sk.SATMLP, "forward", _dense_mlp_forward)
    else:
        mlp.__class__ = type("PlainMLP", (torch.nn.Module,), {"forward": _dense_mlp_forward})
    ids = torch.randint(0, 96, (2, 9))
    model.train()(ids, labels=ids).loss.backward()
    grad = mlp.gate_proj.weight.grad
    assert int((grad.abs().sum(1) != 0).sum()) == 136, "SAT did not run: every neuron got a gradient"
    summary = sk.patch_summary(model)["mlp"]
    assert not summary.complete
    if how == "class swapped":
        assert summary.unpatched_layers == {"model.layers.1.mlp": "PlainMLP"}
        assert "a SAT module whose class was replaced by test_liger.PlainMLP" in summary.skipped["PlainMLP"]
    else:
        want = {"model.layers.1.mlp": "test_liger._dense_mlp_forward"}
        if how == "class attribute":
            want["model.layers.0.mlp"] = want["model.layers.1.mlp"]
        assert summary.replaced_forwards == want
        assert "swiglu" not in str(summary), "Liger's remedy only for Liger's forward"


def test_a_wrapped_sat_forward_is_not_a_replacement():
    """accelerate's module hooks (device maps, offloading) replace ``forward`` by a wrapper that calls the SAT forward
    and keeps it as ``__wrapped__``: SAT runs, and nothing is reported."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = sk.replace_mlp(tiny_model("llama"), 0.5).train()
    for _, mlp in sk.sat_modules(model):
        hooks.add_hook_to_module(mlp, hooks.ModelHook())
        assert "forward" in mlp.__dict__ and replaced_forward(mlp) is None
    old = model.model.layers[0].mlp.forward
    model.model.layers[0].mlp.forward = functools.wraps(old)(lambda *a, **k: old(*a, **k))
    assert replaced_forward(model.model.layers[0].mlp) is None
    assert sk.patch_summary(model)["mlp"].complete
    ids = torch.randint(0, 96, (2, 9))
    _no_warning(lambda: model(ids, labels=ids).loss.backward())
    assert sk.sat_stats(model)["mlp"]["summary"]["kept_min"] == sk.num_kept(136, 0.5)


def test_step_without_a_sat_forward_warns():
    """A Trainer step in which no SAT module ran a training forward (here: a no-grad forward, which runs dense)
    while the omission rate is above 0 gets one warning per run; a step at rate 0 none."""
    model = sk.replace_mlp(tiny_model("llama"), 0.5).train()
    ids = torch.randint(0, 96, (2, 9))
    args, state, control = _trainer_hooks()

    def step(forward, rate=0.5):
        schedule.rate = lambda step: rate
        cb.on_step_begin(args, state, control, model=model)
        forward()
        cb.on_step_end(args, state, control, model=model)
        state.global_step += 1

    def train():
        model(ids, labels=ids).loss.backward()

    def no_grad():
        with torch.no_grad():
            model(ids, labels=ids)

    schedule = sk.ConstantOmissionScheduler(0.5)
    cb = sk.SATCallback(schedule)
    cb.on_train_begin(args, state, control, model=model)
    _no_warning(lambda: step(train))
    with pytest.warns(RuntimeWarning, match=r"SATCallback: step 1 ran no training forward through the 2 SAT modules"):
        step(no_grad)
    _no_warning(lambda: step(no_grad))   # once per run
    cb.on_train_begin(args, state, control, model=model)
    _no_warning(lambda: step(no_grad, rate=0.0))


def test_replace_mlp_after_liger_swiglu_suggests_swiglu_false(apply_liger):
    model = tiny_model("llama")
    apply_liger(model=model)
    with pytest.raises(ValueError, match=r"replace_mlp: model\.layers\.0\.mlp runs Liger-Kernel's "
                                         r"liger_kernel\.transformers\.swiglu\.LigerSwiGLUMLP\.forward\. .*"
                                         r"swiglu=False.*on a model loaded again without Liger's SwiGLU"):
        sk.replace_mlp(model, 0.5)
    assert not any(isinstance(m, sk.SATMLP) for m in model.modules())

    # apply_liger_kernel_to_llama() (with model= too) puts LigerSwiGLUMLP in transformers' Llama module: the
    # models built afterwards have Liger's MLP class
    apply_liger(rope=False, rms_norm=False, fused_linear_cross_entropy=False)
    built = tiny_model("llama")
    assert type(built.model.layers[0].mlp).__name__ == "LigerSwiGLUMLP"
    with pytest.raises(ValueError, match=r"has no SwiGLU MLP .*its layers' LigerSwiGLUMLP: Liger-Kernel's "
                                         r"liger_kernel\.transformers\.swiglu\.LigerSwiGLUMLP: .*swiglu=False"):
        sk.replace_mlp(built, 0.5)
    assert "swiglu=False" in sk.patch_summary(built)["mlp"].skipped["LigerSwiGLUMLP"]


@pytest.mark.parametrize("order", ["liger after patching", "liger before patching"])
def test_liger_without_swiglu_leaves_sat_whole(apply_liger, order):
    model = tiny_model("llama")
    if order == "liger before patching":
        apply_liger(swiglu=False, model=model)
        sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5)
    else:
        apply_liger(swiglu=False, model=sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5))
    assert "liger_kernel" in model.model.norm.forward.__func__.__module__, "Liger's RMSNorm"
    summaries = sk.patch_summary(model)
    assert all(s.complete and not s.replaced_forwards for s in summaries.values()), summaries
    cb = sk.SATCallback(sk.LadderOmissionScheduler(0.5))
    _no_warning(lambda: cb.on_train_begin(*_trainer_hooks(), model=model))
    _no_warning(lambda: sk.set_omission_rate(model, 0.5))


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_liger_kernels_with_sat_in_the_triton_interpreter():
    """tests/liger_interpreter_cases.py under TRITON_INTERPRET=1 in a child process (about 15 s on 2 cores)."""
    run_interpreter_cases(CASES, timeout=600)
