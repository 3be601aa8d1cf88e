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
from sat_kernels.ops.sat_mlp_lora import LoRA


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
