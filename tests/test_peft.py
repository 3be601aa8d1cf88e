"""PEFT LoRA and SAT in every order: SAT on LoRA-adapted MLPs against a masked PEFT reference in fp64, eval equal to
PEFT's, save/load/merge/disable/multiple adapters as without SAT, refusals of what is not supported, TRL."""
import pytest
import torch
from torch import nn

import sat_kernels as sk
from sat_kernels.lora import peft_adapter
from sat_kernels.ops.reference import _masked_gradient
from sat_kernels.selection import activation_scores, select_neurons

from helpers import tiny_model, word_tokenizer

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

MLP = ["gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ORDERS = ["lora-then-patch", "patch-then-lora"]


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _config(targets, **config):
    """LoRA with random A and B (``init_lora_weights=False``), so the adapters change the output from the start."""
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **config})


def _lora(model, targets, seed=1, **config):
    torch.manual_seed(seed)
    return get_peft_model(model, _config(targets, **config))


def _sat_lora(order, targets, rate=0.5, fp64=True, family="llama", **config):
    base = tiny_model(family).double() if fp64 else tiny_model(family)
    if order == "lora-then-patch":
        return sk.replace_mlp(_lora(base, targets, **config), rate)
    return _lora(sk.replace_mlp(base, rate), targets, **config)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _loss_and_grads(model, ids, seed=3):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)   # the same dropout masks in the model and its reference
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _masked_forward(mlp, x, rate, forward, kept):
    """The SAT semantics written with the PEFT modules themselves: top-k (l2) of the adapted activations, the down
    projection (base and adapter, dropout included) over the kept neurons; ``forward="dense"``: value everywhere,
    gradient through the kept neurons (of the activations and the columns of W_down and A_down)."""
    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    inter = a.shape[-1]
    idx = select_neurons(activation_scores(a.detach().reshape(-1, inter), "l2"), sk.num_kept(inter, rate))
    kept.append(idx)
    mask = torch.zeros(inter, dtype=a.dtype)
    mask[idx] = 1
    if forward == "sparse":
        return mlp.down_proj(a * mask)
    down = mlp.down_proj
    names = [n for n, _ in down.named_parameters() if n.endswith("weight") and ("lora_A" in n or "lora" not in n)]
    masked = {n: _masked_gradient(down.get_parameter(n), mask) for n in names}
    return torch.func.functional_call(down, masked, (_masked_gradient(a, mask),))


def _mask_mlps(model, rate, forward="sparse"):
    """Make every ``LlamaMLP`` / ``Gemma3MLP`` of a (PEFT) model compute :func:`_masked_forward`; returns the list
    the kept sets go to, one per MLP call."""
    kept = []
    for mlp in model.modules():
        if type(mlp).__name__ in ("LlamaMLP", "Gemma3MLP"):
            mlp.forward = lambda x, m=mlp: _masked_forward(m, x, rate, forward, kept)
    return kept


def _assert_grads_close(grads, ref_grads):
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


CONFIGS = {"plain": {}, "dropout": {"lora_dropout": 0.25}, "rslora": {"use_rslora": True, "lora_alpha": 6}}


@pytest.mark.parametrize("family", ["llama", "gemma3"])   # SwiGLU; Gemma 3's tanh-GELU gate
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("order", ORDERS)
def test_sat_on_lora_mlps_matches_the_masked_peft_model(order, forward, config, family):
    ids = _ids()
    targets = MLP + ATTENTION
    ref = _lora(tiny_model(family).double(), targets, **CONFIGS[config])
    model = _sat_lora(order, targets, family=family, **CONFIGS[config])
    sk.replace_mlp(model, 0.5, forward=forward)
    model.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, sk.SATMLP) for m in model.modules()) == 2
    assert torch.equal(_logits(model.eval(), ids), _logits(ref.eval(), ids)), "eval() is the PEFT model"

    loss, grads = _loss_and_grads(model.train(), ids)
    kept = _mask_mlps(ref, 0.5, forward)
    ref_loss, ref_grads = _loss_and_grads(ref.train(), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert len(grads) == 2 * 2 * 7 and all("lora_" in n for n in grads)
    _assert_grads_close(grads, ref_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n), "frozen base: no gradient"
    for layer, idx in zip(model.base_model.model.model.layers, kept):
        omitted = torch.ones(136, dtype=torch.bool)
        omitted[idx] = False
        mlp = layer.mlp
        for proj in ("gate_proj", "up_proj"):
            b = getattr(mlp, proj).lora_B["default"].weight.grad
            assert (b[omitted] == 0).all() and (b[idx].abs().sum(1) > 0).all(), proj
        a = mlp.down_proj.lora_A["default"].weight.grad
        assert (a[:, omitted] == 0).all() and (a[:, idx].abs().sum(0) > 0).all()


@pytest.mark.parametrize("targets", [["gate_proj"], ["down_proj"], ["up_proj", "down_proj"]],
                         ids=lambda t: "+".join(p.split("_")[0] for p in t))
def test_lora_on_some_mlp_projections(targets):
    ids = _ids()
    ref = _lora(tiny_model("llama").double(), targets)
    model = _sat_lora("patch-then-lora", targets)
    model.load_state_dict(ref.state_dict())
    loss, grads = _loss_and_grads(model.train(), ids)
    _mask_mlps(ref, 0.5, "dense")   # replace_mlp's default forward
    ref_loss, ref_grads = _loss_and_grads(ref.train(), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert len(grads) == 2 * 2 * len(targets)
    _assert_grads_close(grads, ref_grads)
    layers = sk.sat_stats(model)["mlp"]["layers"]
    assert len(layers) == 2 and all(s["kept"] == 68 and s["units"] == 136 and 0 < s["kept_mass"] < 1
                                    for s in layers.values())


def test_rate_zero_training_is_the_peft_model():
    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).train()
    model = _sat_lora("patch-then-lora", MLP, rate=0.0, fp64=False).train()
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(g, ref_grads[n]) for n, g in grads.items())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("strategy", ["topk", "sample"])
def test_gradient_checkpointing_gives_the_same_gradients(strategy, reentrant):
    def grads(checkpoint):
        model = _sat_lora("patch-then-lora", MLP + ATTENTION, lora_dropout=0.25)
        sk.replace_mlp(model, 0.5, strategy=strategy)
        model.enable_input_require_grads()
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        return _loss_and_grads(model.train(), _ids())[1]

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


def test_merge_and_unload_gives_the_merged_peft_model():
    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).eval()
    model = _sat_lora("lora-then-patch", MLP, fp64=False).eval()
    merged, ref_merged = model.merge_and_unload(), ref.merge_and_unload()
    mlp = merged.model.layers[0].mlp
    assert isinstance(mlp, sk.SATMLP) and type(mlp.gate_proj) is nn.Linear
    assert type(mlp.dense_module.gate_proj) is nn.Linear
    torch.testing.assert_close(_logits(merged, ids), _logits(ref_merged, ids), rtol=0, atol=0)
    sk.replace_mlp(ref_merged, 0.5)   # the plain SAT path on the merged weights (grad mode on: the SAT forward)
    assert torch.equal(merged.train()(ids, labels=ids).loss, ref_merged.train()(ids, labels=ids).loss)


def test_saved_adapter_round_trips(tmp_path):
    from safetensors.torch import load_file

    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).eval()
    ref.save_pretrained(tmp_path / "ref")
    model = _sat_lora("patch-then-lora", MLP, fp64=False).eval()
    model.save_pretrained(tmp_path / "sat")
    saved, ref_saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("sat", "ref"))
    assert saved.keys() == ref_saved.keys() and all(torch.equal(saved[k], ref_saved[k]) for k in saved)

    for base in (tiny_model("llama"), sk.replace_mlp(tiny_model("llama"), 0.5)):
        loaded = PeftModel.from_pretrained(base, tmp_path / "sat").eval()
        assert torch.equal(_logits(loaded, ids), _logits(ref, ids)), "the MLP part of the adapter must be used"
    assert isinstance(loaded.base_model.model.model.layers[1].mlp, sk.SATMLP)
    assert torch.isfinite(loaded.train()(ids, labels=ids).loss)   # the SAT path (grad mode on) with the loaded adapter


def test_disable_adapter_runs_the_base_model():
    ids = _ids()
    model = _sat_lora("lora-then-patch", MLP, fp64=False)
    plain_sat = sk.replace_mlp(tiny_model("llama"), 0.5)
    with model.disable_adapter():
        assert torch.equal(_logits(model.eval(), ids), _logits(tiny_model("llama").eval(), ids))
        assert torch.equal(model.train()(ids, labels=ids).loss, plain_sat.train()(ids, labels=ids).loss)
    assert not torch.equal(_logits(model.eval(), ids), _logits(tiny_model("llama").eval(), ids))


def test_only_the_active_adapter_is_used():
    ids = _ids()
    ref = _lora(tiny_model("llama").double(), MLP)
    model = _sat_lora("patch-then-lora", MLP)
    for m in (ref, model):
        torch.manual_seed(2)
        m.add_adapter("second", _config(MLP))
    model.load_state_dict(ref.state_dict())
    for m in (ref, model):
        m.set_adapter("second")
    loss, grads = _loss_and_grads(model.train(), ids)
    _mask_mlps(ref, 0.5, "dense")   # replace_mlp's default forward
    ref_loss, ref_grads = _loss_and_grads(ref.train(), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads and all(".second." in n for n in grads)
    _assert_grads_close(grads, ref_grads)


def test_revert_keeps_the_adapters():
    ids = _ids()
    ref = _lora(tiny_model("llama"), MLP).eval()
    model = _sat_lora("patch-then-lora", MLP, fp64=False).eval()
    sk.revert(model)
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp).__name__ == "LlamaMLP" and peft_adapter(mlp.up_proj) == "PEFT LoRA"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


@pytest.mark.parametrize("option,match", [({"use_dora": True}, r"use_dora=True \(DoRA\)"),
                                          ({"lora_bias": True}, r"lora_bias=True")], ids=["dora", "lora_bias"])
def test_unsupported_lora_options_are_refused_in_both_orders(option, match):
    ids = _ids()
    with pytest.raises(ValueError, match=r"replace_mlp: .*layers\.0\.mlp\.gate_proj: SAT does not support PEFT "
                                         r"LoRA with " + match):
        sk.replace_mlp(_lora(tiny_model("llama"), MLP, **option))
    model = _lora(sk.replace_mlp(tiny_model("llama"), 0.5), MLP, **option)
    model.eval()(ids)   # eval runs PEFT's own forward
    with pytest.raises(ValueError, match=r"SATMLP\.gate_proj: SAT does not support PEFT LoRA with " + match):
        model.train()(ids)


def test_several_active_adapters_are_refused():
    model = _sat_lora("patch-then-lora", MLP, fp64=False)
    model.add_adapter("second", _config(MLP))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match=r"SATMLP\.gate_proj has 2 active LoRA adapters \['default', 'second'\]"):
        model.train()(_ids())


def test_other_peft_adapters_on_the_mlp_are_refused():
    from peft import IA3Config

    model = get_peft_model(sk.replace_mlp(tiny_model("llama"), 0.5),
                           IA3Config(target_modules=["up_proj"], feedforward_modules=["up_proj"]))
    with pytest.raises(TypeError, match=r"SATMLP\.up_proj is a PEFT ia3 layer \(peft\.tuners\.ia3.*use PEFT LoRA"):
        model.train()(_ids())


def test_lora_path_refuses_a_backend_without_it():
    model = _sat_lora("patch-then-lora", MLP, fp64=False)
    model.base_model.model.model.layers[0].mlp.backend = "cuda"
    with pytest.raises(ValueError, match=r"backend='cuda' has no LoRA path.*backend='auto' or 'torch'"):
        model.train()(_ids())


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


@pytest.mark.parametrize("order", ORDERS)
def test_lora_on_attention_with_sat_on_the_mlp(order):
    ids = _ids()
    ref = _lora(tiny_model("llama").double(), ATTENTION)
    model = _sat_lora(order, ATTENTION)
    model.load_state_dict(ref.state_dict())
    assert torch.equal(_logits(model.eval(), ids), _logits(ref.eval(), ids)), "eval() is the PEFT model"

    loss, grads = _loss_and_grads(model.train(), ids)
    _mask_mlps(ref, 0.5, "dense")   # replace_mlp's default forward
    ref_loss, ref_grads = _loss_and_grads(ref.train(), ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert len(grads) == 16
    _assert_grads_close(grads, ref_grads)


def test_trl_sft_trainer_with_peft_config_and_sat_callback(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(0, 92, (20,), generator=gen)) for _ in range(16)]
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=24,
                     dataset_text_field="text", seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=word_tokenizer(),
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=MLP + ATTENTION,
                                                task_type="CAUSAL_LM"),
                         callbacks=[sk.SATCallback(sk.LadderOmissionScheduler(0.5))])
    assert args.gradient_checkpointing, "TRL's default: SAT runs under gradient checkpointing here"
    trainer.train()
    peft_model = trainer.model
    mlp = peft_model.base_model.model.model.layers[0].mlp
    assert isinstance(mlp, sk.SATMLP) and peft_adapter(mlp.gate_proj) == "PEFT LoRA"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert [e["sat_omission_rate"] for e in logs][0] == 0.5
    for name, p in peft_model.base_model.model.named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), base[original]), f"frozen base weight {name} changed"
    b = mlp.gate_proj.lora_B["default"].weight
    assert b.abs().sum() > 0, "lora_B starts at zero and must have been trained"
