"""TRL's DPO and GRPO trainers with SAT on tiny random Llama models on CPU: the passes TRL runs in training mode
without gradients (DPO's reference log-probs with the adapter disabled, GRPO's rollouts with a KV cache and its old
log-probs) run the dense modules, and training runs with SAT."""
import warnings

import pytest
import torch

import sat_kernels as sk

from helpers import tiny_model, word_tokenizer

trl = pytest.importorskip("trl")
pytest.importorskip("peft")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

MLP = ["gate_proj", "up_proj", "down_proj"]


def _words(gen, n):
    return " ".join(f"w{int(t)}" for t in torch.randint(0, 92, (n,), generator=gen))


def _common(tmp_path, **overrides):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, **overrides)


def _dpo_trainer(tmp_path, model):
    from trl import DPOConfig, DPOTrainer

    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({key: [_words(gen, n) for _ in range(8)]
                              for key, n in (("prompt", 6), ("chosen", 5), ("rejected", 5))})
    args = DPOConfig(**_common(tmp_path, max_steps=2, max_length=20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=MLP, task_type="CAUSAL_LM"),
                          callbacks=[sk.SATCallback(sk.ConstantOmissionScheduler(0.5))]
                          if any(True for _ in sk.sat_modules(model)) else [])


def test_dpo_reference_log_probs_are_the_unpatched_models(tmp_path):
    """A LoRA policy on a SAT model (``forward="sparse"``): DPO's reference pass (adapter disabled, training mode,
    ``no_grad``) gives the log-probs of the unpatched model, not of the sparse network; training then runs SAT."""
    trainer = _dpo_trainer(tmp_path / "sat", sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse"))
    plain = _dpo_trainer(tmp_path / "plain", tiny_model("llama"))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    plain.model.train()
    ref = trainer.compute_ref_log_probs(trainer.model, batch)
    want = plain.compute_ref_log_probs(plain.model, batch)
    for got, expected in zip(ref, want):
        assert torch.equal(got, expected)
    assert sk.sat_stats(trainer.model)["mlp"]["layers"] == {}, "the reference pass selects nothing"

    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert logs[0]["sat_omission_rate"] == 0.5 and logs[0]["sat_mlp_kept_min"] == sk.num_kept(136, 0.5)


def _reward_length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def test_grpo_with_sat_attention_and_mlp_trains(tmp_path):
    """GRPO generates its rollouts with ``model.generate`` in training mode under ``no_grad`` (a KV cache through
    SAT attention) and computes old log-probs the same way (``steps_per_generation=2``); the policy steps run SAT."""
    from trl import GRPOConfig, GRPOTrainer

    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"prompt": [_words(gen, 4) for _ in range(8)]})
    model = sk.replace_attention(sk.replace_mlp(tiny_model("llama"), 0.5), 0.5)
    args = GRPOConfig(**_common(tmp_path, max_steps=2, num_generations=2, max_completion_length=6,
                                steps_per_generation=2))
    cb = sk.SATCallback(mlp=sk.ConstantOmissionScheduler(0.5), attention=sk.ConstantOmissionScheduler(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=_reward_length, args=args, train_dataset=data,
                              processing_class=word_tokenizer(), callbacks=[cb])
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert logs[-1]["sat_mlp_kept_min"] == sk.num_kept(136, 0.5) and logs[-1]["sat_attn_kept_min"] == 2
    assert all(isinstance(m, (sk.SATMLP, sk.SATAttention)) for _, m in sk.sat_modules(trainer.model))
