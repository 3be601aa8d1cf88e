"""Training-step benchmark: tokens/s of forward + backward + AdamW step of a random-weight Llama, dense vs SAT,
timed in alternating steps (dense, SAT, dense, ...).

The step time is split into MLP / attention / the rest so the Amdahl ceiling of MLP (and attention) omission is
visible. The split is measured by timing layer 0's MLP and attention modules forward+backward in isolation, at the
step's activation shape and in the same mode (dense or SAT), times the number of layers; "rest" is the step time
minus both (embeddings, norms, LM head, loss, optimizer).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

import sat_kernels as sk

from .timing import bench

CONFIGS = {
    # SmolLM2-135M (CPU default)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Llama-2-7B layer shapes with 4 layers (GPU default)
    "llama2-7b-4l": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=32),
}


def _model(config_name: str, seq: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=max(seq, 2048), **CONFIGS[config_name])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_ms(model, batch: int, seq: int, device, dtype, repeats: int) -> Dict[str, float]:
    """fwd+bwd time of one layer's MLP and attention at the step's shape, in the model's current mode."""
    layer = model.model.layers[0]
    h = model.config.hidden_size
    x = torch.randn(batch, seq, h, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    cos_sin = model.model.rotary_emb(x, pos)
    dy = torch.randn_like(x)

    def mlp():
        x.grad = None
        layer.mlp(x).backward(dy)

    def attn():
        x.grad = None
        layer.self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0].backward(dy)

    stats, _ = bench({"mlp": mlp, "attention": attn}, device, repeats)
    return {name: stats[name][0] for name in stats}


def run_train_step(config_name: str, *, batch: int, seq: int, steps: int, rate: float, dtype, device,
                   attention_rate: Optional[float] = None, repeats: int = 5, backend: str = "auto") -> List[Dict]:
    """Dense and SAT: ``steps`` timed optimizer steps each (after 2 warm-up steps), interleaved (dense, SAT, dense,
    SAT, ...) so both see the same machine state; one row per run, step time = median. ``backend``: the SAT MLP's
    (``replace_mlp(backend=...)``)."""
    runs = [("dense", None)] + ([("sat", rate)] if rate > 0 else [])
    models, optimizers, times = {}, {}, {}
    for name, run_rate in runs:
        model = _model(config_name, seq, dtype, device)
        if run_rate is not None:
            sk.replace_mlp(model, run_rate, backend=backend)
            if attention_rate:
                sk.replace_attention(model, attention_rate)
        models[name], times[name] = model, []
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, models["dense"].config.vocab_size, (batch, seq), generator=gen, device=device)
    for i in range(steps + 2):
        for name, _ in runs:
            model, opt = models[name], optimizers[name]
            _sync(device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    del optimizers
    rows = []
    for name, run_rate in runs:
        model = models.pop(name)
        step_ms = 1e3 * sorted(times[name])[len(times[name]) // 2]
        parts = _module_ms(model, batch, seq, device, dtype, repeats)
        layers = model.config.num_hidden_layers
        mlp_ms, attn_ms = parts["mlp"] * layers, parts["attention"] * layers
        rows.append({"config": config_name, "run": name, "backend": backend if name == "sat" else "dense",
                     "omission_rate": run_rate or 0.0,
                     "attention_omission_rate": (attention_rate or 0.0) if name == "sat" else 0.0,
                     "batch": batch, "seq": seq, "dtype": str(dtype).replace("torch.", ""),
                     "step_ms": step_ms, "tokens_per_s": batch * seq / (step_ms * 1e-3),
                     "mlp_ms": mlp_ms, "attention_ms": attn_ms, "rest_ms": max(0.0, step_ms - mlp_ms - attn_ms),
                     "mlp_share": mlp_ms / step_ms, "attention_share": attn_ms / step_ms, "interleaved": True})
        del model
    if len(rows) == 2:
        rows[1]["speedup"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        # Amdahl: the step speedup if the MLP part alone ran at the FLOP limit of SAT (docs/design.md section 5).
        rho = sk.num_kept(CONFIGS[config_name]["intermediate_size"], rate) / CONFIGS[config_name]["intermediate_size"]
        dense = rows[0]
        rows[1]["mlp_only_ceiling"] = dense["step_ms"] / (dense["step_ms"] - dense["mlp_ms"] * (1 - (4 + 14 * rho) / 18))
    return rows
