"""PEFT adapters and SAT modules in every order: eval and training are exact, or refused with a clear error."""
import pytest
import torch

import sat_kernels as sk
from sat_kernels.lora import peft_adapter
from sat_kernels.ops.reference import reference_sat_mlp

from helpers import tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _lora(model, targets, seed=1, **config):
    """LoRA with random A and B (``init_lora_weights=False``), so the adapters change the output from the start."""
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                            **config))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _loss_and_grads(model, ids):
    for p in model.parameters():
        p.grad = None
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _mask_mlps(model, rate):
    """Make every ``LlamaMLP`` compute the fp64 masked-dense SAT reference (top-k over its own activations)."""
    for mlp in model.modules():
        if type(mlp).__name__ == "LlamaMLP":
            mlp.forward = lambda x, m=mlp: reference_sat_mlp(x, m.gate_proj.weight, m.up_proj.weight,
                                                              m.down_proj.weight, rate)
    return model


def test_lora_on_the_mlp_added_after_patching_runs_in_eval_and_at_rate_zero():
    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).eval()
    model = _lora(sk.replace_mlp(tiny_model("llama"), 0.5), MLP).eval()
    assert isinstance(model.base_model.model.model.layers[0].mlp, sk.SATMLP)
    assert torch.equal(_logits(model, ids), _logits(ref, ids)), "eval() must run the adapters"
    assert not torch.equal(_logits(model, ids), _logits(tiny_model("llama"), ids))

    ref.train()
    model.train()
    sk.set_omission_rate(model, 0.0)
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and all("lora_" in n for n in grads)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name

    sk.set_omission_rate(model, 0.5)
    with pytest.raises(TypeError, match=r"SATMLP\.gate_proj is a PEFT LoRA layer \(peft\.tuners\.lora\.layer\."
                                        r"Linear\).*attention projections only"):
        model(ids, labels=ids)


def test_lora_on_the_mlp_then_replace_mlp_is_refused_at_patch_time():
    model = _lora(tiny_model("llama"), MLP)
    with pytest.raises(ValueError, match=r"replace_mlp: .*layers\.0\.mlp\.gate_proj is a PEFT LoRA layer"):
        sk.replace_mlp(model, 0.5)
    assert not any(isinstance(m, sk.SATMLP) for m in model.modules()), "a failed call must not patch"


def test_saved_adapter_loads_onto_a_patched_base(tmp_path):
    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).eval()
    ref.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(sk.replace_mlp(tiny_model("llama"), 0.5), tmp_path).eval()
    assert isinstance(model.base_model.model.model.layers[1].mlp, sk.SATMLP)
    assert torch.equal(_logits(model, ids), _logits(ref, ids)), "the MLP part of the adapter must be used"


def test_revert_keeps_the_adapters():
    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).eval()
    model = _lora(sk.replace_mlp(tiny_model("llama"), 0.5), MLP).eval()
    sk.revert(model)
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp).__name__ == "LlamaMLP" and peft_adapter(mlp.up_proj) == "PEFT LoRA"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


def test_lora_on_patched_attention_runs_in_eval_and_is_refused_in_sat_training():
    ids = _ids()
    ref = _lora(tiny_model("llama"), ATTENTION).eval()
    model = _lora(sk.replace_attention(tiny_model("llama"), 0.5), ATTENTION).eval()
    assert isinstance(model.base_model.model.model.layers[0].self_attn, sk.SATAttention)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))

    model.train()
    ref.train()
    with pytest.raises(TypeError, match=r"SATAttention\.q_proj is a PEFT LoRA layer.*attention=0\.0"):
        model(ids, labels=ids)
    sk.set_omission_rate(model, attention=0.0)
    assert torch.equal(_loss_and_grads(model, ids)[0], _loss_and_grads(ref, ids)[0])

    with pytest.raises(ValueError, match=r"replace_attention: .*self_attn\.q_proj is a PEFT LoRA layer.*leave the "
                                         r"attention unpatched"):
        sk.replace_attention(_lora(tiny_model("llama"), ATTENTION))


@pytest.mark.parametrize("order", ["lora-then-patch", "patch-then-lora"])
def test_lora_on_attention_with_sat_on_the_mlp(order):
    ids = _ids()
    ref = _lora(tiny_model("llama").double(), ATTENTION)
    if order == "lora-then-patch":
        model = sk.replace_mlp(_lora(tiny_model("llama").double(), ATTENTION), 0.5)
    else:
        model = _lora(sk.replace_mlp(tiny_model("llama").double(), 0.5), ATTENTION)
    model.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, sk.SATMLP) for m in model.modules()) == 2

    ref.eval()
    model.eval()
    assert torch.equal(_logits(model, ids), _logits(ref, ids)), "eval() is the PEFT model"

    model.train()
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(_mask_mlps(ref, 0.5).train(), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 16
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
