"""``sk.hold_selection``: under gradient accumulation the micro-batches of an optimizer step keep the selection of the
first, against the fp64 references (MLP and attention), through the model, activation checkpointing,
``torch.compile``, the Trainer (``SATCallback(hold_selection=True)``) and ``sat-train --grad-accum``."""
import copy
import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import sat_kernels as sk
from sat_kernels.ops.attention import sat_attention_kept
from sat_kernels.ops.mlp import sat_mlp_kept
from sat_kernels.ops.reference import reference_attention, reference_indices, reference_mlp
from sat_kernels.ops.selector import SelectionHold

from helpers import make_operands, tiny_model
from test_attention import make_attention_operands


def _ids(seed, shape=(2, 12)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _zero_rows(proj: torch.nn.Linear) -> int:
    """Rows of ``proj.weight`` that got no gradient."""
    return int((proj.weight.grad.abs().sum(1) == 0).sum())


def _second_batch(x1, seed, differs):
    """An input like ``x1`` whose own selection differs from ``x1``'s (``differs(x)``), so that reuse is visible."""
    for s in range(seed, seed + 20):
        x2 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(s), dtype=x1.dtype)
        if differs(x2):
            return x2
    raise AssertionError("no second batch selects differently")


@pytest.mark.parametrize("mode", [dict(forward="sparse"), dict(forward="dense"),
                                  dict(forward="dense", backward="exact_input")],
                         ids=["sparse", "dense", "exact_input"])
def test_mlp_second_forward_reuses_the_first_selection_fp64(mode):
    (x1, wg, wu, wd), dy1 = make_operands(21, 16, 40, torch.float64, seed=3)
    k = sk.num_kept(40, 0.5)
    ws = [w.detach() for w in (wg, wu, wd)]
    idx1 = reference_indices(x1.detach(), *ws, 0.5)
    x2 = _second_batch(x1.detach(), 10, lambda x: not torch.equal(reference_indices(x, *ws, 0.5), idx1))
    dy2 = torch.randn(dy1.shape, generator=torch.Generator().manual_seed(7), dtype=dy1.dtype)
    hold = SelectionHold()
    stats1, stats2 = {}, {}
    y1, got1 = sat_mlp_kept(x1, wg, wu, wd, k, return_indices=True, hold=hold, stats=stats1, **mode)
    x2 = x2.requires_grad_()
    y2, got2 = sat_mlp_kept(x2, wg, wu, wd, k, return_indices=True, hold=hold, stats=stats2, **mode)
    assert torch.equal(got1, idx1) and torch.equal(got2, idx1) and torch.equal(hold.selection.indices, idx1)
    assert stats2["kept"] == k and torch.equal(stats2["kept_mass"], stats1["kept_mass"])
    assert int(stats2["nonfinite"]) == 0
    grads = torch.autograd.grad((y1 * dy1).sum() + (y2 * dy2).sum(), (x2, wg, wu, wd))

    leaves = [t.detach().clone().requires_grad_() for t in (x1, x2, wg, wu, wd)]
    r1 = reference_mlp(leaves[0], *leaves[2:], idx1, **mode)
    r2 = reference_mlp(leaves[1], *leaves[2:], idx1, **mode)
    ref = torch.autograd.grad((r1 * dy1).sum() + (r2 * dy2).sum(), leaves[1:])
    torch.testing.assert_close(y2.detach(), r2.detach(), rtol=1e-12, atol=1e-12)
    for name, g, r in zip(["x2", "w_gate", "w_up", "w_down"], grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
    assert int((grads[1].abs().sum(1) == 0).sum()) == 40 - k, "the zero rows of one selection"


def test_mlp_new_kept_count_selects_again():
    (x, wg, wu, wd), _ = make_operands(9, 8, 24, torch.float64)
    hold = SelectionHold()
    _, a = sat_mlp_kept(x, wg, wu, wd, 12, return_indices=True, hold=hold)
    _, b = sat_mlp_kept(x, wg, wu, wd, 6, return_indices=True, hold=hold)
    assert a.numel() == 12 and b.numel() == 6 and torch.equal(hold.selection.indices, b)


@pytest.mark.parametrize("unit", ["head", "group"])
def test_attention_second_forward_reuses_the_first_selection_fp64(unit):
    B, T, h, H, G, d = 2, 11, 24, 4, 2, 6
    t, const, dy1 = make_attention_operands(B, T, h, H, G, d, torch.float64, seed=1)
    k = sk.num_kept(H if unit == "head" else G, 0.5)
    weights = {n: v for n, v in t.items() if n != "x"}
    x1 = t["x"]

    def own_heads(x):
        return sk.sat_attention(x.detach(), **{n: v.detach() for n, v in weights.items()}, omission_rate=0.5,
                                unit=unit, return_indices=True, **const)[1]

    heads1 = own_heads(x1)
    x2 = _second_batch(x1.detach(), 20, lambda x: not torch.equal(own_heads(x), heads1)).requires_grad_()
    dy2 = torch.randn(dy1.shape, generator=torch.Generator().manual_seed(5), dtype=dy1.dtype)
    hold, stats = SelectionHold(), {}
    y1, h1, _, _ = sat_attention_kept(x1, *weights.values(), k, unit=unit, hold=hold, **const)
    y2, h2, _, _ = sat_attention_kept(x2, *weights.values(), k, unit=unit, hold=hold, stats=stats, **const)
    assert torch.equal(h1, heads1) and torch.equal(h2, heads1)
    assert stats["kept"] == k and int(stats["nonfinite"]) == 0
    names = list(weights)
    grads = torch.autograd.grad((y1 * dy1).sum() + (y2 * dy2).sum(), [x2, *weights.values()])
    leaves = {n: v.detach().clone().requires_grad_() for n, v in weights.items()}
    x1r, x2r = x1.detach(), x2.detach().clone().requires_grad_()
    r1 = reference_attention(x1r, *leaves.values(), heads1, **const)
    r2 = reference_attention(x2r, *leaves.values(), heads1, **const)
    ref = torch.autograd.grad((r1 * dy1).sum() + (r2 * dy2).sum(), [x2r, *leaves.values()])
    torch.testing.assert_close(y2.detach(), r2.detach(), rtol=1e-10, atol=1e-12)
    for name, g, r in zip(["x2", *names], grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)


def _accumulate(model, batches, hold: bool):
    if hold:
        with sk.hold_selection(model) as held:
            for ids in batches:
                model(input_ids=ids, labels=ids).loss.backward()
            assert held.selected == len(held.modules)
    else:
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()


def test_model_accumulated_gradient_has_the_zero_rows_of_one_selection():
    """4 micro-batches at omission 0.5: holding, exactly half of the MLP rows and of the attention heads get no
    gradient (one selection); selecting per micro-batch, fewer (only the units every micro-batch omitted)."""
    batches = [_ids(s) for s in range(4)]
    rows = {}
    for hold in (False, True):
        model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5, forward="dense"), 0.5,
                                     forward="dense").train()
        _accumulate(model, batches, hold)
        layer = model.model.layers[0]
        rows[hold] = (_zero_rows(layer.mlp.gate_proj), _zero_rows(layer.self_attn.q_proj))
        assert all(m._hold is None for _, m in sk.sat_modules(model)), "leaving the block forgets the selections"
    assert rows[True] == (68, 24)
    assert rows[False][0] < 68


def test_eval_and_no_grad_forwards_neither_use_nor_fill_the_hold():
    model = sk.replace_mlp(tiny_model("llama"), 0.5).train()
    with sk.hold_selection(model) as held:
        with torch.no_grad():
            model(input_ids=_ids(0))
        model.eval()
        model(input_ids=_ids(0))
        model.train()
        assert held.selected == 0
        model(input_ids=_ids(1), labels=_ids(1)).loss.backward()
        assert held.selected == 2
    assert held.selected == 0


def test_rate_change_inside_the_block_selects_again():
    model = sk.replace_mlp(tiny_model("llama"), 0.5).train()
    with sk.hold_selection(model, "mlp"):
        model(input_ids=_ids(0), labels=_ids(0)).loss.backward()
        sk.set_omission_rate(model, 0.25)
        model(input_ids=_ids(1), labels=_ids(1)).loss.backward()
        held = model.model.layers[0].mlp._hold.selection
        assert held.indices.numel() == sk.num_kept(136, 0.25)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_reuses_the_hold(reentrant):
    """The recompute of a checkpointed layer (and the no-grad first pass of the reentrant one) see the held
    selection: the gradients equal those of the same model without checkpointing."""
    batches = [_ids(s) for s in range(3)]
    plain = sk.replace_mlp(tiny_model("llama"), 0.5, forward="dense").train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for model in (plain, ckpt):
        _accumulate(model, batches, hold=True)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert _zero_rows(ckpt.model.layers[1].mlp.up_proj) == 68
    # a checkpoint around the module itself, called twice in the block
    mlp = sk.replace_mlp(tiny_model("llama"), 0.5).model.layers[0].mlp.train()
    x = torch.randn(2, 5, 48, requires_grad=True)
    holder = torch.nn.ModuleDict({"mlp": mlp})
    with sk.hold_selection(holder):
        for _ in range(2):
            checkpoint(mlp, x, use_reentrant=reentrant).sum().backward()
    assert _zero_rows(mlp.gate_proj) == 68


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_equals_eager(fresh_dynamo):
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5, forward="dense"), 0.5,
                                 forward="dense").train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    batches = [_ids(s) for s in range(3)]
    with sk.hold_selection(model):
        for ids in batches:
            compiled(input_ids=ids, labels=ids).loss.backward()
    _accumulate(eager, batches, hold=True)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert _zero_rows(model.model.layers[0].mlp.gate_proj) == 68


def test_errors():
    with pytest.raises(ValueError, match="no SAT modules"):
        sk.hold_selection(tiny_model("llama"))
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    with pytest.raises(ValueError, match="no SAT attention modules"):
        sk.hold_selection(model, "attention")
    with pytest.raises(ValueError, match="kind must be"):
        sk.hold_selection(model, "moe")
    outer = sk.hold_selection(model)
    with outer:
        with pytest.raises(RuntimeError, match="already held"):
            sk.hold_selection(model).__enter__()
        with pytest.raises(RuntimeError, match="already open"):
            outer.__enter__()
    with sk.hold_selection(model):   # closed: a new one opens
        pass


def _trainer_zero_rows(tmp_path, hold: bool):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    seen = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append(_zero_rows(model.model.layers[0].mlp.gate_proj))

    model = sk.replace_mlp(tiny_model("llama"), 0.5, forward="dense")
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1,
                             gradient_accumulation_steps=4, report_to=[], save_strategy="no", use_cpu=True,
                             learning_rate=1e-3, disable_tqdm=True, logging_steps=1)
    callback = sk.SATCallback(sk.ConstantOmissionScheduler(0.5), hold_selection=hold)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
            callbacks=[callback, Record()]).train()
    assert all(m._hold is None for _, m in sk.sat_modules(model))
    return seen


def test_trainer_callback_holds_each_optimizer_step(tmp_path):
    held = _trainer_zero_rows(tmp_path, hold=True)
    per_micro_batch = _trainer_zero_rows(tmp_path, hold=False)
    assert held == [68, 68]
    assert all(r < 68 for r in per_micro_batch)


def test_cli_grad_accum_and_hold_selection(tmp_path, capsys):
    """``sat-train --grad-accum 2`` equals one batch for dense; ``--hold-selection`` changes the SAT run and is
    recorded; the options are checked."""
    from sat_kernels.train.cli import main
    from tiny_train import write_tiny_dir

    tiny = write_tiny_dir(tmp_path / "tiny")
    common = ["--model", str(tiny / "llama"), "--data", str(tiny / "corpus.txt"), "--steps", "3", "--seq-len",
              "16", "--batch-size", "4", "--scheduler", "constant", "--output-dir", str(tmp_path), "--no-progress",
              "--timing-repeats", "0"]
    runs = {}
    for name, extra in (("one", []), ("accum", ["--grad-accum", "2"]),
                        ("hold", ["--grad-accum", "2", "--hold-selection"])):
        assert main(common + ["--compare", "--name", name] + extra) == 0
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["config"]["grad_accum"] == (2 if extra else 1)
        assert report["config"]["hold_selection"] == (name == "hold")
        runs[name] = report["runs"]
    capsys.readouterr()
    for name in ("accum", "hold"):
        assert runs[name]["dense"]["losses"] == pytest.approx(runs["one"]["dense"]["losses"], rel=1e-5)
        assert runs[name]["SAT"]["losses"][0] == pytest.approx(runs["one"]["SAT"]["losses"][0], rel=1e-5)
    assert runs["hold"]["SAT"]["losses"][1:] != pytest.approx(runs["accum"]["SAT"]["losses"][1:], rel=1e-6)
    for argv, message in ((["--hold-selection"], "--hold-selection needs --grad-accum > 1"),
                          (["--grad-accum", "3"], "--grad-accum 3 must divide the batch size (4"),
                          (["--grad-accum", "2", "--time-to-quality"], "--grad-accum is not supported with")):
        with pytest.raises(SystemExit):
            main(common + argv)
        assert message in capsys.readouterr().err


def test_lora_mlp_adapters_get_the_rows_of_one_selection():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(sk.replace_mlp(tiny_model("llama"), 0.5, forward="dense"),
                                peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                init_lora_weights=False)).train()
    _accumulate(model, [_ids(s) for s in range(3)], hold=True)
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    lora_b = gate.lora_B["default"].weight
    assert int((lora_b.grad.abs().sum(1) == 0).sum()) == 136 - sk.num_kept(136, 0.5)
