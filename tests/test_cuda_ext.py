"""The CUDA extension ``sat_kernels._C`` and the ``"cuda"`` backend.

CPU (CI): the extension is built by the install wherever nvcc exists and imports; the host twins of the kernels' math
(Philox4x32-10, selection keys) are right; every custom op rejects bad arguments before any launch; the build options
parse and a failed optional build warns and continues. GPU (marker gpu): selection against a stable sorted top-k,
sampling statistics, exact gathers/scatters in every dtype, the cuda backend against the fp64 reference.
"""
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import sat_kernels as sk
from sat_kernels.ops.mlp import cuda as cuda_ops
from sat_kernels.ops.mlp.cuda import kernels
from sat_kernels.ops.reference import reference_indices

from helpers import assert_matches_reference, check_zero_tokens, make_operands

ROOT = Path(__file__).resolve().parent.parent


def _load_build():
    spec = importlib.util.spec_from_file_location("sat_kernels_cuda_build_test", ROOT / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
CUDA_REASON = sk.unavailable_backends().get("cuda")
ON_GPU = torch.cuda.is_available() and CUDA_REASON is None


def _ext():
    try:
        return cuda_ops.load_extension()
    except RuntimeError as exc:
        pytest.skip(str(exc))


# ------------------------------------------------------------------------------------------------ build and import
def test_extension_built_where_nvcc_exists():
    """The install builds sat_kernels._C with this machine's nvcc (CI: a fresh clone + pip install -e)."""
    if build.find_nvcc() is None:
        pytest.skip("no nvcc on this machine: the extension is optional and not built")
    if build.env_flag("SAT_KERNELS_SKIP_CUDA_BUILD"):
        pytest.skip("SAT_KERNELS_SKIP_CUDA_BUILD is set")
    ext = cuda_ops.load_extension()   # raises with the reason if the install did not build it
    archs = [int(a.rstrip("af")) * 10 for a in build.parse_archs(os.environ.get("SAT_KERNELS_CUDA_ARCHS",
                                                                                 build.DEFAULT_ARCHS))]
    assert sorted(ext.compiled_archs()) == sorted(set(archs))
    assert ext.runtime_version() >= 11080
    assert ext.device_count() == torch.cuda.device_count()


def test_without_gpu_cuda_backend_says_why():
    if ON_GPU:
        pytest.skip("the cuda backend can run here")
    assert "cuda" not in sk.available_backends()
    assert CUDA_REASON and ("not built" in CUDA_REASON or "no CUDA device" in CUDA_REASON)
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        sk.sat_mlp(*make_operands(8, 16, 20, torch.float32)[0], 0.5, backend="cuda")


def test_launcher_rejects_cpu_tensors():
    from sat_kernels.ops.mlp.cuda.launcher import sat_mlp_cuda

    (x, wg, wu, wd), _ = make_operands(8, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got x on cpu"):
        sat_mlp_cuda(x, wg, wu, wd, torch.arange(5), "silu")


# ----------------------------------------------------------------------------------------- host twins of the math
PHILOX_KAT = [  # Random123's known-answer vectors of Philox4x32-10: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", PHILOX_KAT, ids=["zero", "ones", "pi"])
def test_philox_known_answers(ctr, key, want):
    assert _ext().host_philox4x32_10(*ctr, *key) == want


def _host_keys(scores, strategy, seed=0, offset=0, row=0, uniform=None):
    """The kernels' selection keys of one row, computed on the host, as int64 (uint32 values)."""
    ext = _ext()
    scores = scores.float().contiguous()
    keys = torch.empty(scores.numel(), dtype=torch.int32)
    u_ptr = 0
    if uniform is not None:
        uniform = uniform.float().contiguous()
        u_ptr = uniform.data_ptr()
    ext.host_selection_keys(scores.data_ptr(), u_ptr, keys.data_ptr(), scores.numel(), row,
                            kernels.STRATEGY_CODES[strategy], seed, offset)
    return keys.long() & 0xFFFFFFFF


def _key_to_float(keys):
    """Inverse of the kernels' order_key (NaN keys excluded)."""
    bits = torch.where(keys >= 2 ** 31, keys - 2 ** 31, (~keys) & 0xFFFFFFFF)
    return bits.to(torch.int32).view(torch.float32)


def test_topk_keys_order_like_the_scores_with_nan_lowest():
    s = torch.tensor([1.5, float("nan"), -0.0, 0.0, float("-inf"), float("inf"), -2.0, 3.0, 1.5, -float("nan"),
                      1e-38, -1e-38, 7.0])
    keys = _host_keys(s, "topk")
    assert keys[1] == keys[9] == 0, "NaN is below everything"
    assert keys[2] == keys[3], "-0.0 and +0.0 tie"
    finite = ~torch.isnan(s)
    assert (keys[finite] > 0).all()
    order = torch.sort(keys, descending=True, stable=True).indices
    expected = sorted(range(len(s)), key=lambda i: (math.isnan(s[i]), -s[i].item() if not math.isnan(s[i]) else 0, i))
    assert order.tolist() == expected
    torch.testing.assert_close(_key_to_float(keys[finite]), s[finite] + 0.0, rtol=0, atol=0)


def test_random_keys_are_the_philox_bits_of_index_row_offset():
    s = torch.ones(6)
    seed = 0x1234_5678_9ABC_DEF0
    keys = _host_keys(s, "random", seed=seed, offset=8, row=3)
    ext = _ext()
    for i in range(6):
        bits = ext.host_philox4x32_10(i, 3, 8, 0, seed & 0xFFFFFFFF, seed >> 32)[0]
        assert keys[i].item() == bits
    assert torch.equal(keys, _host_keys(s, "random", seed=seed, offset=8, row=3)), "reproducible"
    assert not torch.equal(keys, _host_keys(s, "random", seed=seed, offset=12, row=3)), "next offset draws anew"
    assert not torch.equal(keys, _host_keys(s, "random", seed=seed, offset=8, row=4)), "rows are independent"


def test_sample_keys_with_given_noise_are_the_torch_formula():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(200, generator=gen) * 5 + 0.01
    u = torch.rand(200, generator=gen)
    u[:3] = torch.tensor([0.0, 1e-45, 0.5])      # clamped to the smallest normal, like sat_kernels.selection
    keys = _host_keys(s, "sample", uniform=u)
    want = torch.log(s) - torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))
    torch.testing.assert_close(_key_to_float(keys), want, rtol=2e-6, atol=2e-6)
    assert torch.equal(_host_keys(u, "random", uniform=u), _host_keys(u, "topk")), "random with noise: key = u"


@pytest.mark.parametrize("strategy", ["topk", "random"])
def test_torch_selection_keeps_the_kernels_set(strategy):
    """sk.select_neurons (torch and triton backends) keeps the set the selection kernel keeps from the same keys: ties
    to the lower index, NaN below -inf, -0.0 equal to +0.0 (the kernel's keys from its host twin)."""
    gen = torch.Generator().manual_seed(3)
    n = 3000
    values = torch.randint(0, 5, (n,), generator=gen).float()                  # many ties
    for special in (float("nan"), -0.0, float("-inf"), float("inf")):
        values[torch.rand(n, generator=gen) < 0.05] = special
    scores = values if strategy == "topk" else torch.rand(n, generator=gen)
    uniform = None if strategy == "topk" else values
    keys = _host_keys(scores, strategy, uniform=uniform)
    for k in (1, 100, n // 2, n - 200, n - 1):
        kernel_set = torch.sort(torch.sort(keys, descending=True, stable=True).indices[:k]).values
        assert torch.equal(sk.select_neurons(scores, k, strategy=strategy, uniform=uniform), kernel_set), k


def test_sample_keys_are_finite_for_positive_scores():
    keys = _host_keys(torch.full((4096,), 1.0), "sample", seed=7)
    inf_key = _host_keys(torch.tensor([float("inf")]), "topk")[0]
    assert (keys > 0).all() and (keys < inf_key).all()


def test_sample_top1_is_proportional_to_score():
    """Gumbel-max with the kernels' Philox noise: argmax over 12000 rows draws i with p = s_i / sum(s) (chi-square)."""
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    rows = 12000
    counts = torch.zeros(5)
    for row in range(rows):
        counts[int(torch.argmax(_host_keys(s, "sample", seed=11, offset=4, row=row)))] += 1
    assert counts[4] == 0, "a zero score is never drawn first"
    expected = rows * s[:4] / s.sum()
    chi2 = (((counts[:4] - expected) ** 2) / expected).sum().item()
    assert chi2 < 16.27, f"chi2 {chi2:.2f} (3 dof, p = 0.001 threshold 16.27), counts {counts.tolist()}"


# ------------------------------------------------------------------------------------ argument checks (no launch)
@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if an op gets as far as the extension: the checks must come first."""
    def _fail():
        raise AssertionError("the extension was reached: argument checks must reject this before any launch")
    monkeypatch.setattr(kernels, "load_extension", _fail)


S = torch.rand(100)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(scores=S, k=10), ValueError, "scores must be a CUDA tensor, got device cpu"),
    (dict(scores=S.to("meta"), k=10), ValueError, "scores must be a CUDA tensor, got device meta"),
    (dict(scores=S.half(), k=10), TypeError, "scores must have dtype float32; got torch.float16"),
    (dict(scores=S.reshape(2, 5, 10), k=3), ValueError, "scores must be 1-D or 2-D"),
    (dict(scores=S.reshape(10, 10).t(), k=3), ValueError, "scores must be contiguous"),
    (dict(scores=S, k=0), ValueError, r"k must be an integer in \[1, 100\]"),
    (dict(scores=S, k=101), ValueError, r"k must be an integer in \[1, 100\]"),
    (dict(scores=S, k=True), ValueError, "k must be an integer"),
    (dict(scores=S, k=2.0), ValueError, "k must be an integer"),
    (dict(scores=S, k=5, strategy="best"), ValueError, "strategy must be one of"),
    (dict(scores=S, k=5, strategy="sample", uniform=torch.rand(99)), ValueError, "uniform must have the shape"),
    (dict(scores=S, k=5, strategy="sample", uniform=torch.rand(100).double()), TypeError, "uniform must have dtype"),
    (dict(scores=S, k=5, uniform=torch.rand(100)), ValueError, "only used by strategy 'sample' or 'random'"),
    (dict(scores=S, k=5, index_dtype=torch.int16), TypeError, "index_dtype must be torch.int64 or torch.int32"),
    (dict(scores=S, k=5, strategy="sample", generator=1), TypeError, "generator must be a torch.Generator"),
    (dict(scores=[1.0, 2.0], k=1), TypeError, "scores must be a torch.Tensor"),
], ids=["cpu", "meta", "fp16", "3d", "strided", "k0", "k-too-big", "k-bool", "k-float", "strategy", "uniform-shape",
        "uniform-dtype", "uniform-topk", "index-dtype", "generator", "list"])
def test_select_kept_rejects(no_launch, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kernels.select_kept(**kwargs)


def test_select_kept_checks_before_advancing_the_generator(no_launch):
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    with pytest.raises(ValueError, match="CUDA tensor"):
        kernels.select_kept(S, 5, strategy="sample", generator=gen)
    assert torch.equal(gen.get_state(), state)


def test_select_neurons_rejects(no_launch):
    with pytest.raises(ValueError, match="scores must be a 1-D float tensor"):
        kernels.select_neurons(torch.arange(5), 2)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
        kernels.select_neurons(torch.rand(5), 6)
    with pytest.raises(ValueError, match="scores must be a CUDA tensor"):
        kernels.select_neurons(torch.rand(5, dtype=torch.bfloat16), 2)


W = torch.rand(12, 8)
IDX = torch.tensor([1, 4, 7])


@pytest.mark.parametrize("op", ["gather_rows", "gather_cols"])
@pytest.mark.parametrize("src,idx,exc,match", [
    (W, IDX, ValueError, "src must be a CUDA tensor, got device cpu"),
    (W.flatten(), IDX, ValueError, "src must be 2-D"),
    (W.long(), IDX, TypeError, "src must have dtype float16, bfloat16, float32, float64; got torch.int64"),
    (W.t(), IDX, ValueError, "src must be contiguous"),
    (W, IDX.int(), TypeError, "idx must have dtype int64; got torch.int32"),
    (W, IDX[None], ValueError, "idx must be 1-D"),
    (W, IDX.flip(0)[::2], ValueError, "idx must be contiguous"),
    (W, [1, 2], TypeError, "idx must be a torch.Tensor"),
], ids=["cpu", "1d", "int-src", "strided-src", "int32-idx", "2d-idx", "strided-idx", "list-idx"])
def test_gathers_reject(no_launch, op, src, idx, exc, match):
    with pytest.raises(exc, match=match):
        getattr(kernels, op)(src, idx)


@pytest.mark.parametrize("op,dim", [("scatter_rows", 0), ("scatter_cols", 1)])
def test_scatters_reject(no_launch, op, dim):
    fn = getattr(kernels, op)
    src = torch.rand(3, 3)
    with pytest.raises(ValueError, match="src must be a CUDA tensor"):
        fn(src, IDX, 12)
    with pytest.raises(ValueError, match=rf"src.shape\[{dim}\] must equal the number of indices 2"):
        fn(src, IDX[:2], 12)
    with pytest.raises(ValueError, match="more than n = 2"):
        fn(src, IDX, 2)
    with pytest.raises(ValueError, match=r"n must be an integer in \[0, "):
        fn(src, IDX, -1)
    with pytest.raises(TypeError, match="src must have dtype"):
        fn(src.int(), IDX, 12)


def test_fake_implementations_give_output_shapes():
    """The register_fake shapes (what torch.compile traces), on fake CUDA tensors: no GPU needed (but no CUDA op
    of torch itself either: a CPU-only torch cannot even index a fake CUDA tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        scores = torch.empty(3, 100, device="cuda")
        assert kernels.select_kept(scores, 7).shape == (3, 7)
        assert kernels.select_kept(torch.empty(100, device="cuda"), 7, index_dtype=torch.int32).dtype == torch.int32
        assert kernels.select_kept(scores, 7, strategy="random", uniform=torch.empty(3, 100, device="cuda")).shape \
            == (3, 7)
        a = torch.empty(10, 50, dtype=torch.bfloat16, device="cuda")
        idx = torch.empty(20, dtype=torch.int64, device="cuda")
        assert kernels.gather_cols(a, idx).shape == (10, 20)
        assert kernels.gather_rows(torch.empty(50, 10, device="cuda"), idx).shape == (20, 10)
        out = kernels.scatter_cols(torch.empty(10, 20, device="cuda"), idx, 50)
        assert out.shape == (10, 50) and out.dtype == torch.float32
        assert kernels.scatter_rows(torch.empty(20, 10, dtype=torch.float16, device="cuda"), idx, 64).shape == (64, 10)
        with pytest.raises(ValueError, match="more than n = 19"):
            kernels.scatter_rows(torch.empty(20, 10, device="cuda"), idx, 19)


@pytest.mark.parametrize("strategy", ["sample", "random"])
def test_noise_while_a_cuda_graph_is_captured(monkeypatch, strategy):
    """During CUDA-graph capture reading a generator's seed and offset raises (and a captured Philox offset would
    replay one draw): select_kept draws torch.rand noise on the scores' device instead, and refuses a CPU generator
    with a clear error. Capture faked on fake CUDA tensors: no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_philox(*args):
        raise AssertionError("the generator's seed/offset were read during capture")

    passed = []
    op = kernels._select_kept_op
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(kernels, "philox_seed_offset", no_philox)
    monkeypatch.setattr(kernels, "_select_kept_op", lambda scores, uniform, *args: passed.append(uniform) or
                        op(scores, uniform, *args))
    with FakeTensorMode():
        scores = torch.empty(2, 100, device="cuda")
        assert kernels.select_kept(scores, 7, strategy=strategy).shape == (2, 7)
        uniform, = passed
        assert uniform.shape == (2, 100) and uniform.dtype == torch.float32 and uniform.device.type == "cuda"
        with pytest.raises(RuntimeError, match="cannot draw from a generator on cpu while a CUDA graph is being"):
            kernels.select_kept(scores, 7, strategy=strategy, generator=torch.Generator())


# ------------------------------------------------------------------------------------------------- build options
@pytest.mark.parametrize("spec,want", [
    ("80;90", ["80", "90"]), ("8.0 9.0", ["80", "90"]), ("sm_90a,sm_80", ["80", "90a"]), ("120;86;86", ["86", "120"]),
    ("9.0+PTX", ["90"]), ("compute_75", ["75"]),
])
def test_parse_archs(spec, want):
    assert build.parse_archs(spec) == want


@pytest.mark.parametrize("spec", ["", "ampere", "8.x", "sm80;;sm"])
def test_parse_archs_rejects(spec):
    with pytest.raises(ValueError, match="SAT_KERNELS_CUDA_ARCHS"):
        build.parse_archs(spec)


def test_gencode_sass_for_each_ptx_for_newest():
    assert build.gencode_flags(["80", "90a"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                  "-gencode=arch=compute_90a,code=sm_90a",
                                                  "-gencode=arch=compute_90,code=compute_90"]


def test_skip_force_and_missing_nvcc(monkeypatch, tmp_path):
    monkeypatch.setenv("SAT_KERNELS_SKIP_CUDA_BUILD", "1")
    assert build.cuda_extensions() == []
    monkeypatch.delenv("SAT_KERNELS_SKIP_CUDA_BUILD")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))          # a toolkit without nvcc
    assert build.find_nvcc() is None
    assert build.cuda_extensions() == []
    monkeypatch.setenv("SAT_KERNELS_FORCE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="SAT_KERNELS_FORCE_CUDA_BUILD=1 but nvcc not found"):
        build.cuda_extensions()


def _fake_toolkit(tmp_path):
    """A CUDA_HOME whose nvcc and C++ compiler fail at once, so a build attempt fails in milliseconds."""
    (tmp_path / "bin").mkdir(parents=True)
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart_static.a").write_bytes(b"")
    for name in ("nvcc", "cxx"):
        tool = tmp_path / "bin" / name
        tool.write_text("#!/bin/sh\necho \"fake $0: cannot compile\" >&2\nexit 1\n")
        tool.chmod(0o755)
    return tmp_path


def _run_build(tmp_path, monkeypatch):
    """BuildExtension.run on the real sources, with a stand-in pybind11 (the test env need not have it)."""
    from setuptools import Distribution

    monkeypatch.setitem(sys.modules, "pybind11", types.SimpleNamespace(get_include=lambda: str(tmp_path)))
    dist = Distribution({"name": "sat_kernels_build_test", "ext_modules": build.cuda_extensions()})
    dist.script_name = str(ROOT / "setup.py")
    cmd = build.BuildExtension(dist)
    cmd.build_temp = str(tmp_path / "temp")
    cmd.build_lib = str(tmp_path / "lib")
    cmd.ensure_finalized()
    cmd.run()
    return cmd


def test_failed_optional_build_warns_and_continues(monkeypatch, tmp_path, capfd):
    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("CXX", str(home / "bin" / "cxx"))
    monkeypatch.delenv("SAT_KERNELS_FORCE_CUDA_BUILD", raising=False)
    monkeypatch.delenv("SAT_KERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.chdir(ROOT)
    cmd = _run_build(tmp_path, monkeypatch)
    assert cmd.extensions == []
    err = capfd.readouterr().err
    assert "WARNING: building sat_kernels._C FAILED, installing without it" in err and "cannot compile" in err
    monkeypatch.setenv("SAT_KERNELS_FORCE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="command failed"):
        _run_build(tmp_path, monkeypatch)


def test_bad_parallelism_variable(monkeypatch, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setenv("SAT_KERNELS_FORCE_CUDA_BUILD", "1")
    monkeypatch.setenv("MAX_JOBS", "two")
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="MAX_JOBS must be a positive integer, got 'two'"):
        _run_build(tmp_path, monkeypatch)


def test_benchmark_says_it_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    path = ROOT / "benchmarks" / "cuda_selection_speed.py"
    spec = importlib.util.spec_from_file_location("cuda_selection_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--out", "unused.json"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------- GPU
def gpu(test):
    """GPU test: marker gpu (skipped without CUDA by conftest), and skipped where the extension is not built."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason=f"cuda backend unavailable: {CUDA_REASON}")(test))


def _stable_topk(keys, k):
    """The kept set of a stable descending sort (ties to the lower index), NaN below everything."""
    keys = torch.where(torch.isnan(keys), torch.full_like(keys, -math.inf), keys)
    return torch.sort(torch.sort(keys, descending=True, stable=True).indices[:k]).values


@gpu
@pytest.mark.parametrize("n,k", [(1, 1), (5, 1), (5, 5), (97, 48), (1000, 1), (1000, 999), (1000, 1000),
                                 (11008, 5504), (14336, 7168), (28672, 7168), (65536, 32768), (100003, 777)],
                         ids=lambda v: str(v))
def test_gpu_topk_equals_stable_sorted_topk(n, k):
    scores = torch.rand(n, device="cuda", generator=torch.Generator("cuda").manual_seed(n))
    idx = kernels.select_kept(scores, k)
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert torch.equal(idx, _stable_topk(scores, k))


@gpu
@pytest.mark.parametrize("n", [7, 1000, 14336, 65536])
def test_gpu_topk_ties_go_to_lower_indices(n):
    gen = torch.Generator("cuda").manual_seed(1)
    scores = torch.randint(0, 4, (n,), device="cuda", generator=gen).float()    # 4 distinct values, many ties
    scores[torch.rand(n, device="cuda", generator=gen) < 0.1] = -0.0
    for k in {1, n // 3 + 1, n // 2, n - 1, n}:
        assert torch.equal(kernels.select_kept(scores, k), _stable_topk(scores, k)), k
    constant = torch.full((n,), 2.5, device="cuda")
    assert torch.equal(kernels.select_kept(constant, max(1, n // 2)), torch.arange(max(1, n // 2), device="cuda"))


@gpu
def test_gpu_nan_scores_rank_lowest():
    gen = torch.Generator("cuda").manual_seed(2)
    scores = torch.randn(3001, device="cuda", generator=gen)
    nan = torch.rand(3001, device="cuda", generator=gen) < 0.3
    scores[nan] = float("nan")
    n_valid = int((~nan).sum())
    for k in (1, 1000, n_valid, n_valid + 5, 3001):
        idx = kernels.select_kept(scores, k)
        assert torch.equal(idx, _stable_topk(scores, k)), k
    assert not torch.isnan(scores[kernels.select_kept(scores, n_valid)]).any()


@gpu
def test_gpu_several_rows_and_int32():
    scores = torch.rand(24, 14336, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    idx = kernels.select_kept(scores, 5000)
    idx32 = kernels.select_kept(scores, 5000, index_dtype=torch.int32)
    assert idx.shape == (24, 5000) and idx32.dtype == torch.int32 and torch.equal(idx32.long(), idx)
    for r in range(24):
        assert torch.equal(idx[r], _stable_topk(scores[r], 5000)), r


@gpu
@pytest.mark.parametrize("strategy", ["sample", "random"])
def test_gpu_noise_reproducible_and_valid(strategy):
    scores = torch.rand(14336, device="cuda") + 0.01
    a = kernels.select_kept(scores, 7168, strategy=strategy, generator=torch.Generator("cuda").manual_seed(5))
    b = kernels.select_kept(scores, 7168, strategy=strategy, generator=torch.Generator("cuda").manual_seed(5))
    c = kernels.select_kept(scores, 7168, strategy=strategy, generator=torch.Generator("cuda").manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.unique(a))
    torch.manual_seed(9)
    d = kernels.select_kept(scores, 7168, strategy=strategy)
    e = kernels.select_kept(scores, 7168, strategy=strategy)
    torch.manual_seed(9)
    assert torch.equal(d, kernels.select_kept(scores, 7168, strategy=strategy)) and not torch.equal(d, e)
    cpu_gen = [torch.Generator().manual_seed(4) for _ in range(2)]
    assert torch.equal(*[kernels.select_kept(scores, 7168, strategy=strategy, generator=g) for g in cpu_gen])


@gpu
@pytest.mark.parametrize("strategy", ["sample", "random"])
def test_gpu_noise_in_a_captured_cuda_graph(strategy):
    """select_kept captured in a CUDA graph: every replay draws a new valid set (torch.rand noise while capturing)."""
    scores = torch.rand(14336, device="cuda") + 0.01
    kernels.select_kept(scores, 7168, strategy=strategy)     # warm-up outside the graph (shared-memory attribute)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx = kernels.select_kept(scores, 7168, strategy=strategy)
    draws = []
    for _ in range(2):
        graph.replay()
        draws.append(idx.clone())
    for d in draws:
        assert d.shape == (7168,) and torch.equal(d, torch.unique(d))
    assert not torch.equal(*draws)


@gpu
def test_gpu_sample_top1_proportional_to_score():
    """k = 1 in 20000 rows of one launch: neuron i is drawn with p = s_i / sum(s) (chi-square, fixed seed)."""
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0], device="cuda")
    rows = 20000
    idx = kernels.select_kept(s.expand(rows, 5).contiguous(), 1, strategy="sample",
                              generator=torch.Generator("cuda").manual_seed(0))
    counts = torch.bincount(idx.flatten(), minlength=5).float().cpu()
    assert counts[4] == 0
    expected = rows * s[:4].cpu() / s.sum().cpu()
    chi2 = (((counts[:4] - expected) ** 2) / expected).sum().item()
    assert chi2 < 16.27, f"chi2 {chi2:.2f} (3 dof, p = 0.001 threshold 16.27), counts {counts.tolist()}"


@gpu
def test_gpu_random_is_uniform():
    rows, n, k = 4000, 10, 3
    idx = kernels.select_kept(torch.rand(rows, n, device="cuda"), k, strategy="random",
                              generator=torch.Generator("cuda").manual_seed(1))
    counts = torch.bincount(idx.flatten(), minlength=n).float().cpu()
    expected = rows * k / n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 27.88, f"chi2 {chi2:.2f} (9 dof, p = 0.001 threshold 27.88), counts {counts.tolist()}"


@gpu
def test_gpu_given_noise_matches_torch_keys():
    """With pre-drawn noise the kept set is a top-k set of sat_kernels.selection's own fp32 keys."""
    gen = torch.Generator("cuda").manual_seed(4)
    s = torch.rand(5000, device="cuda", generator=gen) + 0.01
    u = torch.rand(5000, device="cuda", generator=gen)
    keys = torch.log(s) - torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))
    idx = kernels.select_neurons(s, 1234, strategy="sample", uniform=u)
    kept = torch.zeros(5000, dtype=torch.bool, device="cuda")
    kept[idx] = True
    assert keys[kept].min() >= keys[~kept].max() - 1e-5
    assert torch.equal(kernels.select_neurons(s, 1234, strategy="random", uniform=u), _stable_topk(u, 1234))


def _misaligned(t):
    """A copy of ``t`` starting 1 element past a 16-byte boundary (the row kernels fall back to scalar accesses)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


GS_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@gpu
@pytest.mark.parametrize("dtype", GS_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rows,n,k", [(1, 5, 1), (63, 123, 61), (97, 431, 216), (128, 1024, 512), (1000, 11008, 5504),
                                      (33, 256, 256)], ids=lambda v: str(v))
def test_gpu_gathers_and_scatters_exact(rows, n, k, dtype):
    gen = torch.Generator("cuda").manual_seed(rows + n)
    idx = torch.sort(torch.randperm(n, device="cuda", generator=gen)[:k]).values
    a = torch.randn(rows, n, device="cuda", generator=gen).to(dtype)
    w = torch.randn(n, rows, device="cuda", generator=gen).to(dtype)
    c = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    r = torch.randn(k, rows, device="cuda", generator=gen).to(dtype)
    for prep in (lambda t: t, _misaligned):
        assert torch.equal(kernels.gather_cols(prep(a), idx), a.index_select(1, idx))
        assert torch.equal(kernels.gather_rows(prep(w), idx), w.index_select(0, idx))
        assert torch.equal(kernels.scatter_cols(prep(c), idx, n), torch.zeros(rows, n, dtype=dtype,
                                                                              device="cuda").index_copy_(1, idx, c))
        assert torch.equal(kernels.scatter_rows(prep(r), idx, n), torch.zeros(n, rows, dtype=dtype,
                                                                              device="cuda").index_copy_(0, idx, r))


@gpu
def test_gpu_ops_run_on_the_current_stream_and_device():
    s = torch.cuda.Stream()
    a = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(0, 4096, 2, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = kernels.gather_cols(a, idx)
        keep = kernels.select_kept(a.float().norm(dim=0), 100)
    s.synchronize()
    assert torch.equal(out, a[:, ::2]) and keep.numel() == 100


CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CUDA_SHAPES = [(1, 8, 5), (63, 97, 123), (97, 123, 431), (1024, 576, 1536), (2048, 4096, 11008)]


@gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.9], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "T{}-h{}-I{}".format(*s))
def test_gpu_cuda_backend_matches_fp64_reference(shape, rate, dtype):
    operands, dy = make_operands(*shape, dtype, device="cuda")
    _, idx = sk.sat_mlp(*operands, rate, backend="cuda", return_indices=True)
    assert idx.is_cuda and idx.dtype == torch.int64 and torch.equal(idx, torch.unique(idx))
    assert idx.numel() == sk.num_kept(shape[2], rate)
    scores = sk.neuron_scores(*operands)
    kept = torch.zeros(shape[2], dtype=torch.bool, device="cuda")
    kept[idx] = True
    if not kept.all():
        assert scores[kept].min() >= scores[~kept].max(), "a top-k set of the scores (ties may go either way)"
    ours = assert_matches_reference(lambda *o: sk.sat_mlp(*o, rate, backend="cuda"), operands, dy, idx)
    omitted = torch.ones(shape[2], dtype=torch.bool, device="cuda")
    omitted[idx] = False
    _, _, dwg, dwu, dwd = ours
    assert (dwg[omitted] == 0).all() and (dwu[omitted] == 0).all() and (dwd[:, omitted] == 0).all()
    assert_matches_reference(lambda *o: sk.gathered_mlp(*o, idx, backend="cuda"), operands, dy, idx)


@gpu
@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
def test_gpu_cuda_selection_is_the_reference_topk_in_fp64(metric):
    operands, _ = make_operands(97, 123, 431, torch.float64, device="cuda")
    _, idx = sk.sat_mlp(*operands, 0.5, metric=metric, backend="cuda", return_indices=True)
    assert torch.equal(idx, reference_indices(*operands, 0.5, metric=metric))


@gpu
@pytest.mark.parametrize("strategy", ["topk", "sample", "random"])
def test_gpu_cuda_backend_no_host_sync(strategy):
    operands, dy = make_operands(256, 128, 512, torch.bfloat16, device="cuda")
    sk.sat_mlp(*operands, 0.5, strategy=strategy, backend="cuda").backward(dy)   # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sk.sat_mlp(*operands, 0.5, strategy=strategy, backend="cuda").backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@pytest.mark.parametrize("strategy", ["sample", "random"])
def test_gpu_cuda_backend_checkpoint_replays_the_draw(strategy):
    from torch.utils.checkpoint import checkpoint

    operands, dy = make_operands(64, 48, 200, torch.float32, device="cuda")

    def fn(*o):
        return sk.sat_mlp(*o, 0.5, strategy=strategy, backend="cuda")

    torch.manual_seed(3)
    plain = torch.autograd.grad(fn(*operands), operands, dy)
    torch.manual_seed(3)
    ckpt = torch.autograd.grad(checkpoint(fn, *operands, use_reentrant=False), operands, dy)
    for p, c in zip(plain, ckpt):
        assert torch.equal(p, c)


@gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gpu_cuda_backend_zero_tokens(dtype):
    """Zero tokens: the gathers of the empty activations are not launched (a zero-size grid is a CUDA error)."""
    check_zero_tokens(dtype, backend="cuda", device="cuda")
