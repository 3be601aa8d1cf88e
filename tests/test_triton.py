"""The Triton backend: interpreter tests on CPU (in a subprocess) and GPU tests (marker gpu).

``TRITON_INTERPRET`` is read once, when triton is first imported, and the rest of the suite must keep running without
it, so the CPU tests live in ``tests/triton_interpreter_cases.py`` and run here in a child pytest process with
``TRITON_INTERPRET=1`` (fp32/fp16, tiny odd shapes). The GPU tests run the compiled kernels in this process.
"""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sat_kernels as sk
from sat_kernels.ops.mlp import mlp_selector
from sat_kernels.ops.reference import reference_indices

from helpers import assert_matches_reference, fp64_copies, make_operands, rel_rms, run_interpreter_cases

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available() and "triton" in sk.available_backends()
CASES = Path(__file__).with_name("triton_interpreter_cases.py")
ROOT = CASES.parent.parent


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_cases():
    """tests/triton_interpreter_cases.py under TRITON_INTERPRET=1 in a child process (about 1 minute on 2 cores)."""
    run_interpreter_cases(CASES, timeout=900)


def test_unavailable_without_cuda_or_interpreter():
    """Without CUDA and without the interpreter, "triton" is not offered and says why."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton can run here")
    assert "triton" not in sk.available_backends()
    reason = sk.unavailable_backends()["triton"]
    assert ("TRITON_INTERPRET=1" in reason) if HAS_TRITON else ("not installed" in reason)
    with pytest.raises(ValueError, match="backend 'triton' is not available"):
        sk.sat_mlp(*make_operands(8, 16, 20, torch.float32)[0], 0.5, backend="triton")




@pytest.fixture
def fake_launches(monkeypatch):
    """The Triton launchers on CPU tensors without a GPU or the interpreter: every kernel launch is a stand-in that
    records its arguments and the device made current by ``torch.cuda.device`` (a stand-in too), every autotune
    benchmark a stand-in that counts its calls. Outputs stay uninitialised. Yields a namespace with ``launches``
    (``(kernel name, args, kwargs, current device or None)``) and ``bench_calls`` (kernel names)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from sat_kernels.ops.mlp.triton import down, gate_up, interpreting
    from sat_kernels.ops.mlp.triton import launcher as triton_sat_mlp

    if interpreting():
        pytest.skip("TRITON_INTERPRET=1: the interpreter has one config and nothing to tune")
    fake = types.SimpleNamespace(launches=[], bench_calls=[], current=[])

    class CudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            fake.current.append(self.device)

        def __exit__(self, *exc):
            fake.current.pop()

    def fake_run(name):
        def run(*args, grid=None, warmup=False, **kwargs):
            fake.launches.append((name, args, kwargs, fake.current[-1] if fake.current else None))
        return run

    def fake_bench(name):
        def bench(kernel_call, quantiles):
            fake.bench_calls.append(name)
            return [1.0] * len(quantiles)
        return bench

    monkeypatch.setattr(torch.cuda, "device", CudaDevice)
    monkeypatch.setattr(triton_sat_mlp, "check_tensors", lambda *tensors: None)
    monkeypatch.setattr(gate_up._kept_act_fwd_kernel, "run", fake_run("_kept_act_fwd_kernel"))
    monkeypatch.setattr(down._scatter_cols_kernel, "run", fake_run("_scatter_cols_kernel"))
    for kern in _autotuned_kernels():
        name = kern.base_fn.__name__
        monkeypatch.setattr(kern, "cache", {})
        monkeypatch.setitem(kern.__dict__, "do_bench", fake_bench(name))   # over the cached property, unread
        monkeypatch.setattr(kern.fn, "run", fake_run(name))
    yield fake


def _topk_select(k, metric="l2"):
    """A selector as sat_mlp builds it: fused scores, or activations on the torch backend."""
    return mlp_selector(k, metric=metric, strategy="topk", generator=None, group=None, w_down=None)


def test_autotuning_runs_once_per_size_bucket(fake_launches):
    """50 training steps with a new token count at every step (a padding collator) and a new kept count (a linear
    schedule): each kernel tunes once per power-of-two bucket of T and k, not once per step. Here T falls in 2
    buckets and k in 2, so at most 2 (gate/up forward: T only) + 5 x 4 = 22 tuning runs instead of up to 300."""
    from sat_kernels.ops.mlp.triton.launcher import sat_mlp_triton

    bench_calls = fake_launches.bench_calls
    h, inter = 64, 1376
    sched = sk.LinearOmissionScheduler(0.5, total_steps=50, dense_fraction=0.0)
    gen = torch.Generator().manual_seed(0)
    (_, wg, wu, wd), _ = make_operands(1, h, inter, torch.bfloat16)
    for step in range(50):
        T = int(torch.randint(300, 1025, (), generator=gen))
        x = torch.randn(T, h, dtype=torch.bfloat16, requires_grad=True)
        y, _ = sat_mlp_triton(x, wg, wu, wd, _topk_select(sk.num_kept(inter, sched.rate(step))), "silu")
        y.backward(torch.ones_like(y))
    runs = {kern.base_fn.__name__: len(kern.cache) for kern in _autotuned_kernels()}
    assert runs["_gate_up_fwd_kernel"] == 2 and sum(runs.values()) <= 22, runs
    bf16_configs = [len([c for c in kern.configs if not _is_fp32(c)]) for kern in _autotuned_kernels()]
    assert len(bench_calls) == sum(n * m for n, m in zip(runs.values(), bf16_configs))


@pytest.mark.parametrize("entry", ["sparse", "dense_forward", "gathered"])
def test_every_launch_runs_on_the_tensors_device(fake_launches, monkeypatch, entry):
    """Forward and backward launch every kernel under torch.cuda.device(<the tensors' device>): Triton launches on the
    current device, so a layer on cuda:1 of a model split over GPUs would otherwise run on cuda:0."""
    from sat_kernels.ops.mlp.triton.launcher import sat_mlp_triton

    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 1)   # every tensor reports cuda:1
    operands, dy = make_operands(70, 64, 200, torch.bfloat16)
    select = torch.arange(0, 200, 3) if entry == "gathered" else _topk_select(77)
    y, _ = sat_mlp_triton(*operands, select, "silu", forward="dense" if entry == "dense_forward" else "sparse")
    y.backward(dy)
    names = {name for name, *_ in fake_launches.launches}
    assert len(names) == 7 + (entry != "gathered"), names
    assert [dev for *_, dev in fake_launches.launches] == [1] * len(fake_launches.launches)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: legacy flag only")
def test_dot_precision_follows_the_new_tf32_flag():
    """torch 2.9+: once fp32_precision is set, reading the legacy allow_tf32 raises; the kernels' fp32 precision must
    come from the new flag (also in fp32 kernels launched after torch.set_float32_matmul_precision)."""
    from sat_kernels.ops.mlp.triton.utils import dot_precision

    matmul = torch.backends.cuda.matmul
    try:
        for flag, want in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = flag
            assert dot_precision(torch.float32) == want and dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.fp32_precision = "none"


def test_fp32_without_tf32_runs_the_torch_backend(fake_launches):
    """fp32 without TF32 would be FMA code spilling kilobytes per thread: the launcher runs the torch backend (no
    Triton launch, the torch backend's result). With TF32 every autotuned launch gets an fp32 (BK = 32) config."""
    from sat_kernels.ops.mlp.function import sat_mlp_torch
    from sat_kernels.ops.mlp.triton.launcher import sat_mlp_triton

    operands, dy = make_operands(70, 64, 200, torch.float32)
    with _tf32(False):
        y, idx = sat_mlp_triton(*operands, _topk_select(77), "silu")
        assert fake_launches.launches == []
        y_torch, idx_torch = sat_mlp_torch(*operands, _topk_select(77), "silu")
        assert torch.equal(y, y_torch) and torch.equal(idx, idx_torch)
    with _tf32(True):
        y, _ = sat_mlp_triton(*operands, _topk_select(77), "silu")
        y.backward(dy)
    tuned = [kwargs for name, _, kwargs, _ in fake_launches.launches if "BK" in kwargs]
    assert len(tuned) == 6 and all(_is_fp32(types.SimpleNamespace(kwargs=kw)) for kw in tuned)


def _static_check():
    spec = importlib.util.spec_from_file_location("triton_static_check", ROOT / "benchmarks" / "triton_static_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not os.path.exists(module.CUOBJDUMP):
        pytest.skip(f"no cuobjdump in the triton install ({module.CUOBJDUMP})")
    return module


def test_odd_kept_count_keeps_16_byte_pipelined_memory_access(fake_launches):
    """Static (sm_90a cubins, no GPU; about 15 s on 2 cores): every kernel launch of the sparse and the gathered path,
    bf16, first config, at k = 4403 (omission 0.6 of I = 11008, not a multiple of 16) issues as many 16-byte cp.async
    loads and 16-byte stores, and spills no more, than at k = 5504. Masks on a k that is not a multiple of 16 cannot
    be proven constant over 8 elements, and the compiler falls back to scalar, unpipelined accesses. No launch stores
    single 2-byte elements (the weight gradients are written with 16-byte stores, each element once)."""
    from sat_kernels.ops.mlp.triton import down, gate_up
    from sat_kernels.ops.mlp.triton.launcher import sat_mlp_triton

    static = _static_check()
    kernels = {k.base_fn.__name__: k for k in _autotuned_kernels()}
    kernels["_kept_act_fwd_kernel"] = gate_up._kept_act_fwd_kernel
    kernels["_scatter_cols_kernel"] = down._scatter_cols_kernel
    T, h, inter = 64, 64, 11008                    # the divisibility of T = 8192, h = 4096 at a tiny size
    operands, dy = make_operands(T, h, inter, torch.bfloat16)
    results = {}
    for k in (4403, 5504):
        fake_launches.launches.clear()
        for select in (_topk_select(k), torch.sort(torch.randperm(inter)[:k]).values):
            y, _ = sat_mlp_triton(*operands, select, "silu")
            y.backward(dy)
        results[k] = [(name, static.compile_launch(kernels[name], args, kwargs))
                      for name, args, kwargs, _ in fake_launches.launches]
    assert [name for name, _ in results[4403]] == [name for name, _ in results[5504]]
    for (name, odd), (_, even) in zip(results[4403], results[5504]):
        assert (odd["cp_async16"], odd["st16"]) == (even["cp_async16"], even["st16"]), (name, odd, even)
        assert odd["stack"] <= even["stack"], (name, odd, even)
        assert odd["st_scalar"] == even["st_scalar"] == 0, (name, odd, even)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_gpu_backend_check_script_under_the_interpreter(tmp_path):
    """benchmarks/gpu_backend_check.py (stage llama of gpu_check.sh) end to end on CPU: the triton backend at tiny
    odd shapes under TRITON_INTERPRET=1, one JSON line per case, each compared with the torch backend (about 10 s)."""
    out = tmp_path / "backends.jsonl"
    script = ROOT / "benchmarks" / "gpu_backend_check.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--dtype", "fp32", "--shape", "40", "70",
                           "--tokens", "37", "--rates", "0.5", "0.6", "--backends", "triton", "--out", str(out)],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["omission_rate"], r["forward"]) for r in rows] == [(0.5, "sparse"), (0.5, "dense"), (0.6, "sparse")]
    for r in rows:
        assert r["ok"] and r["repeat_equal"] and r["kept_overlap"] == 1.0 and r["k"] in (35, 28), r
        assert max(r["rel_rms_vs_torch"].values()) < 1e-5, r


def test_benchmark_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    script = CASES.parent.parent / "benchmarks" / "triton_mlp_speed.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr, proc.stderr


def _autotuned_kernels():
    from sat_kernels.ops.mlp.triton import down, gate_up

    return [gate_up._gate_up_fwd_kernel, gate_up._gate_up_weight_bwd_kernel, gate_up._gate_up_input_bwd_kernel,
            down._down_fwd_kernel, down._down_bwd_kernel, down._down_weight_bwd_kernel]


@pytest.fixture
def one_config(monkeypatch):
    """Compile the first config of each kernel (for 16-bit and for fp32 operands) instead of autotuning them all: a
    full autotune compiles about 36 kernels per dtype and shape specialisation (minutes). The configs differ in
    constexpr tile sizes only; test_gpu_every_config_matches checks each one and the benchmark autotunes them all."""
    for kernel in _autotuned_kernels():
        firsts = {}
        for config in kernel.configs:
            firsts.setdefault(_is_fp32(config), config)
        monkeypatch.setattr(kernel, "configs", list(firsts.values()))
        monkeypatch.setattr(kernel, "cache", {})


def _is_fp32(config):
    from sat_kernels.ops.mlp.triton.utils import FP32_BK

    return config.kwargs["BK"] == FP32_BK


@contextlib.contextmanager
def _tf32(on: bool):
    """fp32 matmuls with (on) or without TF32, set through the API this torch has; the default restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = "none"
    else:
        old, matmul.allow_tf32 = matmul.allow_tf32, on
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def gpu(test):
    """GPU test: marker gpu (skipped without CUDA by conftest), skipped where triton cannot run, one config."""
    test = pytest.mark.usefixtures("one_config")(test)
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs CUDA and triton")(test))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(97, 123, 431), (1024, 576, 1536), (2048, 4096, 11008)]


def _id(shape):
    return "T{}-h{}-I{}".format(*shape)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("rate", [0.5, 0.75])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@gpu
def test_gpu_sat_mlp_matches_fp64_reference(shape, rate, dtype):
    operands, dy = make_operands(*shape, dtype, device="cuda")
    _, idx = sk.sat_mlp(*operands, rate, backend="triton", return_indices=True)
    assert idx.is_cuda and idx.numel() == sk.num_kept(shape[2], rate) and torch.equal(idx, torch.unique(idx))
    ours = assert_matches_reference(lambda *o: sk.sat_mlp(*o, rate, backend="triton"), operands, dy, idx)
    omitted = torch.ones(shape[2], dtype=torch.bool, device="cuda")
    omitted[idx] = False
    assert (ours[2][omitted] == 0).all() and (ours[3][omitted] == 0).all() and (ours[4][:, omitted] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("k", [1, 200, 431])
def test_gpu_gathered_mlp(k, dtype):
    operands, dy = make_operands(97, 123, 431, dtype, device="cuda", seed=k)
    idx = torch.sort(torch.randperm(431, device="cuda")[:k]).values
    assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, backend="triton"), operands, dy, idx)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_gpu_w_down_gathered_in_kernel(monkeypatch, dtype):
    from sat_kernels.ops.mlp.triton import launcher as triton_sat_mlp

    monkeypatch.setattr(triton_sat_mlp, "COMPACT_W_DOWN", False)
    operands, dy = make_operands(1024, 576, 1536, dtype, device="cuda")
    idx = torch.sort(torch.randperm(1536, device="cuda")[:700]).values
    assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, backend="triton"), operands, dy, idx)


@gpu
@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_gpu_fp32_with_tf32_runs_the_fp32_configs(forward):
    """fp32 with TF32 on runs the Triton kernels on their BK = 32 configs (without TF32, the torch backend)."""
    with _tf32(True):
        operands, dy = make_operands(1024, 576, 1536, torch.float32, device="cuda")
        fn = lambda *o: sk.sat_mlp(*o, 0.6, backend="triton", forward=forward)  # noqa: E731
        _, idx = sk.sat_mlp(*operands, 0.6, backend="triton", forward=forward, return_indices=True)
        assert_matches_reference(fn, operands, dy, idx, forward=forward)
    from sat_kernels.ops.mlp.triton import down

    assert _is_fp32(down._down_bwd_kernel.best_config)


@gpu
@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_gpu_fused_scores(dtype, metric):
    """Fused scores vs sk.neuron_scores: at most 2x its distance to the fp64 scores; fp32 picks the fp64 top-k."""
    x, wg, wu, wd = (t.detach() for t in make_operands(2048, 576, 1536, dtype, device="cuda")[0])
    _, _, _, fused = torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, "silu", metric, False)
    exact = sk.neuron_scores(*(t.double() for t in (x, wg, wu, wd)), metric=metric)
    plain = sk.neuron_scores(x, wg, wu, wd, metric=metric)
    assert rel_rms(fused, exact) <= 2 * rel_rms(plain, exact) + 1e-6
    if dtype == torch.float32:
        _, idx = sk.sat_mlp(x, wg, wu, wd, 0.5, metric=metric, backend="triton", return_indices=True)
        ref = reference_indices(*fp64_copies((x, wg, wu, wd)), 0.5, metric=metric)
        assert torch.isin(idx, ref).float().mean() > 0.99   # near-ties at fp32 rounding may swap a few


@gpu
@pytest.mark.parametrize("strategy", ["topk", "sample", "random"])
def test_gpu_no_host_sync(strategy):
    operands, dy = make_operands(256, 128, 512, torch.bfloat16, device="cuda")
    sk.sat_mlp(*operands, 0.5, strategy=strategy, backend="triton").backward(dy)   # warm-up: autotune syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sk.sat_mlp(*operands, 0.5, strategy=strategy, backend="triton").backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_gpu_torch_compile_inductor():
    operands, dy = make_operands(512, 256, 688, torch.bfloat16, device="cuda")
    fn = lambda *o: sk.sat_mlp(*o, 0.5, backend="triton")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    y, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
    assert_matches_reference(compiled, operands, dy, idx)


@gpu
@pytest.mark.slow
def test_gpu_offsets_past_2_31():
    """T * I > 2^31 elements in G/U: the int64 offsets (checked against the torch backend, fp64 is too big)."""
    T, h, inter = 196_000, 64, 11_008
    assert T * inter > 2 ** 31
    operands, dy = make_operands(T, h, inter, torch.bfloat16, device="cuda")
    y_t, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
    grads_t = torch.autograd.grad(y_t, operands, dy)
    y_r = sk.gathered_mlp(*operands, idx, backend="torch", validate=False)
    grads_r = torch.autograd.grad(y_r, operands, dy)
    for a, b in zip((y_t, *grads_t), (y_r, *grads_r)):
        assert rel_rms(a, b) < 2e-2
    tail = slice(T - 1000, T)
    assert rel_rms(y_t[tail], y_r[tail]) < 2e-2   # the last rows sit past 2^31 elements into G and U


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA and triton")
def test_gpu_every_config_matches(monkeypatch):
    """Each autotune candidate of each kernel alone computes the op (bf16, odd shape: every tile is masked), and
    every gate/up config gives bitwise the same fused scores (so the kept set does not depend on the winner)."""
    from sat_kernels.ops.mlp.triton import launcher as triton_sat_mlp

    candidates = {kern: [c for c in kern.configs if not _is_fp32(c)] for kern in _autotuned_kernels()}
    operands, dy = make_operands(333, 264, 1000, torch.bfloat16, device="cuda")
    x, wg, wu, wd = (t.detach() for t in operands)
    fixed = torch.sort(torch.randperm(1000, device="cuda")[:501]).values
    scores = []
    for compact in (True, False):
        monkeypatch.setattr(triton_sat_mlp, "COMPACT_W_DOWN", compact)
        for i in range(max(map(len, candidates.values()))):
            for kern, configs in candidates.items():
                monkeypatch.setattr(kern, "configs", [configs[min(i, len(configs) - 1)]])
                monkeypatch.setattr(kern, "cache", {})
            assert_matches_reference(lambda *o: sk.gathered_mlp(*o, fixed, backend="triton"), operands, dy, fixed)
            _, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
            assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, backend="triton"), operands, dy, idx)
            scores.append(torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, "silu", "l2", False)[3])
    assert all(torch.equal(scores[0], s) for s in scores)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA and triton")
def test_gpu_autotuned_first_call():
    """The first call at a new shape autotunes every kernel over all its configs; its result must be right too."""
    for kern in _autotuned_kernels():
        kern.cache.clear()
    operands, dy = make_operands(1000, 576, 1536, torch.bfloat16, device="cuda")
    x, wg, wu, wd = (t.detach() for t in operands)
    _, _, _, fused = torch.ops.sat_kernels.triton_gate_up_scores(x, wg, wu, wd, "silu", "l2", False)
    exact = sk.neuron_scores(*(t.double() for t in (x, wg, wu, wd)))
    assert rel_rms(fused, exact) <= 2 * rel_rms(sk.neuron_scores(x, wg, wu, wd), exact) + 1e-6
    _, idx = sk.sat_mlp(*operands, 0.5, backend="triton", return_indices=True)
    assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, backend="triton"), operands, dy, idx)
