"""skip_omitted_updates: omitted units keep their weights and optimizer state through a step, kept units are updated
exactly as by the plain optimizer; gradient accumulation, LoRA adapters, the Trainer callback and refusals."""
import copy

import pytest
import torch

import sat_kernels as sk
from sat_kernels.optim import _unit_parameters

from helpers import tiny_model

OPTIMIZERS = {"adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
              "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1)}


def _ids(seed, shape=(2, 11)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _plain_step(model, optimizer, make):
    """What the plain optimizer would make of this step: parameters, state and grads copied into a fresh one."""
    params = [p.detach().clone().requires_grad_(p.requires_grad) for p in model.parameters() if p.requires_grad]
    ref = make(params)
    ref.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # load_state_dict alone would share the tensors
    for p, src in zip(params, (p for p in model.parameters() if p.requires_grad)):
        p.grad = None if src.grad is None else src.grad.clone()
    ref.step()
    return {id(src): (p, ref.state[p]) for p, src in zip(params, (p for p in model.parameters() if p.requires_grad))}


def _omitted(grad, axis):
    other = [d for d in range(grad.dim()) if d != axis]
    return ~((grad != 0).any(dim=other) if other else grad != 0)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_omitted_units_keep_weights_and_state_kept_units_update_as_plain(opt, micro_batches):
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5), 0.5)
    optimizer = OPTIMIZERS[opt](model.parameters())
    sk.skip_omitted_updates(model, optimizer)
    omitted_seen, moved_without = 0, 0
    for step in range(3):
        optimizer.zero_grad()
        for micro in range(micro_batches):
            ids = _ids(10 * step + micro)
            model(ids, labels=ids).loss.backward()
        units = list(_unit_parameters(model))
        assert len(units) == 2 * (3 + 4)   # 2 layers: gate/up/down, q/k/v/o weights (no biases in Llama)
        before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
                                               if torch.is_tensor(v) and v.shape == p.shape})
                  for _, p, _ in units}
        masks = {id(p): _omitted(p.grad, axis) for _, p, axis in units}
        plain = _plain_step(model, optimizer, OPTIMIZERS[opt])
        optimizer.step()
        for name, p, axis in units:
            mask, (ref_p, ref_state) = masks[id(p)], plain[id(p)]
            old_p, old_state = before[id(p)]
            kept = ~mask
            # omitted: untouched weights and state (state created by step 0 starts at zero)
            assert torch.equal(p.index_select(axis, mask.nonzero().squeeze(1)),
                               old_p.index_select(axis, mask.nonzero().squeeze(1))), name
            for key, value in optimizer.state[p].items():
                if not torch.is_tensor(value) or value.shape != p.shape:
                    continue
                old = old_state.get(key, torch.zeros_like(value))
                idx = mask.nonzero().squeeze(1)
                assert torch.equal(value.index_select(axis, idx), old.index_select(axis, idx)), (name, key)
                kidx = kept.nonzero().squeeze(1)
                assert torch.equal(value.index_select(axis, kidx), ref_state[key].index_select(axis, kidx))
            # kept: exactly the plain optimizer's update
            kidx = kept.nonzero().squeeze(1)
            assert torch.equal(p.index_select(axis, kidx), ref_p.index_select(axis, kidx)), name
            omitted_seen += int(mask.sum())
            moved_without += int((ref_p.index_select(axis, mask.nonzero().squeeze(1))
                                  != old_p.index_select(axis, mask.nonzero().squeeze(1))).any())
    assert omitted_seen > 0 and moved_without > 0   # the plain optimizer would have moved omitted units


def test_accumulated_micro_batches_skip_only_units_omitted_in_all():
    model = sk.replace_mlp(tiny_model("llama"), 0.75)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sk.skip_omitted_updates(model, optimizer)
    gate = model.model.layers[0].mlp.gate_proj.weight
    kept_per_micro = []
    for micro in range(2):
        before = gate.grad.clone() if gate.grad is not None else torch.zeros_like(gate)
        ids = _ids(micro, (1, 9))
        model(ids, labels=ids).loss.backward()
        kept_per_micro.append((gate.grad - before != 0).any(dim=1))
    union = kept_per_micro[0] | kept_per_micro[1]
    k = sk.num_kept(gate.shape[0], 0.75)
    assert int(kept_per_micro[0].sum()) == int(kept_per_micro[1].sum()) == k and int(union.sum()) > k
    old = gate.detach().clone()
    optimizer.step()
    changed = (gate != old).any(dim=1)
    assert torch.equal(changed, union)


def test_lora_adapters_skip_the_rows_and_columns_of_omitted_neurons():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(sk.replace_mlp(tiny_model("llama"), 0.5),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                init_lora_weights=False))
    names = sorted(name.split(".mlp.")[1] for name, _, _ in _unit_parameters(model) if ".layers.0." in name)
    assert names == ["down_proj.lora_A.default.weight", "gate_proj.lora_B.default.weight",
                     "up_proj.lora_B.default.weight"]   # the frozen base weights have no gradient
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    sk.skip_omitted_updates(model, optimizer)
    mlp = model.base_model.model.model.layers[0].mlp
    b_gate, a_down = mlp.gate_proj.lora_B["default"].weight, mlp.down_proj.lora_A["default"].weight
    ids = _ids(0)
    model(ids, labels=ids).loss.backward()
    omitted = ~(b_gate.grad != 0).any(dim=1)
    assert torch.equal(omitted, ~(a_down.grad != 0).any(dim=0)) and int(omitted.sum()) == 136 - sk.num_kept(136, 0.5)
    old_b, old_a = b_gate.detach().clone(), a_down.detach().clone()
    optimizer.step()
    assert torch.equal(b_gate[omitted], old_b[omitted]) and (b_gate[~omitted] != old_b[~omitted]).all()
    assert torch.equal(a_down[:, omitted], old_a[:, omitted]) and (a_down[:, ~omitted] != old_a[:, ~omitted]).any()


def test_removed_hooks_leave_the_optimizer_plain():
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = sk.skip_omitted_updates(model, optimizer)
    handle.remove()
    gate = model.model.layers[0].mlp.gate_proj.weight
    old = gate.detach().clone()
    ids = _ids(0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert (gate != old).any(dim=1).all()   # weight decay moves every row, omitted or not


@pytest.mark.parametrize("skip", [False, True])
def test_trainer_callback_installs_and_removes_the_hooks(tmp_path, skip):
    from transformers import Trainer, TrainingArguments

    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    gate = model.model.layers[0].mlp.gate_proj.weight
    old = gate.detach().clone()
    ids = _ids(0, (2, 12))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2, weight_decay=0.1,
                             disable_tqdm=True)
    callback = sk.SATCallback(sk.ConstantOmissionScheduler(0.5), skip_omitted_updates=skip)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                      callbacks=[callback])
    trainer.train()
    unchanged = int((gate == old).all(dim=1).sum())
    # one step: the omitted rows have a zero gradient, so only weight decay would move them
    assert unchanged == (136 - sk.num_kept(136, 0.5) if skip else 0)
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert callback._skip_handle is None
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks


def test_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no SAT modules"):
        sk.skip_omitted_updates(model, torch.optim.AdamW(model.parameters()))
    sk.replace_mlp(model, 0.5)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sk.skip_omitted_updates(model, object())
