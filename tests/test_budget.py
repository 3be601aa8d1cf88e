"""PerLayerBudget: the total kept count of the uniform rate, split over the layers by their score mass."""
import pytest
import torch

import sat_kernels as sk
from sat_kernels.budget import PerLayerBudget, _split

from helpers import tiny_model


@pytest.mark.parametrize("total,shares,caps", [
    (10, [0.5, 0.3, 0.2], [8, 8, 8]), (20, [0.9, 0.05, 0.05], [8, 8, 8]), (3, [1.0, 0.0, 0.0], [5, 5, 5]),
    (100, [0.2, 0.8], [8, 8]), (7, [0.0, 0.0], [4, 4]), (1000, [0.25] * 4, [300, 100, 400, 300])])
def test_split_keeps_the_total_within_caps(total, shares, caps):
    counts = _split(total, shares, caps)
    assert sum(counts) == min(total, sum(caps))
    assert all(1 <= c <= cap for c, cap in zip(counts, caps))
    if total <= sum(caps) and all(s * total <= cap for s, cap in zip(shares, caps)) and min(shares) > 0:
        assert all(abs(c - s * total) <= 1 + 1e-9 for c, s in zip(counts, shares))


def _fake_scores(model, per_layer):
    for (_, m), scores in zip(sk.patching.sat_modules(model, "mlp"), per_layer):
        m._last_stats = {"kept": m._kept, "kept_mass": 1.0, "nonfinite": 0, "scores": scores}


def test_the_flatter_layer_gets_more_and_the_split_is_the_global_top_of_normalised_scores():
    model = sk.replace_mlp(tiny_model("llama"), 0.5)          # 2 layers of 136 neurons, k 68 each
    budget = PerLayerBudget(model, momentum=0.0)
    assert budget.kept() == {"model.layers.0.mlp": 68, "model.layers.1.mlp": 68}
    g = torch.Generator().manual_seed(0)
    peaked = torch.rand(136, generator=g) ** 8 * 10           # mass in few neurons
    flat = torch.rand(136, generator=g) + 1.0
    _fake_scores(model, [peaked, flat])
    budget.observe()
    budget.apply()
    k0, k1 = budget.kept().values()
    assert k0 + k1 == 136 and k1 > k0
    # the same counts as a brute-force global top-136 of the scores normalised per layer
    every = torch.cat([peaked / peaked.sum(), flat / flat.sum()])
    top = torch.topk(every, 136).indices
    assert (k0, k1) == (int((top < 136).sum()), int((top >= 136).sum()))
    # a new rate sets the uniform counts; apply splits their total again by the same shares
    sk.set_omission_rate(model, 0.25)
    assert budget.kept() == {"model.layers.0.mlp": 102, "model.layers.1.mlp": 102}
    budget.apply()
    assert sum(budget.kept().values()) == 204 and budget.kept()["model.layers.1.mlp"] > 102
    sk.set_omission_rate(model, 0.0)
    budget.apply()
    assert budget.kept() == {"model.layers.0.mlp": 136, "model.layers.1.mlp": 136}


def test_moving_average_and_real_forwards():
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    budget, measured = PerLayerBudget(model, momentum=0.5), PerLayerBudget(model, momentum=0.0)
    budget.apply()
    assert list(budget.kept().values()) == [68, 68], "uniform before any observation"
    previous = None
    for step in range(3):
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        budget.observe()
        measured.observe()
        expected = measured.shares if previous is None else [0.5 * p + 0.5 * m
                                                               for p, m in zip(previous, measured.shares)]
        assert budget.shares == pytest.approx(expected)
        previous = list(budget.shares)
        sk.set_omission_rate(model, 0.5)
        budget.apply()
        assert sum(budget.kept().values()) == 136
    model(ids, labels=ids).loss.backward()
    stats = sk.sat_stats(model)["mlp"]["layers"]
    assert {name: s["kept"] for name, s in stats.items()} == budget.kept() != {name: 68 for name in stats}


def test_callback_splits_the_schedule_total(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append([m._kept for _, m in sk.patching.sat_modules(model, "mlp")])

    ids = torch.randint(0, 96, (12, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True, logging_steps=1)
    callback = sk.SATCallback(sk.LadderOmissionScheduler(0.5, num_rungs=1, dense_fraction=1 / 6),
                              per_layer_budget=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
            callbacks=[callback, Record()]).train()
    assert seen[0] == [68, 68], "the first step is uniform"
    assert all(sum(k) == 136 for k in seen[:5]) and any(k != [68, 68] for k in seen[1:5])
    assert seen[5] == [136, 136], "the dense tail keeps every neuron"


def test_errors():
    with pytest.raises(ValueError, match="no SAT mlp modules"):
        PerLayerBudget(tiny_model("llama"))
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        PerLayerBudget(model, momentum=1.0)
    with pytest.raises(ValueError, match="kind"):
        PerLayerBudget(model, kind="moe")


def test_lora_mlps_keep_their_scores_for_the_budget():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(sk.replace_mlp(tiny_model("llama"), 0.5),
                                peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    budget = PerLayerBudget(model, momentum=0.0)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    budget.observe()
    assert budget.shares is not None and sum(budget.shares) == pytest.approx(1.0)
    assert all(m._last_stats["scores"].shape == (136,) for m in budget.modules)
