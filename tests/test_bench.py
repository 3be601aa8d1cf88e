"""sat-bench end to end on tiny sizes: tables, JSONL rows with the environment, plots, argument errors; the plumbing
of the one-call GPU check (benchmarks/gpu_check.sh) on CPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sat_kernels.bench.cli import main
from sat_kernels.bench.mlp import flops, make_provider, run_shape, saved_activation_bytes
from sat_kernels.ops.mlp.lora import LoRA


def test_mlp_bench_appends_rows_and_plots(tmp_path, capsys):
    main(["--results-dir", str(tmp_path), "--device", "cpu", "mlp", "--shapes", "smollm2-135m", "--tokens", "48",
          "--rates", "0.0", "0.5", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| smollm2-135m | 48 | 0.5 | torch | full |" in out
    rows = [json.loads(line) for line in (tmp_path / "mlp.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} >= {"dense", "dense_k", "masked", "torch"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "full"}
    for key in ("device", "torch", "git", "date", "median_ms", "p20_ms", "p80_ms", "ratio_to_dense", "tflops"):
        assert key in rows[0]
    full = {r["provider"]: r for r in rows if r["mode"] == "full" and r["omission_rate"] == 0.5}
    assert full["torch"]["saved_bytes"] < full["dense"]["saved_bytes"]
    assert 0 < full["torch"]["select_share"] < 1
    main(["--results-dir", str(tmp_path), "plot"])
    assert list(tmp_path.glob("mlp_full_*.png"))


def test_mlp_bench_lora_mode(tmp_path, capsys):
    """--lora-rank: dense LoRA, dense_k and SAT-LoRA on a frozen base, rows with the LoRA FLOP limit in
    mlp_lora.jsonl (mlp.jsonl and its plots stay the full-training rows)."""
    main(["--results-dir", str(tmp_path), "--device", "cpu", "mlp", "--lora-rank", "4", "--shapes", "smollm2-135m",
          "--tokens", "48", "--rates", "0.5", "--repeats", "1", "--forward", "dense"])
    out = capsys.readouterr().out
    assert "with LoRA r 4 on gate/up/down, frozen base, forward=dense" in out
    assert "| smollm2-135m | 48 | 0.5 | torch | full |" in out
    assert not (tmp_path / "mlp.jsonl").exists()
    rows = [json.loads(line) for line in (tmp_path / "mlp_lora.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"dense", "dense_k", "torch"} and len(rows) == 9
    assert all(r["lora_rank"] == 4 and r["forward"] == "dense" and r["clock"] == "wall" for r in rows)
    full = {r["provider"]: r for r in rows if r["mode"] == "full"}
    assert full["torch"]["flop_limit"] == pytest.approx((6 + 6 * 768 / 1536) / 12)
    assert full["torch"]["saved_bytes"] < full["dense"]["saved_bytes"]
    with pytest.raises(SystemExit, match=r"providers \['masked'\] are not usable here in LoRA mode"):
        main(["--results-dir", str(tmp_path), "--device", "cpu", "mlp", "--lora-rank", "4", "--providers", "masked"])


def test_lora_providers_compute_the_peft_mlp():
    """With every neuron kept, SAT-LoRA equals the dense LoRA provider: output, dx and every adapter gradient; the
    frozen base weights get none."""
    T, h, inter, r = 24, 16, 40, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, h, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((inter, h), (inter, h), (h, inter))]
    adapters = tuple(LoRA(torch.randn(r, i, generator=gen, dtype=torch.float64, requires_grad=True),
                          torch.randn(o, r, generator=gen, dtype=torch.float64, requires_grad=True), 2.0)
                     for i, o in ((h, inter), (h, inter), (inter, h)))
    results = []
    for name in ("dense", "torch"):
        fwd, tensors = make_provider(name, x, ws, 0.0, inter, adapters=adapters)
        for t in tensors:
            t.grad = None
        y = fwd()
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [t.grad for t in tensors if t.requires_grad])
        assert all(w.grad is None for w in ws)
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_train_step_bench(tmp_path, capsys, monkeypatch):
    from sat_kernels.bench import train_step

    monkeypatch.setitem(train_step.CONFIGS, "tiny", dict(vocab_size=64, hidden_size=32, intermediate_size=96,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    rows = train_step.run_train_step("tiny", batch=2, seq=16, steps=2, rate=0.5, dtype=torch.float32,
                                     device=torch.device("cpu"), repeats=1, backend="torch")
    assert [r["run"] for r in rows] == ["dense", "sat"] and [r["backend"] for r in rows] == ["dense", "torch"]
    assert rows[1]["speedup"] > 0 and rows[1]["mlp_only_ceiling"] >= 1.0
    assert all(r["tokens_per_s"] > 0 and 0 <= r["mlp_share"] for r in rows)


def test_train_step_bench_bf16_autocast_and_ladder(monkeypatch):
    """bf16 autocast on fp32 weights; the ladder row is the schedule's share-weighted mean step; the ceiling of the
    exact forward is the one of (6 + 12 rho) / 18."""
    from sat_kernels.bench import train_step

    monkeypatch.setitem(train_step.CONFIGS, "tiny", dict(vocab_size=64, hidden_size=32, intermediate_size=96,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    rows = train_step.run_train_step("tiny", batch=2, seq=16, steps=2, rate=0.5, dtype=torch.float32,
                                     device=torch.device("cpu"), repeats=1, backend="torch",
                                     autocast_dtype=torch.bfloat16, forward="dense", ladder=True)
    assert [r["run"] for r in rows] == ["dense", "sat", "sat-ladder"]
    assert all(r["autocast"] == "bfloat16" and r["dtype"] == "float32" for r in rows)
    dense, sat, ladder = rows
    limit = (6 + 12 * 0.5) / 18
    ceiling = dense["step_ms"] / (dense["step_ms"] - dense["mlp_ms"] * (1 - limit))
    assert sat["mlp_only_ceiling"] == pytest.approx(ceiling)
    assert sat["of_ceiling"] == pytest.approx(sat["speedup"] / sat["mlp_only_ceiling"])
    shares = train_step.ladder_fractions(0.5)
    assert set(shares) == {0.5, 0.25, 0.0} and sum(shares.values()) == pytest.approx(1.0)
    assert ladder["step_ms"] == pytest.approx(sum(v["share"] * v["step_ms"] for v in ladder["ladder"].values()))


@pytest.mark.parametrize("backward, limit", [("exact_input", (12 + 6 * 0.5) / 18),
                                             ("dense_tokens", (6 + 12 * 0.5 + 12 * 0.5 * 0.25) / 18)])
def test_train_step_bench_backward_modes(monkeypatch, backward, limit):
    """--backward exact_input / dense_tokens reach the SAT modules and set the ceiling to their FLOP limit; with
    dense_tokens the labels mark the last --dense-fraction of each sequence, whose backward is dense."""
    from sat_kernels.bench import train_step

    monkeypatch.setitem(train_step.CONFIGS, "tiny", dict(vocab_size=64, hidden_size=32, intermediate_size=96,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    seen = []
    replace_mlp = train_step.sk.replace_mlp

    def recording_replace_mlp(*args, **kwargs):
        seen.append(kwargs["backward"])
        return replace_mlp(*args, **kwargs)

    monkeypatch.setattr(train_step.sk, "replace_mlp", recording_replace_mlp)
    import sat_kernels.modules as modules
    masks, run = [], modules.sat_mlp_kept

    def recording_op(*args, **kwargs):
        masks.append(kwargs["dense_token_mask"])
        return run(*args, **kwargs)

    monkeypatch.setattr(modules, "sat_mlp_kept", recording_op)
    dense, sat = train_step.run_train_step("tiny", batch=2, seq=16, steps=1, rate=0.5, dtype=torch.float32,
                                           device=torch.device("cpu"), repeats=1, backend="torch", forward="dense",
                                           backward=backward, dense_fraction=0.25)
    assert seen == [backward] and sat["backward"] == backward
    ceiling = dense["step_ms"] / (dense["step_ms"] - dense["mlp_ms"] * (1 - limit))
    assert sat["mlp_only_ceiling"] == pytest.approx(ceiling)
    if backward == "dense_tokens":   # labels on the last 4 of 16 tokens: the loss tokens are 11-14
        assert sat["dense_fraction"] == 0.25 and masks
        expected = (torch.arange(16) >= 11) & (torch.arange(16) <= 14)
        assert all(torch.equal(m, expected.expand(2, 16)) for m in masks)
    else:
        assert masks and all(m is None for m in masks)


def test_flop_model_matches_design():
    T, h, inter = 10, 4, 100
    assert flops("torch", "full", T, h, inter, 50) / flops("dense", "full", T, h, inter, 50) == pytest.approx(11 / 18)
    assert flops("dense_k", "full", T, h, inter, 25) == flops("dense", "full", T, h, inter, 25) / 4
    lora_dense = flops("dense", "full", T, h, inter, 50, lora=True)
    assert lora_dense == 12 * T * h * inter
    assert flops("torch", "full", T, h, inter, 50, lora=True) / lora_dense == pytest.approx(8 / 12)
    assert flops("torch", "full", T, h, inter, 50, "dense", lora=True) / lora_dense == pytest.approx(9 / 12)


def test_saved_bytes_scale_with_kept_fraction():
    rows = run_shape(64, 16, 200, 0.75, dtype=torch.float32, device=torch.device("cpu"),
                     providers=["dense", "torch"], modes=["full"], repeats=1)
    dense, sat = rows
    assert sat["saved_bytes"] == 2 * 64 * 50 * 4 + 50 * 8      # G[:, S], U[:, S] and the int64 indices
    assert dense["saved_bytes"] > 2 * sat["saved_bytes"]
    assert saved_activation_bytes(lambda: torch.ones(3, requires_grad=True).exp(), []) > 0


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="not usable here"):
        main(["--results-dir", str(tmp_path), "--device", "cpu", "mlp", "--providers", "liger"])
    with pytest.raises(SystemExit, match="unknown shape"):
        main(["--results-dir", str(tmp_path), "--device", "cpu", "mlp", "--shapes", "gpt5"])
    with pytest.raises(SystemExit, match="no results"):
        main(["--results-dir", str(tmp_path / "empty"), "plot"])


def test_cpu_clock_ignores_waiting():
    """clock="cpu" times the work, not the wait: a sleeping function takes wall time and (almost) no CPU time."""
    import time

    from sat_kernels.bench.timing import bench_cpu_interleaved

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns = {"sleep": lambda: time.sleep(0.02)}
        wall, _ = bench_cpu_interleaved(fns, repeats=3, warmup=0)
        cpu, _ = bench_cpu_interleaved(fns, repeats=3, warmup=0, clock="cpu")
        assert wall["sleep"][0] >= 19 and cpu["sleep"][0] < 5
    finally:
        torch.set_num_threads(threads)
    if threads > 1:
        with pytest.raises(ValueError, match="set torch.set_num_threads"):
            bench_cpu_interleaved(fns, repeats=1, clock="cpu")


ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_records_a_failing_stage_and_summarizes(tmp_path):
    """gpu_check.sh on a machine without a GPU: the build stage's backend check FAILS (cuda and triton are missing),
    the verdict is in stages.jsonl and the log, the summary goes to $OUT and RESULTS, exit status 1."""
    out, results = tmp_path / "out", tmp_path / "gpu_check.json"
    env = dict(os.environ, OUT=str(out), RESULTS=str(results), STAGES="build", BUDGET_S="300",
               SAT_KERNELS_SKIP_CUDA_BUILD="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL: GPU backends missing" in proc.stdout
    stage, = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert stage["stage"] == "build" and stage["status"] == "fail"
    summary = json.loads(results.read_text())
    assert summary == json.loads((out / "gpu_check.json").read_text()) and not summary["ok"]
    for key in ("device", "torch", "triton", "python", "git", "date"):
        assert summary[key]
    assert "FAIL: GPU backends missing" in (out / "gpu_check.log").read_text()


def test_gpu_check_summary_tables(tmp_path, capsys):
    """The summary reads whatever the stages left (a line cut short by a timeout is dropped) and prints the tables."""
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "benchmarks" / "gpu_check_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    (tmp_path / "stages.jsonl").write_text(
        '{"stage": "llama", "status": "pass", "seconds": 80, "limit_s": 150, "expected_s": 90}\n')
    err = {n: 1e-3 for n in ("y", "dx", "dw_gate", "dw_up", "dw_down")}
    row = {"backend": "triton", "T": 8191, "omission_rate": 0.6, "forward": "sparse", "first_call_s": 41.0,
           "second_call_s": 0.05, "kept_overlap": 0.999, "err_vs_fp64": err, "torch_err_vs_fp64": err, "ok": True}
    (tmp_path / "backends.jsonl").write_text(json.dumps(row) + "\n" + '{"backend": "cu')
    assert summary.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| llama | pass | 80 | 150 | 90 |" in text and "| triton | 8191 | 0.6 | sparse | 41.00 | 0.050 |" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["backends"] == [row]


def _frontier():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_report(path, runs, steps=4, **config):
    cfg = {"task": "sft", "steps": steps, "batch_size": 4, "seq_len": 256, "lr": 1e-4, "warmup_steps": 0, "seed": 0,
           "omission_rate": 0.5, "forward": "dense", "model": "smollm2-135m", **config}
    report = {"config": cfg, "data": {"fingerprint": "f"},
              "runs": {name: {"eval_loss": loss, "omission_rates": rates}
                       for name, (loss, rates) in runs.items()}}
    path.write_text(json.dumps(report))
    return str(path)


def test_frontier_pairs_runs_with_their_dense_reference_and_prices_them(tmp_path):
    """Each SAT run against the dense run of the same settings (LoRA runs against dense LoRA, an equal-time run
    against the dense run of other steps), priced by the step times of its own forward, strategy and update mode."""
    fr = _frontier()
    lora = {"rank": 16, "alpha": 32.0, "dropout": 0.0, "targets": ["q_proj"]}
    ladder = [0.5, 0.5, 0.25, 0.0]
    results = [
        _train_report(tmp_path / "d.json", {"dense": (2.0, [0.0] * 4)}),
        _train_report(tmp_path / "s.json", {"SAT": (2.1, ladder)}),
        _train_report(tmp_path / "lazy.json", {"SAT": (2.2, ladder)}, skip_omitted_updates=True),
        _train_report(tmp_path / "eq.json", {"SAT": (2.05, ladder + [0.0])}, steps=5),
        _train_report(tmp_path / "ld.json", {"dense": (3.0, [0.0] * 4)}, lora=lora),
        _train_report(tmp_path / "ls.json", {"SAT": (3.3, ladder)}, lora=lora),
    ]
    speed = tmp_path / "speed.json"
    rows = [{"task": "sft", "batch": 4, "seq_len": 256, "step_ms": {"dense": 100.0, "SAT 0.5": 80.0, "SAT 0.25": 90.0,
                                                                  "SAT 0": 100.0}}]
    speed.write_text(json.dumps({"config": {"forward": "dense"}, "rows": rows}))
    lazy_speed = tmp_path / "lazy_speed.json"
    lazy_speed.write_text(json.dumps({"config": {"forward": "dense", "skip_omitted_updates": True},
                                      "rows": [{**rows[0], "step_ms": {"dense": 100.0, "SAT 0.5": 125.0,
                                                                       "SAT 0.25": 125.0, "SAT 0": 125.0}}]}))
    other = tmp_path / "other.json"   # a later file without SAT 0.5: never mixed into the first one's table
    other.write_text(json.dumps({"config": {"forward": "dense"},
                                 "rows": [{**rows[0], "step_ms": {"dense": 50.0, "SAT 0.25": 40.0}}]}))
    tables = fr.load_speed_tables([str(speed), str(lazy_speed), str(other)])
    got = {r["run"]: r for r in fr.collect(results, tables)}
    assert set(got) == {"s.json", "lazy.json", "eq.json", "ls.json"}
    assert got["s.json"]["dense_run"] == "d.json" and got["s.json"]["eval_loss_increase_pct"] == pytest.approx(5.0)
    assert got["s.json"]["speedup"] == pytest.approx(4 * 100 / (80 + 80 + 90 + 100))
    # the lazy hook runs in the dense tail too: its rate-0 step is priced by its own time, not dense's
    assert got["lazy.json"]["speedup"] == pytest.approx(0.8) and "lazy updates" in got["lazy.json"]["schedule"]
    eq = got["eq.json"]
    assert (eq["dense_run"], eq["steps"], eq["dense_steps"]) == ("d.json", 5, 4)
    assert "5 steps (dense 4)" in eq["schedule"]
    assert eq["time_vs_dense"] == pytest.approx((80 + 80 + 90 + 100 + 100) / 400)
    assert got["ls.json"]["model"].endswith("+ LoRA r16") and got["ls.json"]["dense_run"] == "ld.json"
    assert got["ls.json"]["speedup"] is None, "no LoRA step times given: not priced by the full fine-tuning ones"
