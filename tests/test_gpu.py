"""The torch backend on CUDA (marker gpu: skipped without a GPU): every dtype, small and Llama shapes, no host sync."""
import pytest
import torch

import sat_kernels as sk

from helpers import assert_matches_reference, make_operands

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(97, 123, 431), (1024, 576, 1536), (2048, 4096, 11008)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-h{}-I{}".format(*s))
def test_sat_mlp_cuda_matches_fp64_reference(shape, dtype):
    operands, dy = make_operands(*shape, dtype, device="cuda")
    _, idx = sk.sat_mlp(*operands, 0.5, backend="torch", return_indices=True)
    assert idx.is_cuda and torch.equal(idx, torch.unique(idx))
    ours = assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, backend="torch"), operands, dy, idx)
    omitted = torch.ones(shape[2], dtype=torch.bool, device="cuda")
    omitted[idx] = False
    assert (ours[2][omitted] == 0).all() and (ours[4][:, omitted] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "T{}-h{}-I{}".format(*s))
def test_exact_input_backward_cuda_matches_fp64_reference(shape, dtype):
    """backward="exact_input" runs the torch backend's code on CUDA too ("auto" routes it there)."""
    operands, dy = make_operands(*shape, dtype, device="cuda")
    exact = dict(forward="dense", backward="exact_input")
    _, idx = sk.sat_mlp(*operands, 0.5, **exact, return_indices=True)
    ours = assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, **exact), operands, dy, idx, **exact)
    omitted = torch.ones(shape[2], dtype=torch.bool, device="cuda")
    omitted[idx] = False
    assert (ours[2][omitted] == 0).all() and (ours[4][:, omitted] == 0).all()


@pytest.mark.parametrize("backward", ["sparse", "exact_input"])
@pytest.mark.parametrize("strategy", ["topk", "sample", "random"])
def test_no_host_sync_in_forward_and_backward(strategy, backward):
    operands, dy = make_operands(256, 128, 512, torch.bfloat16, device="cuda")
    modes = dict(forward="dense", backward=backward) if backward != "sparse" else {}
    sk.sat_mlp(*operands, 0.5, strategy=strategy, **modes).backward(dy)   # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sk.sat_mlp(*operands, 0.5, strategy=strategy, **modes).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_generator_reproducible():
    operands, _ = make_operands(64, 32, 128, torch.float32, device="cuda")
    picks = [sk.sat_mlp(*operands, 0.5, strategy="sample", return_indices=True,
                        generator=torch.Generator(device="cuda").manual_seed(3))[1] for _ in range(2)]
    assert torch.equal(*picks)


@pytest.mark.parametrize("unit", ["head", "group"])
@pytest.mark.parametrize("strategy", ["topk", "sample", "random"])
def test_attention_no_host_sync_in_forward_and_backward(strategy, unit):
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, h, H, G, d = 2, 256, 256, 8, 2, 32
    x = torch.randn(B, T, h, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(*shape, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_()
          for shape in ((H * d, h), (G * d, h), (G * d, h), (h, H * d))]

    def step():
        sk.sat_attention(x, *ws, 0.6, num_heads=H, num_kv_heads=G, strategy=strategy, unit=unit).sum().backward()

    step()                                                  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gathered_mlp_syncs_only_when_validating():
    """validate=True reads index values back (host syncs, as its docstring says); validate=False runs without one."""
    operands, dy = make_operands(256, 128, 512, torch.bfloat16, device="cuda")
    idx = torch.arange(0, 512, 3, device="cuda")
    sk.gathered_mlp(*operands, idx, validate=False).backward(dy)   # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sk.gathered_mlp(*operands, idx, validate=False).backward(dy)
        with pytest.raises(RuntimeError, match="synchroniz"):
            sk.gathered_mlp(*operands, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
