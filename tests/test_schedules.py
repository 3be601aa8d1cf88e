"""Omission-rate schedules and the Trainer callback."""
import pytest
import torch

import sat_kernels as sk

from helpers import tiny_model


@pytest.mark.parametrize("total", [1, 7, 10, 100, 1001])
@pytest.mark.parametrize("rungs", [1, 2, 4])
def test_ladder_is_piecewise_constant_non_increasing_and_ends_dense(total, rungs):
    s = sk.LadderOmissionScheduler(0.5, total, num_rungs=rungs, dense_fraction=0.1)
    rates = [s.rate(t) for t in range(total + 5)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == 0.0 and rates[total - 1] == 0.0
    assert set(rates) <= {0.5 * (rungs - j) / rungs for j in range(rungs)} | {0.0}
    if total >= 10:
        assert rates[0] == 0.5 and len(set(rates)) == rungs + 1


def test_ladder_defaults():
    s = sk.LadderOmissionScheduler(0.5, total_steps=100)
    assert [s.rate(t) for t in (0, 44, 45, 89, 90, 99, 150)] == [0.5, 0.5, 0.25, 0.25, 0.0, 0.0, 0.0]
    assert s(0) == 0.5


def test_constant_and_linear():
    assert sk.ConstantOmissionScheduler(0.3).rate(10 ** 6) == 0.3
    lin = sk.LinearOmissionScheduler(0.5, total_steps=20, dense_fraction=0.0)
    assert lin.rate(0) == 0.5 and lin.rate(10) == 0.25 and lin.rate(20) == 0.0
    rates = [lin.rate(t) for t in range(25)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_dense_warmup():
    ladder = sk.LadderOmissionScheduler(0.5, total_steps=100, dense_warmup_steps=10)
    # warm-up 0..9 dense, rungs split steps 10..89 (40 each), then the dense final 10%
    assert [ladder.rate(t) for t in (0, 9, 10, 49, 50, 89, 90, 99)] == [0, 0, 0.5, 0.5, 0.25, 0.25, 0, 0]
    const = sk.ConstantOmissionScheduler(0.5, dense_warmup_steps=3)
    assert [const.rate(t) for t in range(5)] == [0, 0, 0, 0.5, 0.5]
    lin = sk.LinearOmissionScheduler(0.5, total_steps=30, dense_fraction=0.0, dense_warmup_steps=10)
    assert [lin.rate(t) for t in (0, 9, 10, 20, 29, 30)] == [0, 0, 0.5, 0.25, 0.5 * (1 - 19 / 20), 0]
    # without a warm-up the schedules are unchanged
    assert [sk.LadderOmissionScheduler(0.5, 100, dense_warmup_steps=0).rate(t) for t in range(100)] == \
        [sk.LadderOmissionScheduler(0.5, 100).rate(t) for t in range(100)]
    assert "dense_warmup_steps=10" in repr(ladder) and "dense_warmup_steps=3" in repr(const)
    # every scheduler names its warm-up, zero included
    assert repr(sk.ConstantOmissionScheduler(0.5)) == "ConstantOmissionScheduler(rate=0.5, dense_warmup_steps=0)"


def test_dense_warmup_errors():
    for make in (lambda w: sk.LadderOmissionScheduler(0.5, 10, dense_warmup_steps=w),
                 lambda w: sk.LinearOmissionScheduler(0.5, 10, dense_warmup_steps=w),
                 lambda w: sk.ConstantOmissionScheduler(0.5, dense_warmup_steps=w)):
        for bad in (-1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="dense_warmup_steps must be a non-negative integer"):
                make(bad)
    # 9 warm-up steps of 10 with the dense final step 9: no sparse step left
    with pytest.raises(ValueError, match="dense_warmup_steps=9 leaves no sparse step"):
        sk.LadderOmissionScheduler(0.5, 10, dense_warmup_steps=9).rate(0)
    with pytest.raises(ValueError, match="dense_warmup_steps=12 leaves no sparse step"):
        sk.LinearOmissionScheduler(0.5, 10, dense_warmup_steps=12).rate(0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="initial_rate"):
        sk.LadderOmissionScheduler(1.0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        sk.LadderOmissionScheduler(0.5, 0)
    with pytest.raises(ValueError, match="num_rungs"):
        sk.LadderOmissionScheduler(0.5, 10, num_rungs=0)
    with pytest.raises(ValueError, match="dense_fraction"):
        sk.LadderOmissionScheduler(0.5, 10, dense_fraction=1.5)
    with pytest.raises(ValueError, match="total_steps is not set"):
        sk.LadderOmissionScheduler(0.5).rate(0)
    with pytest.raises(ValueError, match="step"):
        sk.LadderOmissionScheduler(0.5, 10).rate(-1)
    with pytest.raises(ValueError, match="rate"):
        sk.ConstantOmissionScheduler(-0.5)


def test_callback_drives_the_rate_through_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    ids = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    seen = []

    class Record(sk.SATCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            super().on_step_begin(args, state, control, model=model, **kwargs)
            seen.append(next(m for m in model.modules() if isinstance(m, sk.SATMLP)).omission_rate)

    sched = sk.LadderOmissionScheduler(0.5, num_rungs=2, dense_fraction=0.25)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Record(sched)])
    trainer.train()
    assert sched.total_steps == 8
    assert seen == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.0, 0.0]
    logged = [h["sat_omission_rate"] for h in trainer.state.log_history if "loss" in h]
    assert logged == seen


def _train(model, callbacks, tmp_path, steps):
    """Train ``model`` for ``steps`` steps; returns the trainer and each step's (MLP rates, attention rates) as the
    modules held them during the step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids = torch.randint(0, 96, (2 * steps, 12), generator=torch.Generator().manual_seed(0))
    seen = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(tuple(tuple(sorted({m.omission_rate for m in model.modules() if isinstance(m, kind)}))
                              for kind in (sk.SATMLP, sk.SATAttention)))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                      callbacks=[*callbacks, Record()])
    trainer.train()
    return trainer, seen


def _logged(trainer, key):
    return [h.get(key) for h in trainer.state.log_history if "loss" in h]


def test_callback_schedules_mlp_and_attention_separately(tmp_path):
    """replace_mlp(m, 0.5); replace_attention(m, 0.25): an MLP schedule leaves attention at its own rate; an attention
    schedule drives attention alone and is logged as sat_attn_omission_rate."""
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5), 0.25)
    mlp_only = sk.SATCallback(mlp=sk.LadderOmissionScheduler(0.5, num_rungs=2, dense_fraction=0.25))
    trainer, seen = _train(model, [mlp_only], tmp_path, 4)
    assert seen == [((0.5,), (0.25,)), ((0.5,), (0.25,)), ((0.25,), (0.25,)), ((0.0,), (0.25,))]
    assert _logged(trainer, "sat_omission_rate") == [0.5, 0.5, 0.25, 0.0]
    assert _logged(trainer, "sat_attn_omission_rate") == [None] * 4

    both = sk.SATCallback(mlp=sk.ConstantOmissionScheduler(0.5),
                          attention=sk.LinearOmissionScheduler(0.5, dense_fraction=0.0))
    trainer, seen = _train(model, [both], tmp_path, 4)
    assert seen == [((0.5,), (0.5,)), ((0.5,), (0.375,)), ((0.5,), (0.25,)), ((0.5,), (0.125,))]
    assert _logged(trainer, "sat_omission_rate") == [0.5] * 4
    assert _logged(trainer, "sat_attn_omission_rate") == [0.5, 0.375, 0.25, 0.125]

    attention_only = sk.SATCallback(attention=sk.ConstantOmissionScheduler(0.125))
    trainer, seen = _train(sk.set_omission_rate(model, mlp=0.375), [attention_only], tmp_path, 2)
    assert seen == [((0.375,), (0.125,))] * 2
    assert _logged(trainer, "sat_attn_omission_rate") == [0.125] * 2
    assert _logged(trainer, "sat_omission_rate") == [None] * 2


def test_callback_one_schedule_drives_every_kind_and_warns_over_different_rates(tmp_path):
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5), 0.25)
    with pytest.warns(UserWarning, match=r"MLP \[0.5\], attention \[0.25\].*SATCallback\(mlp=..., attention=...\)"):
        trainer, seen = _train(model, [sk.SATCallback(sk.ConstantOmissionScheduler(0.375))], tmp_path, 2)
    assert seen == [((0.375,), (0.375,))] * 2
    assert _logged(trainer, "sat_omission_rate") == [0.375] * 2
    # a schedule for one kind overrides the shared one for that kind only
    cb = sk.SATCallback(sk.ConstantOmissionScheduler(0.25), attention=sk.ConstantOmissionScheduler(0.125))
    trainer, seen = _train(model, [cb], tmp_path, 2)
    assert seen == [((0.25,), (0.125,))] * 2


def test_callback_logs_selection_statistics(tmp_path):
    """Beside sat_omission_rate: the kept count, the kept share of the score mass and the non-finite scores of the
    step's MLP layers (mean and min over layers; sums for the counts)."""
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    cb = sk.SATCallback(sk.LadderOmissionScheduler(0.5, num_rungs=2, dense_fraction=0.25))
    trainer, _ = _train(model, [cb], tmp_path, 4)
    assert _logged(trainer, "sat_omission_rate") == [0.5, 0.5, 0.25, 0.0]
    assert _logged(trainer, "sat_mlp_kept_min") == [68, 68, 102, 136] == _logged(trainer, "sat_mlp_kept_mean")
    mass_min, mass_mean = _logged(trainer, "sat_mlp_kept_mass_min"), _logged(trainer, "sat_mlp_kept_mass_mean")
    assert all(0 < lo <= mean < 1 for lo, mean in zip(mass_min[:3], mass_mean[:3]))
    assert mass_min[0] < mass_min[2] and mass_min[3] == mass_mean[3] == 1.0
    assert _logged(trainer, "sat_mlp_nonfinite") == [0] * 4 == _logged(trainer, "sat_mlp_nonfinite_total")
    assert not any(key.startswith("sat_attn_") for h in trainer.state.log_history for key in h), "no SAT attention"


def test_callback_logs_attention_statistics_beside_the_mlp_ones(tmp_path):
    """With SAT attention modules: sat_attn_* (kept heads of 4, their score mass, non-finite scores) beside sat_mlp_*,
    also for attention at a fixed rate of its own."""
    summary = {"kept_mean", "kept_min", "kept_mass_mean", "kept_mass_min", "nonfinite", "nonfinite_total"}
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5), 0.5)
    cb = sk.SATCallback(mlp=sk.ConstantOmissionScheduler(0.5),
                        attention=sk.LadderOmissionScheduler(0.5, num_rungs=2, dense_fraction=0.25))
    trainer, _ = _train(model, [cb], tmp_path, 4)
    keys = {f"sat_{kind}_{key}" for kind in ("mlp", "attn") for key in summary} | {"sat_attn_omission_rate"}
    for h in trainer.state.log_history:
        if "loss" in h:
            assert {key for key in h if key.startswith(("sat_mlp_", "sat_attn_"))} == keys
    assert _logged(trainer, "sat_attn_omission_rate") == [0.5, 0.5, 0.25, 0.0]
    assert _logged(trainer, "sat_attn_kept_min") == [2, 2, 3, 4] == _logged(trainer, "sat_attn_kept_mean")
    mass_min, mass_mean = _logged(trainer, "sat_attn_kept_mass_min"), _logged(trainer, "sat_attn_kept_mass_mean")
    assert all(0 < lo <= mean < 1 for lo, mean in zip(mass_min[:3], mass_mean[:3]))
    assert mass_min[3] == mass_mean[3] == 1.0
    assert _logged(trainer, "sat_attn_nonfinite") == [0] * 4 == _logged(trainer, "sat_attn_nonfinite_total")
    assert _logged(trainer, "sat_mlp_kept_min") == [68] * 4

    mlp_only = sk.SATCallback(mlp=sk.ConstantOmissionScheduler(0.25))
    trainer, _ = _train(sk.set_omission_rate(model, attention=0.25), [mlp_only], tmp_path, 2)
    assert _logged(trainer, "sat_attn_kept_min") == [3, 3], "attention at its own rate, without a schedule"


def test_callback_reused_for_another_run_takes_its_total_steps(tmp_path):
    """A callback (and scheduler) reused for a second train() schedules over the second run's max_steps; a
    total_steps the user set stays."""
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    sched = sk.LadderOmissionScheduler(0.5, num_rungs=1, dense_fraction=0.5)
    cb = sk.SATCallback(sched)
    _, seen = _train(model, [cb], tmp_path, 2)
    assert [m for m, _ in seen] == [(0.5,), (0.0,)] and sched.total_steps == 2
    _, seen = _train(model, [cb], tmp_path, 6)
    assert [m for m, _ in seen] == [(0.5,)] * 3 + [(0.0,)] * 3 and sched.total_steps == 6
    fixed = sk.LadderOmissionScheduler(0.5, total_steps=2, num_rungs=1, dense_fraction=0.5)
    cb = sk.SATCallback(fixed)
    _train(model, [cb], tmp_path, 3)
    _, seen = _train(model, [cb], tmp_path, 4)
    assert [m for m, _ in seen] == [(0.5,)] + [(0.0,)] * 3 and fixed.total_steps == 2
    # another callback did not fill in sched.total_steps (6): to it, that is a value the user set
    _, seen = _train(model, [sk.SATCallback(sched)], tmp_path, 4)
    assert [m for m, _ in seen] == [(0.5,)] * 3 + [(0.0,)] and sched.total_steps == 6


def test_callback_requires_a_patched_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 96, (4, 12))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                      callbacks=[sk.SATCallback(sk.ConstantOmissionScheduler(0.5))])
    with pytest.raises(ValueError, match="replace_mlp"):
        trainer.train()
    with pytest.raises(TypeError, match="rate"):
        sk.SATCallback(0.5)
    with pytest.raises(TypeError, match="attention"):
        sk.SATCallback(mlp=sk.ConstantOmissionScheduler(0.5), attention=0.25)
    with pytest.raises(TypeError, match="needs a schedule"):
        sk.SATCallback()
    trainer = Trainer(model=sk.replace_mlp(tiny_model("llama")), args=args,
                      train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                      callbacks=[sk.SATCallback(attention=sk.ConstantOmissionScheduler(0.5))])
    with pytest.raises(ValueError, match="no SAT attention modules.*replace_attention"):
        trainer.train()
