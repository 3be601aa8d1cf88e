"""The Triton backend's token mask in the Triton interpreter (CPU, fp32/fp16): the gate/up kernel's fused scores over
the masked-in tokens, the kept set they give, the custom op's registration.

Not collected by ``pytest tests`` (the file name does not start with ``test_``): ``tests/test_token_mask.py`` runs it
in a subprocess with ``TRITON_INTERPRET=1``; alone: ``TRITON_INTERPRET=1 python -m pytest -q
tests/token_mask_interpreter_cases.py``. Shapes are tiny (the interpreter runs 16x16x16 tiles in numpy) but cross
several tiles and score partials (64 rows each); bf16 is not tested here (the interpreter computes it wrongly).
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported: run through tests/test_token_mask.py",
                allow_module_level=True)

import sat_kernels as sk

from helpers import assert_matches_reference, make_operands, out_and_grads

DTYPES = [torch.float32, torch.float16]


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _case(dtype, seed=0):
    """``x`` ``[2, 41, 33]`` (82 tokens: two score partials), the weights of I = 70, a mask with 49 tokens in."""
    operands, dy = make_operands(None, 33, 70, dtype, lead=(2, 41), seed=seed)
    mask = torch.rand(2, 41, generator=torch.Generator().manual_seed(seed)) < 0.6
    return operands, dy, mask


@pytest.mark.parametrize("metric", ["l2", "l1", "contrib"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_fused_scores_over_the_masked_tokens(dtype, metric):
    (x, wg, wu, wd), _, mask = _case(dtype)
    x, wg, wu, wd = (t.detach() for t in (x, wg, wu, wd))
    x2 = x.reshape(-1, 33)
    fused = torch.ops.sat_kernels.triton_gate_up_scores(x2, wg, wu, wd, "silu", metric, False, mask.reshape(-1))[3]
    plain = sk.neuron_scores(x, wg, wu, wd, metric=metric, token_mask=mask)
    alone = sk.neuron_scores(x[mask], wg, wu, wd, metric=metric)
    tol = dict(rtol=2e-6, atol=0) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(fused, alone, **tol)
    unmasked = torch.ops.sat_kernels.triton_gate_up_scores(x2, wg, wu, wd, "silu", metric, False)[3]
    assert not torch.allclose(unmasked, fused, rtol=0.05)


@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_sat_mlp_keeps_what_the_torch_backend_keeps(dtype, forward):
    """The kept set of the masked scores is the torch backend's (and, in fp32, the unpadded tokens'); output and
    gradients those of the fp64 masked-dense reference at that set (within 2x plain PyTorch's error)."""
    operands, dy, mask = _case(dtype, seed=1)
    _, idx = sk.sat_mlp(*operands, 0.5, backend="triton", forward=forward, token_mask=mask, return_indices=True)
    _, idx_t = sk.sat_mlp(*operands, 0.5, backend="torch", forward=forward, token_mask=mask, return_indices=True)
    assert torch.equal(idx, idx_t)
    if dtype == torch.float32:
        _, idx_alone = sk.sat_mlp(operands[0][mask], *operands[1:], 0.5, backend="triton", return_indices=True)
        assert torch.equal(idx, idx_alone)
    assert_matches_reference(lambda *o: sk.sat_mlp(*o, 0.5, backend="triton", forward=forward, token_mask=mask),
                             operands, dy, idx, forward=forward)


def test_torch_compile_fullgraph_with_a_mask():
    operands, dy, mask = _case(torch.float32, seed=2)

    def fn(*o):
        return sk.sat_mlp(*o, 0.5, backend="triton", token_mask=mask)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(out_and_grads(compiled, operands, dy), out_and_grads(fn, operands, dy)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_op_with_a_mask_passes_opcheck():
    (x, wg, wu, wd), _, mask = _case(torch.float32, seed=3)
    x2 = x.detach().reshape(-1, 33)
    args = (x2, wg.detach(), wu.detach(), wd.detach(), "silu", "l2", True, mask.reshape(-1))
    torch.library.opcheck(torch.ops.sat_kernels.triton_gate_up_scores, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
