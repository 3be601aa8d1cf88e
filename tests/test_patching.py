"""replace_mlp / set_omission_rate / revert / patch_summary on tiny random Hugging Face models (no downloads)."""
import logging

import pytest
import torch
from torch import nn

import sat_kernels as sk

from helpers import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3"]


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keeps_parameters_and_eval_is_exact(family):
    model = tiny_model(family).eval()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    originals = [layer.mlp for layer in model.model.layers]

    assert sk.replace_mlp(model, 0.5, forward="sparse") is model
    assert all(isinstance(layer.mlp, sk.SATMLP) for layer in model.model.layers)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense), "eval() must be exactly the dense model"

    model.train()
    sparse = model(ids).logits.detach()
    assert not torch.allclose(sparse, dense), "training mode must omit neurons"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense), "a training-mode forward without grad is the dense model"

    sk.revert(model)
    assert [layer.mlp for layer in model.model.layers] == originals
    assert all(layer.mlp.training for layer in model.model.layers)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_expected_activation_detected():
    llama, gemma = sk.replace_mlp(tiny_model("llama"), 0.5), sk.replace_mlp(tiny_model("gemma"), 0.5)
    assert llama.model.layers[0].mlp.act == "silu"
    assert gemma.model.layers[0].mlp.act == "gelu_tanh"


def test_training_forward_equals_functional_op():
    model = tiny_model("llama").train()
    sk.replace_mlp(model, 0.5, strategy="topk", forward="sparse")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 48)
    y = mlp(x)
    ref = sk.sat_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, 0.5)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_set_omission_rate_and_repatch():
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    sk.set_omission_rate(model, 0.25)
    assert all(m.omission_rate == 0.25 for m in model.modules() if isinstance(m, sk.SATMLP))
    sk.replace_mlp(model, 0.75, strategy="random")
    mlps = [m for m in model.modules() if isinstance(m, sk.SATMLP)]
    assert len(mlps) == 2 and all(m.omission_rate == 0.75 and m.strategy == "random" for m in mlps)
    sk.set_omission_rate(model, 0.0)
    model.train()
    ids = _ids()
    with torch.no_grad():
        at_zero = model(ids).logits
    sk.revert(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, at_zero), "rate 0 in training mode is the dense model"


def test_omitted_neurons_get_zero_grad_in_the_model():
    model = sk.replace_mlp(tiny_model("llama"), 0.75).train()
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    k = sk.num_kept(136, 0.75)
    for layer in model.model.layers:
        g, u, d = (getattr(layer.mlp, n).weight.grad for n in ("gate_proj", "up_proj", "down_proj"))
        kept = g.abs().sum(1) != 0
        assert int(kept.sum()) == k
        assert torch.equal(kept, u.abs().sum(1) != 0) and torch.equal(kept, d.abs().sum(0) != 0)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("strategy", ["topk", "sample", "random"])
@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_gradient_checkpointing_gives_the_same_gradients(strategy, reentrant, forward):
    def grads(checkpoint):
        model = sk.replace_mlp(tiny_model("llama"), 0.5, strategy=strategy, forward=forward).train()
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids = _ids()
        torch.manual_seed(11)
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


def test_dense_forward_model_has_the_dense_loss_and_sparse_mlp_gradients():
    model = tiny_model("llama").eval()
    ids = _ids()
    with torch.no_grad():
        dense_loss = model(ids, labels=ids).loss
    sk.replace_mlp(model, 0.5, forward="dense").train()
    assert all(layer.mlp.forward_mode == "dense" for layer in model.model.layers)
    assert "forward='dense'" in repr(model.model.layers[0].mlp)
    loss = model(ids, labels=ids).loss
    torch.testing.assert_close(loss.detach(), dense_loss, rtol=1e-6, atol=0)
    loss.backward()
    k = sk.num_kept(136, 0.5)
    for layer in model.model.layers:
        rows = (layer.mlp.gate_proj.weight.grad != 0).any(1)
        assert int(rows.sum()) == k
        assert torch.equal(rows, (layer.mlp.up_proj.weight.grad != 0).any(1))
        assert torch.equal(rows, (layer.mlp.down_proj.weight.grad != 0).any(0))
    sk.replace_mlp(model, 0.5, forward="sparse")
    assert all(layer.mlp.forward_mode == "sparse" for layer in model.model.layers)
    assert not torch.allclose(model(ids, labels=ids).loss.detach(), dense_loss)
    with pytest.raises(ValueError, match="forward must be one of"):
        sk.replace_mlp(model, 0.5, forward="exact")
    assert sk.replace_mlp(tiny_model("llama"), 0.5).model.layers[0].mlp.forward_mode == "dense", "the default"
    assert sk.replace_attention(tiny_model("llama"), 0.5).model.layers[0].self_attn.forward_mode == "dense"


def test_unsupported_models_get_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="has no SwiGLU MLP.*gate_proj"):
        sk.replace_mlp(gpt2)
    with pytest.raises(ValueError, match="has a bias"):
        sk.replace_mlp(tiny_model("llama", mlp_bias=True))
    with pytest.raises(ValueError, match="neither SiLU nor tanh-GELU"):
        sk.replace_mlp(tiny_model("llama", hidden_act="relu"))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sk.replace_mlp("llama")
    with pytest.raises(ValueError, match="no SAT modules"):
        sk.set_omission_rate(tiny_model("llama"), 0.5)
    with pytest.raises(ValueError, match="model is itself an MLP"):
        sk.replace_mlp(tiny_model("llama").model.layers[0].mlp)


@pytest.mark.parametrize("kw,exc,match", [({"omission_rate": 1.0}, ValueError, "omission_rate"),
                                          ({"metric": "max"}, ValueError, "metric"),
                                          ({"strategy": "greedy"}, ValueError, "strategy"),
                                          ({"backend": "triton"}, ValueError, "not available")])
def test_replace_mlp_bad_arguments(kw, exc, match):
    model = tiny_model("llama")
    with pytest.raises(exc, match=match):
        sk.replace_mlp(model, **kw)
    assert not any(isinstance(m, sk.SATMLP) for m in model.modules()), "a failed call must not patch"


def test_adapter_added_after_patching_is_refused():
    model = sk.replace_mlp(tiny_model("llama"), 0.5).train()

    class Adapter(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    model.model.layers[0].mlp.up_proj = Adapter(model.model.layers[0].mlp.up_proj)
    with pytest.raises(TypeError, match=r"up_proj must be an nn.Linear \(exactly torch.nn.Linear\), got .*Adapter"):
        model(_ids())


def _hf_model(config_name, **kwargs):
    import transformers

    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=96, hidden_size=48, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=24, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def test_gemma3n_activation_sparsity_is_refused():
    model = _hf_model("Gemma3nTextConfig", activation_sparsity_pattern=[0.95, 0.0], hidden_size_per_layer_input=8,
                      vocab_size_per_layer_input=96, laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=0,
                      layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(Gemma3nTextMLP\) does not compute "
                                         r"down_proj\(act_fn\(gate_proj\(x\)\) \* up_proj\(x\)\): in eval mode"):
        sk.replace_mlp(model)
    assert not any(isinstance(m, sk.SATMLP) for m in model.modules()), "a failed call must not patch"
    model.model.layers[0].mlp.activation_sparsity = 0.0
    sk.replace_mlp(model)
    assert all(isinstance(layer.mlp, sk.SATMLP) for layer in model.model.layers)


def test_falcon_h1_mlp_multipliers_are_refused():
    model = _hf_model("FalconH1Config", mlp_multipliers=[0.5, 2.0], mamba_d_ssm=48, mamba_n_heads=4,
                      mamba_d_head=12, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.feed_forward \(FalconH1MLP\) does not compute"):
        sk.replace_mlp(model)
    for layer in model.model.layers:
        layer.feed_forward.gate_multiplier = layer.feed_forward.down_multiplier = 1.0
    sk.replace_mlp(model)


def test_seed_oss_residual_dropout_is_refused_and_eval_reaches_the_wrapped_module():
    model = _hf_model("SeedOssConfig", residual_dropout=0.1, attention_dropout=0.0).train()
    with pytest.raises(ValueError, match=r"\(SeedOssMLP\) does not compute .* in training mode its forward differs"
                                         r".*residual_dropout=0\.1 looks like a dropout: set it to 0"):
        sk.replace_mlp(model)
    rng = torch.get_rng_state()
    for layer in model.model.layers:
        layer.mlp.residual_dropout = 0.0
    sk.replace_mlp(model)
    assert torch.equal(torch.get_rng_state(), rng), "the probe must not move the global RNG"
    mlp = model.model.layers[0].mlp
    assert mlp.training and mlp.dense_module.training
    model.eval()
    assert not mlp.dense_module.training, "eval() must reach the wrapped module"
    model.train()
    assert mlp.dense_module.training


class _Wrapper(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


class _MLP(nn.Module):
    def __init__(self, h=16, inter=40):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _ClampedMLP(_MLP):
    def forward(self, x):
        return self.down_proj((self.act_fn(self.gate_proj(x)) * self.up_proj(x)).clamp(-0.1, 0.1))


class _ScaledMLP(_MLP):
    def forward(self, x):
        return 2 * super().forward(x)


class _DropoutMLP(_MLP):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(super().forward(x))


@pytest.mark.parametrize("cls,match", [(_ClampedMLP, r"mlp \(_ClampedMLP\) does not compute .* in eval mode"),
                                       (_ScaledMLP, r"mlp \(_ScaledMLP\) does not compute .* in eval mode"),
                                       (_DropoutMLP, r"mlp \(_DropoutMLP\) has dropout \['dropout'\]")],
                         ids=["clamped", "scaled", "dropout"])
def test_mlps_computing_something_else_are_refused(cls, match):
    with pytest.raises(ValueError, match=match):
        sk.replace_mlp(_Wrapper(cls()))
    sk.replace_mlp(_Wrapper(_MLP()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_probe_accepts_low_precision_and_skips_meta_weights(dtype):
    sk.replace_mlp(tiny_model("llama").to(dtype))
    with torch.device("meta"):
        model = _Wrapper(_ScaledMLP())
    sk.replace_mlp(model)   # nothing to evaluate before the weights are loaded
    assert isinstance(model.mlp, sk.SATMLP)


def _moe_model(config_name, **kwargs):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=96, hidden_size=48, intermediate_size=96,
                                                moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def test_summary_of_a_fully_patched_model_is_logged_as_info(caplog):
    model = tiny_model("llama")
    before = sk.patch_summary(model)["mlp"]
    assert before.num_layers == 2 and not before.complete and before.skipped == {
        "LlamaMLP": "not patched: replace_mlp was not called or was reverted"}
    with caplog.at_level(logging.INFO, logger="sat_kernels"):
        sk.replace_attention(sk.replace_mlp(model))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "replace_mlp: SAT MLP in 2 of 2 layers (LlamaMLP), 2 SAT MLP modules in all"),
        (logging.INFO, "replace_attention: SAT attention in 2 of 2 layers (LlamaAttention), 2 SAT attention modules "
                       "in all")]
    summary = sk.patch_summary(model)
    assert summary["mlp"].complete and summary["attention"].complete
    assert summary["mlp"].patched_layers == summary["mlp"].sat_modules == ("model.layers.0.mlp", "model.layers.1.mlp")
    sk.revert(model)
    assert sk.patch_summary(model)["attention"].unpatched_layers == {"model.layers.0.self_attn": "LlamaAttention",
                                                                     "model.layers.1.self_attn": "LlamaAttention"}


def test_qwen2_moe_only_shared_experts_are_patched_with_a_warning(caplog):
    model = _moe_model("Qwen2MoeConfig", shared_expert_intermediate_size=64)
    with caplog.at_level(logging.INFO, logger="sat_kernels"):
        sk.replace_mlp(model)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "replace_mlp: SAT MLP in 0 of 2 layers, 2 SAT MLP modules in all; partly patched: 2 layers of "
        "Qwen2MoeSparseMoeBlock (mixture of experts: shared_expert patched; ")
    assert "experts (Qwen2MoeExperts)" in record.getMessage()
    summary = sk.patch_summary(model)["mlp"]
    assert not summary.complete and summary.patched_layers == ()
    assert summary.partial_layers == {f"model.layers.{i}.mlp": "Qwen2MoeSparseMoeBlock" for i in range(2)}
    assert summary.sat_modules == ("model.layers.0.mlp.shared_expert", "model.layers.1.mlp.shared_expert")
    assert "not a supported attention class" in sk.patch_summary(model)["attention"].skipped["Qwen2MoeAttention"]


def test_qwen3_moe_dense_layers_only_with_a_warning_and_pure_moe_refused(caplog):
    model = _moe_model("Qwen3MoeConfig", head_dim=12, mlp_only_layers=[1])
    with caplog.at_level(logging.INFO, logger="sat_kernels"):
        sk.replace_mlp(model)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == (
        "replace_mlp: SAT MLP in 1 of 2 layers (Qwen3MoeMLP), 1 SAT MLP module in all; not patched: 1 layer of "
        "Qwen3MoeSparseMoeBlock (mixture of experts: its routed experts (Qwen3MoeExperts) are not supported)")
    summary = sk.patch_summary(model)["mlp"]
    assert summary.patched_layers == ("model.layers.1.mlp",)
    assert summary.unpatched_layers == {"model.layers.0.mlp": "Qwen3MoeSparseMoeBlock"}

    with pytest.raises(ValueError, match=r"has no SwiGLU MLP .*Qwen3MoeSparseMoeBlock: mixture of experts: its routed "
                                         r"experts \(Qwen3MoeExperts\) are not supported"):
        sk.replace_mlp(_moe_model("Qwen3MoeConfig", head_dim=12))


def test_sat_modules_is_public():
    model = tiny_model("llama")
    assert "sat_modules" in sk.__all__ and list(sk.sat_modules(model)) == []
    sk.replace_attention(sk.replace_mlp(model, 0.5), 0.25)
    mlps = [(f"model.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(model.model.layers)]
    attns = [(f"model.layers.{i}.self_attn", layer.self_attn) for i, layer in enumerate(model.model.layers)]
    assert list(sk.sat_modules(model, "mlp")) == mlps and list(sk.sat_modules(model, "attention")) == attns
    assert dict(sk.sat_modules(model)) == dict(mlps + attns)
    assert [m.omission_rate for _, m in sk.sat_modules(model, "attention")] == [0.25, 0.25]
    with pytest.raises(ValueError, match="sat_modules: kind must be None, 'mlp' or 'attention', got 'heads'"):
        list(sk.sat_modules(model, "heads"))
    sk.revert(model)
    assert list(sk.sat_modules(model)) == []
