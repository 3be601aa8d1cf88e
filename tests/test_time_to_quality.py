"""``sat-train --time-to-quality``: the mechanics (target from the dense arm, SAT's time to it, the ratio, the
equal-time loss, the JSON record and the plot) on a tiny random Llama, not the outcome."""
import json

import pytest
import torch

import sat_kernels as sk
from sat_kernels.train.cli import main
from sat_kernels.train.runner import TrainConfig, train_run
from sat_kernels.train.time_to_quality import (CONTROL_NAME, analyse, as_dense_steps, attach_control, first_reached,
                                               loss_at_seconds, reanalyse, relative_step_costs, run_time_to_quality,
                                               sat_step_budget, seconds_at_loss, title)

from tiny_train import tiny_setup, write_tiny_dir



@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_dir(tmp_path_factory.mktemp("tiny"))


EVALS = [{"step": 0, "seconds": 0.0, "eval_loss": 3.0}, {"step": 2, "seconds": 10.0, "eval_loss": 2.5},
         {"step": 4, "seconds": 20.0, "eval_loss": 2.0}, {"step": 6, "seconds": 30.0, "eval_loss": 2.1}]


def test_target_and_time_helpers():
    assert first_reached(EVALS, 2.5)["step"] == 2 and first_reached(EVALS, 2.05)["step"] == 4
    assert first_reached(EVALS, 1.9) is None
    assert seconds_at_loss(EVALS, 2.25) == pytest.approx(15.0)
    assert seconds_at_loss(EVALS, 3.5) == 0.0 and seconds_at_loss(EVALS, 1.9) is None
    assert loss_at_seconds(EVALS, 5.0) == pytest.approx(2.75) and loss_at_seconds(EVALS, 25.0) == pytest.approx(2.05)
    assert loss_at_seconds(EVALS, 31.0) is None
    assert sat_step_budget(40, 1.5) == 60 and sat_step_budget(7, 1.5) == 11 and sat_step_budget(10, 1.0) == 10
    with pytest.raises(ValueError, match="finite number >= 1, got 0.5"):
        sat_step_budget(10, 0.5)


def test_robust_step_times_ignore_a_stall():
    """One stalled step (600 s among 10-12 s steps) costs the median of its arm's steps, not 600 s; a dense step's
    time is per token; a SAT step costs the median of its paired ratio to the dense step beside it."""
    run = {"step_seconds": [10.0, 600.0, 11.0, 12.0, 5.0], "step_tokens": [100, 100, 100, 100, 50],
           "omission_rates": [0.0] * 5}
    assert as_dense_steps(run, run) == pytest.approx([11.0] * 4 + [5.5])   # 0.11 s/token x tokens
    assert as_dense_steps(dict(run, step_tokens=None), run) == pytest.approx([11.0] * 5)   # per step without tokens
    dense = {"step_seconds": [10.0] * 4, "omission_rates": [0.0] * 4,
             "evals": [{"step": 0, "eval_loss": 3.0}, {"step": 4, "eval_loss": 2.0}]}
    sat = {"step_seconds": [8.0, 800.0, 8.0, 8.0, 8.0, 8.0], "omission_rates": [0.5] * 6,
           "evals": [{"step": 0, "eval_loss": 3.0}, {"step": 4, "eval_loss": 2.1}, {"step": 6, "eval_loss": 1.9}]}
    r = analyse(dense, sat, 2.0)
    assert r["dense_seconds"] == 40.0 and r["sat_seconds"] == 48.0 and r["ratio"] == pytest.approx(1.2)
    assert r["sat_steps_to_target"] == 6 and r["measured"]["ratio"] == pytest.approx(840 / 40)
    assert r["sat_seconds_interpolated"] == pytest.approx(40.0) and r["ratio_interpolated"] == pytest.approx(1.0)
    assert r["equal_time"]["sat_eval_loss"] == pytest.approx(2.1 + (40 - 32) / 16 * (1.9 - 2.1))
    assert r["sat_at_dense_steps"]["eval_loss"] == 2.1 and r["step_speedup_median"] == pytest.approx(10 / 8)
    # a control (dense on SAT's schedule) is costed at the dense step time, whatever its own steps took
    control = {"name": "c", "step_seconds": [99.0] * 6, "omission_rates": [0.0] * 6, "losses": [0.0] * 6,
               "evals": [{"step": 0, "eval_loss": 3.0}, {"step": 2, "eval_loss": 2.2}, {"step": 4, "eval_loss": 1.8}]}
    c = analyse(dense, sat, 2.0, control)["control"]
    assert c["steps_to_target"] == 4 and c["seconds"] == 40.0 and c["ratio"] == pytest.approx(48 / 40)
    assert c["seconds_interpolated"] == pytest.approx(30.0) and c["eval_loss_at_dense_steps"] == 1.8


def _phased(rates, load, relative, dense_seconds=10.0):
    """Steps of SAT at ``rates`` and of the dense step beside each, under a machine load factor ``load[s]``: SAT's
    step takes ``relative[rate]`` of the dense one's time at the same moment."""
    dense = [dense_seconds * f for f in load]
    return [relative[r] * d for r, d in zip(rates, dense)], dense


def test_paired_step_costs_follow_load_changes():
    """Load that changes during the run (2x busier for two of the steps SAT runs at 0.5) does not leak into SAT's
    cost: each rate costs the median of SAT's time over the dense step's beside it, and every time is on the dense
    arm's clock. Costed from its own steps alone (the median of SAT's steps at 0.5, half of them busy, against the
    dense arm's median), rate 0.5 would cost 1.35 dense steps instead of 0.9."""
    rates = [0.5] * 4 + [0.25] * 4 + [0.0] * 2
    load = [1.0, 1.0, 2.0, 2.0] + [1.0] * 6
    sat_s, dense_s = _phased(rates, load, {0.5: 0.9, 0.25: 0.95, 0.0: 1.0})
    evals = [{"step": 0, "eval_loss": 3.0}, {"step": 5, "eval_loss": 2.5}, {"step": 10, "eval_loss": 1.9}]
    dense = {"step_seconds": dense_s[:5], "omission_rates": [0.0] * 5, "evals": evals[:2]}
    sat = {"step_seconds": sat_s, "omission_rates": rates, "evals": evals}
    control = {"name": "c", "step_seconds": dense_s, "omission_rates": [0.0] * 10, "losses": [0.0] * 10,
               "evals": [{"step": 0, "eval_loss": 3.0}, {"step": 10, "eval_loss": 2.0}]}
    costs = {c["omission_rate"]: (c["relative_to_dense"], c["paired_steps"])
             for c in relative_step_costs(sat, dense, control)}
    assert costs == {0.5: (pytest.approx(0.9), 4), 0.25: (pytest.approx(0.95), 4), 0.0: (pytest.approx(1.0), 2)}
    clock = 10.0   # the dense arm's median step: 3 of its 5 steps ran in the quiet stretch
    r = analyse(dense, sat, 2.0, control)
    assert r["sat_seconds"] == pytest.approx(clock * (4 * 0.9 + 4 * 0.95 + 2 * 1.0))
    assert r["step_speedup_paired"] == pytest.approx(10 / (4 * 0.9 + 4 * 0.95 + 2))
    # without the control, the SAT steps after the dense arm's last pair with nothing: rate 0.25 keeps its one pair
    # (step 4); rate 0 falls back to SAT's median seconds over the dense arm's
    costs = {c["omission_rate"]: (c["relative_to_dense"], c["paired_steps"]) for c in relative_step_costs(sat, dense)}
    assert costs[0.25] == (pytest.approx(0.95), 1) and costs[0.0] == (pytest.approx(1.0), 0)
    # a control trained in another process (attach_control) is not paired with: the same fallback
    separate = dict(control, separate_process=True, step_seconds=[99.0] * 10)
    assert relative_step_costs(sat, dense, separate) == relative_step_costs(sat, dense)


def test_dense_arm_is_the_trainer_run(tiny_dir):
    """The interleaved loop trains the dense arm exactly as the Trainer run of ``sat-train --compare`` does (AdamW,
    clipping, linear schedule, same batches), and SAT at omission 0 with the same budget reproduces dense: the target
    is reached at step N."""
    pristine, order, held, pad = tiny_setup(tiny_dir, 6, 2)
    cfg = TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3, warmup_steps=2)
    trainer_run, _ = train_run(pristine, order, held, cfg, sat=False, pad_id=pad, progress=False)
    cfg0 = TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3, warmup_steps=2, omission_rate=0.0)
    r = run_time_to_quality(pristine, order, held, cfg0, pad_id=pad, sat_steps=6, eval_every=3,
                            base_eval_loss=9.0, say=lambda *a, **k: None)
    dense, sat = r["runs"]["dense"], r["runs"]["sat"]
    assert dense["losses"] == pytest.approx(trainer_run.losses, rel=1e-5, abs=1e-6)
    assert r["target_eval_loss"] == pytest.approx(trainer_run.eval_loss, rel=1e-5)
    assert sat["losses"] == dense["losses"] and [e["eval_loss"] for e in sat["evals"]] == \
        [e["eval_loss"] for e in dense["evals"]]
    assert [e["step"] for e in dense["evals"]] == [0, 3, 6]
    assert r["reached"] and r["sat_steps_to_target"] == 6
    assert r["ratio"] == pytest.approx(r["sat_seconds"] / r["dense_seconds"])
    (cost,) = r["relative_step_costs"]   # one rate, every step paired with the dense step beside it
    assert cost["omission_rate"] == 0.0 and cost["paired_steps"] == 6
    assert r["sat_seconds"] == pytest.approx(cost["relative_to_dense"] * sum(as_dense_steps(sat, dense)))
    assert r["measured"]["sat_seconds"] == pytest.approx(sum(sat["step_seconds"]))
    assert all(not isinstance(m, sk.SATMLP) for m in pristine.modules())


def test_cli_time_to_quality_end_to_end(tiny_dir, tmp_path, capsys):
    """The documented command on the tiny model: dense 6 steps, SAT budget 9, evaluations every 3 steps (and at
    step 6 for SAT), a JSON record with the fields of benchmarks/results/time_to_quality/README.md and a plot."""
    out_dir = tmp_path / "ttq"
    assert main(["--time-to-quality", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"),
                 "--steps", "6", "--seq-len", "16", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "3",
                 "--eval-examples", "4", "--run-to-budget", "--output-dir", str(out_dir), "--name", "t",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "target (dense eval loss after 6 steps" in out and "step speedup" in out
    r = json.loads((out_dir / "t.json").read_text())
    assert (out_dir / "t.png").stat().st_size > 10_000
    for key in ("model", "task", "seed", "dtype", "seq_len", "steps_dense", "target_eval_loss", "dense_seconds",
                "sat_seconds", "sat_config", "cpu", "versions", "git_revision", "equal_time", "steps_sat_budget"):
        assert key in r, key
    assert r["steps_dense"] == 6 and r["steps_sat_budget"] == 9 and r["dtype"] == "fp32" and r["task"] == "cpt"
    assert r["packed"] is False and "pack" not in r["sat_config"]
    assert "2 x 16 tokens, fp32" in title(r) and "2 x 16 tokens (packed pairs), fp32" in title(dict(r, packed=True))
    assert r["sat_config"]["omission_rate"] == 0.5 and r["sat_config"]["scheduler"] == "ladder"
    assert r["cpu"]["threads"] >= 1 and r["versions"]["torch"] == torch.__version__
    dense, sat = r["runs"]["dense"], r["runs"]["sat"]
    assert dense["steps_run"] == 6 and sat["steps_run"] == 9, "--run-to-budget trains SAT's whole budget"
    assert [e["step"] for e in dense["evals"]] == [0, 3, 6] and [e["step"] for e in sat["evals"]] == [0, 3, 6, 9]
    assert r["target_eval_loss"] == dense["evals"][-1]["eval_loss"]
    assert r["dense_seconds"] == pytest.approx(sum(as_dense_steps(dense, dense)))
    assert r["measured"]["dense_seconds"] == pytest.approx(sum(dense["step_seconds"]))
    assert reanalyse(r) == r, "a stored record re-derives to itself"
    # the LORS schedule spans SAT's budget of 9 steps: 8 sparse steps in two rungs, 1 dense
    assert sat["omission_rates"] == [0.5] * 4 + [0.25] * 4 + [0.0]
    hit = first_reached(sat["evals"], r["target_eval_loss"])
    if hit is None:
        assert r["sat_seconds"] is None and r["ratio"] is None and not r["reached"]
    else:
        assert r["sat_seconds"] == hit["seconds"] and r["ratio"] == pytest.approx(hit["seconds"] / r["dense_seconds"])
    eq = r["equal_time"]
    assert eq["sat_eval_loss"] == pytest.approx(loss_at_seconds(sat["evals"], r["dense_seconds"]))


def test_control_arm_is_dense_on_sats_schedule(tiny_dir, tmp_path, capsys):
    """``--control``: a third arm, dense with SAT's budget and schedules, interleaved; with SAT at omission 0 it is
    the SAT arm step for step, so it reaches the target at the same step and SAT's ratio against it is its own time
    over dense steps' time. The same control from a separate run (SAT at rate 0) attaches to a record."""
    common = ["--time-to-quality", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"),
              "--steps", "6", "--seq-len", "16", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "3",
              "--eval-examples", "4", "--run-to-budget", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(common + ["--control", "--omission-rate", "0", "--name", "c"]) == 0
    assert "control (dense, SAT's schedule)" in capsys.readouterr().out
    r = json.loads((tmp_path / "c.json").read_text())
    sat, control = r["runs"]["sat"], r["runs"]["control"]
    assert control["name"] == CONTROL_NAME and control["steps_run"] == 9
    assert control["losses"] == sat["losses"]
    assert [e["eval_loss"] for e in control["evals"]] == [e["eval_loss"] for e in sat["evals"]]
    c = r["control"]
    hit = first_reached(control["evals"], r["target_eval_loss"])
    assert c["steps_to_target"] == (hit and hit["step"]) == r["sat_steps_to_target"]
    per_token = r["dense_seconds"] / sum(r["runs"]["dense"]["step_tokens"])
    if hit is not None:
        assert c["seconds"] == pytest.approx(per_token * sum(control["step_tokens"][:hit["step"]]))
        assert c["ratio"] == pytest.approx(r["sat_seconds"] / c["seconds"])
    assert reanalyse(r) == r

    assert main(common + ["--name", "s"]) == 0        # the same benchmark with SAT at 0.5, no control
    plain = json.loads((tmp_path / "s.json").read_text())
    assert plain["control"] is None
    rate0 = {k: v for k, v in r.items()}
    rate0["runs"] = {k: v for k, v in r["runs"].items() if k != "control"}
    merged = attach_control(plain, rate0)
    assert merged["runs"]["control"]["losses"] == sat["losses"] and merged["control"]["name"] == CONTROL_NAME
    assert merged["runs"]["sat"] == reanalyse(plain)["runs"]["sat"]
    # the attached control ran in another process: SAT's steps are paired with the dense arm's only
    assert merged["runs"]["control"]["separate_process"] is True
    assert merged["relative_step_costs"] == plain["relative_step_costs"]
    with pytest.raises(ValueError, match="no control arm and its SAT arm does not keep every unit"):
        attach_control(r, plain)
    # a run with an in-process control lends that arm, whatever its own SAT settings
    lender = dict(plain, runs=dict(plain["runs"], control=r["runs"]["control"]))
    via_control = attach_control(plain, lender)
    assert via_control["runs"]["control"]["losses"] == r["runs"]["control"]["losses"]
    assert via_control["runs"]["control"]["separate_process"] is True and via_control["control"] == merged["control"]
    with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
        attach_control(plain, dict(rate0, seed=1))
    with pytest.raises(ValueError, match=r"differs in \['sat_config.sat_lr'\]"):
        attach_control(plain, dict(rate0, sat_config=dict(rate0["sat_config"], sat_lr=1e-3)))
    with pytest.raises(ValueError, match=r"differs in \['packed'\]"):
        attach_control(plain, dict(rate0, packed=True))
    legacy = {k: v for k, v in plain.items() if k != "packed"}     # a record written before --pack existed
    assert attach_control(legacy, rate0)["control"] == merged["control"]


def test_sat_lr_drives_the_sat_arm_and_the_control(tiny_dir):
    """``sat_lr`` is the peak learning rate of the SAT arm and of the control (dense on SAT's schedule), not of the
    dense arm: at omission 0 with equal budgets, SAT at ``sat_lr == lr`` is dense step for step; at twice the rate
    it departs from dense after the first update, and the control follows it exactly."""
    pristine, order, held, pad = tiny_setup(tiny_dir, 6, 2)
    quiet = dict(pad_id=pad, sat_steps=6, eval_every=3, base_eval_loss=9.0, say=lambda *a, **k: None, control=True)
    same = run_time_to_quality(pristine, order, held, TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3,
                                                                  omission_rate=0.0, sat_lr=3e-3), **quiet)
    assert same["runs"]["sat"]["losses"] == same["runs"]["dense"]["losses"]
    high = run_time_to_quality(pristine, order, held, TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3,
                                                                  omission_rate=0.0, sat_lr=6e-3), **quiet)
    dense, sat, control = (high["runs"][k]["losses"] for k in ("dense", "sat", "control"))
    assert dense == same["runs"]["dense"]["losses"], "the dense arm keeps --lr"
    assert sat[0] == dense[0] and all(a != b for a, b in zip(sat[1:], dense[1:]))
    assert control == sat
    assert high["target_eval_loss"] == same["target_eval_loss"]


def test_dense_warmup_in_the_sat_arm(tiny_dir, tmp_path, capsys):
    """``--dense-warmup-steps 3``: the SAT arm's first 3 steps run dense, then the ladder spans the steps up to its
    dense final phase; the record names both settings."""
    assert main(["--time-to-quality", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"),
                 "--steps", "6", "--seq-len", "16", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "3",
                 "--eval-examples", "4", "--run-to-budget", "--output-dir", str(tmp_path), "--name", "w",
                 "--no-progress", "--dense-warmup-steps", "3", "--sat-lr", "2e-3"]) == 0
    r = json.loads((tmp_path / "w.json").read_text())
    # budget 9: warm-up steps 0-2, rungs over steps 3-7 (int(0.9 * 9) = 8), step 8 dense
    assert r["runs"]["sat"]["omission_rates"] == [0.0] * 3 + [0.5] * 3 + [0.25] * 2 + [0.0]
    assert r["sat_config"]["dense_warmup_steps"] == 3 and r["sat_config"]["sat_lr"] == 2e-3 and r["lr"] == 3e-3


@pytest.mark.parametrize("argv, message", [
    (["--control"], "--control needs --time-to-quality"),
    (["--time-to-quality", "--compare"], "--compare and --time-to-quality exclude each other"),
    (["--eval-every", "3"], "--eval-every needs --time-to-quality"),
    (["--run-to-budget", "--sat-steps-factor", "2"], "--run-to-budget, --sat-steps-factor need --time-to-quality"),
    (["--time-to-quality", "--sat-steps-factor", "0.5"], "argument --sat-steps-factor: expected a number >= 1"),
    (["--time-to-quality", "--eval-every", "0"], "argument --eval-every: expected a positive integer, got 0"),
    (["--time-to-quality", "--steps", "6", "--dense-warmup-steps", "9"],
     "--dense-warmup-steps 9 must be below the SAT run's 9 steps"),
    (["--time-to-quality", "--steps", "6", "--dense-warmup-steps", "8"],
     "--dense-warmup-steps: LadderOmissionScheduler: dense_warmup_steps=8 leaves no sparse step"),
    (["--steps", "6", "--dense-warmup-steps", "6", "--scheduler", "constant"],
     "--dense-warmup-steps 6 must be below the SAT run's 6 steps"),
    (["--dense-warmup-steps", "-1"], "argument --dense-warmup-steps"),
    (["--dense-only", "--sat-lr", "1e-3", "--dense-warmup-steps", "2"],
     "--sat-lr, --dense-warmup-steps set the SAT run, which --dense-only does not train"),
    (["--sat-lr", "0"], "argument --sat-lr"),
])
def test_cli_time_to_quality_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
