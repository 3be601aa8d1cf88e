"""Liger-Kernel's kernels with SAT, run on CPU in the Triton interpreter: a training step of a tiny Llama with Liger's
RoPE and fused linear cross-entropy and SAT's MLP (and attention) equals the same SAT step without Liger.

Not collected by ``pytest tests`` (the file name does not start with ``test_``): ``tests/test_liger.py`` runs it in a
subprocess with ``TRITON_INTERPRET=1``, which triton reads when it is first imported. Run it alone with
``TRITON_INTERPRET=1 python -m pytest -q tests/liger_interpreter_cases.py``. Liger's RMSNorm kernel fails in the
interpreter (liger-kernel 0.8.5, triton 3.9: ``'float' object has no attribute 'to'``), so it is left out here; it
does not touch the MLP or attention that SAT replaces.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported: run through tests/test_liger.py",
                allow_module_level=True)

liger = pytest.importorskip("liger_kernel.transformers")

import sat_kernels as sk  # noqa: E402

from helpers import tiny_model  # noqa: E402

LIGER = dict(swiglu=False, rms_norm=False, rope=True, fused_linear_cross_entropy=True)


@pytest.fixture(autouse=True)
def restore_llama(monkeypatch):
    """apply_liger_kernel_to_llama also rebinds names of transformers' Llama module: put them back afterwards."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)


def _patcher(kinds):
    def patch(model):
        sk.replace_mlp(model, 0.5, forward="sparse")
        if "attention" in kinds:
            sk.replace_attention(model, 0.5, forward="sparse")
        return model.train()
    return patch


def _step(model, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kinds", ["mlp", "mlp+attention"])
@pytest.mark.parametrize("order", ["liger after patching", "liger before patching"])
def test_liger_rope_and_fused_cross_entropy_with_sat(order, kinds):
    """With SAT attention its training forward applies RoPE itself; with dense attention Liger's RoPE runs."""
    from transformers.models.llama import modeling_llama

    patch = _patcher(kinds)
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _step(patch(tiny_model("llama")), ids)
    model = tiny_model("llama")
    if order == "liger before patching":
        liger.apply_liger_kernel_to_llama(model=model, **LIGER)
        patch(model)
    else:
        liger.apply_liger_kernel_to_llama(model=patch(model), **LIGER)
    assert "liger_kernel" in model.forward.__func__.__module__, "Liger's fused linear cross-entropy forward"
    assert "liger_kernel" in modeling_llama.apply_rotary_pos_emb.__module__, "Liger's RoPE"
    assert sk.patch_summary(model)["mlp"].complete
    loss, grads = _step(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    stats = sk.sat_stats(model)
    assert stats["mlp"]["summary"]["kept_min"] == sk.num_kept(136, 0.5)
    assert stats.get("attention", {"summary": {"kept_min": 2}})["summary"]["kept_min"] == 2
