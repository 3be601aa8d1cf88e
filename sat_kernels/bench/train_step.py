"""Training-step benchmark: tokens/s of forward + backward + AdamW step of a random-weight Llama with the shapes of
one of ``CONFIGS``, dense vs SAT, timed in alternating steps (dense, SAT, dense, ...).

The step time is split into MLP / attention / the rest so the Amdahl ceiling of MLP omission is visible. Weights in
fp32 or bf16, optionally under ``torch.autocast`` (bf16 autocast on fp32 weights: how mixed-precision training
runs). The split is measured by timing layer 0's MLP and attention modules forward+backward in isolation, at the
step's activation shape and in the same mode (dense or SAT), times the number of layers; "rest" is the step time
minus both (embeddings, norms, LM head, loss, optimizer).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List, Optional

import torch

import sat_kernels as sk
from sat_kernels.selection import DEFAULT_FORWARD

from .timing import bench

CONFIGS = {
    # SmolLM2-135M (CPU default)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Gemma 3 270M's shapes and tanh-GELU MLP on a Llama (every layer causal over the whole sequence, where Gemma 3
    # attends within a 512-token window in 15 of its 18 layers; no embedding scale, RMSNorm without the +1)
    "gemma3-270m": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_act="gelu_pytorch_tanh",
                        tie_word_embeddings=True),
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


def _autocast(device, autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype)


def _module_ms(model, batch: int, seq: int, device, dtype, repeats: int, autocast_dtype=None) -> Dict[str, float]:
    """fwd+bwd time of one layer's MLP and attention at the step's shape, in the model's current mode."""
    layer = model.model.layers[0]
    h = model.config.hidden_size
    x = torch.randn(batch, seq, h, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    cos_sin = model.model.rotary_emb(x, pos)
    dy = torch.randn_like(x)

    def mlp():
        x.grad = None
        with _autocast(device, autocast_dtype):
            y = layer.mlp(x)
        y.backward(dy.to(y.dtype))

    def attn():
        x.grad = None
        with _autocast(device, autocast_dtype):
            y = layer.self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
        y.backward(dy.to(y.dtype))

    stats, _ = bench({"mlp": mlp, "attention": attn}, device, repeats)
    return {name: stats[name][0] for name in stats}


def ladder_fractions(rate: float) -> Dict[float, float]:
    """The share of the steps of :class:`sat_kernels.LadderOmissionScheduler` ``(initial_rate=rate)`` at each of its
    rates (rate 0 included), from its schedule over 10000 steps."""
    sched = sk.LadderOmissionScheduler(initial_rate=rate, total_steps=10000)
    counts: Dict[float, int] = {}
    for step in range(10000):
        r = sched.rate(step)
        counts[r] = counts.get(r, 0) + 1
    return {r: c / 10000 for r, c in counts.items()}


def mlp_limit(rho: float, forward: str, backward: str = "sparse", dense_fraction: float = 0.0) -> float:
    """SAT/dense FLOPs of the MLP (docs/design.md section 5); ``rho`` is the kept fraction, ``dense_fraction`` the
    share of tokens whose backward is dense with ``backward="dense_tokens"``."""
    if backward == "exact_input":
        return (12 + 6 * rho) / 18
    if backward == "dense_tokens":
        return (6 + 12 * rho + 12 * (1 - rho) * dense_fraction) / 18
    return (4 + 14 * rho) / 18 if forward == "sparse" else (6 + 12 * rho) / 18


def _time_steps(models, optimizers, ids, labels, steps, device, autocast_dtype, order):
    """``{run: [seconds]}``: ``steps`` optimizer steps per run after 2 warm-ups, the runs of ``order`` in turn (an
    entry is ``(run, model name, rate)``: the model is set to that rate first), the order reversed every step."""
    times = {run: [] for run, _, _ in order}
    for i in range(steps + 2):
        for run, name, rate in (order if i % 2 == 0 else order[::-1]):
            model, opt = models[name], optimizers[name]
            if rate is not None:
                sk.set_omission_rate(model, rate)
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(device, autocast_dtype):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times[run].append(time.perf_counter() - t0)
    return times


def run_train_step(config_name: str, *, batch: int, seq: int, steps: int, rate: float, dtype, device,
                   attention_rate: Optional[float] = None, repeats: int = 5, backend: str = "auto",
                   autocast_dtype=None, forward: str = DEFAULT_FORWARD, backward: str = "sparse",
                   ladder: bool = False, dense_fraction: float = 0.28) -> List[Dict]:
    """Dense and SAT (MLP omission ``rate``, with ``ladder`` also every rate of the default ladder from ``rate``):
    ``steps`` timed optimizer steps each after 2 warm-ups, interleaved so all see the same machine state; one row
    per run, step time = median. ``dtype``: the weights' dtype; ``autocast_dtype``: run the forward under
    ``torch.autocast`` with it (fp32 weights, e.g. bf16 autocast); ``backend``, ``forward``, ``backward``: the SAT
    MLP's. With ``backward="dense_tokens"`` the labels are -100 on the first ``1 - dense_fraction`` of each
    sequence, as on the prompt of an sft pair, so the last ``dense_fraction`` of the tokens take the dense backward.

    The SAT row at ``rate`` gets ``speedup`` (dense step / SAT step), ``mlp_only_ceiling`` (Amdahl: the speedup if
    the MLP share of the dense step ran at SAT's FLOP limit and the rest did not change) and ``of_ceiling``
    (``speedup / mlp_only_ceiling``); the ladder row gets the speedup of the schedule's mean step.
    """
    models = {name: _model(config_name, seq, dtype, device) for name in ("dense", "sat")}
    sk.replace_mlp(models["sat"], rate, backend=backend, forward=forward, backward=backward)
    if attention_rate:
        sk.replace_attention(models["sat"], attention_rate, forward=forward)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True) for name, m in models.items()}
    fractions = ladder_fractions(rate) if ladder else {}
    order = [("dense", "dense", None), ("sat", "sat", rate)]
    order += [(f"sat@{r:g}", "sat", r) for r in fractions if r != rate]
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, models["dense"].config.vocab_size, (batch, seq), generator=gen, device=device)
    labels = ids
    if backward == "dense_tokens":
        labels = ids.clone()
        labels[:, :seq - round(dense_fraction * seq)] = -100
    times = _time_steps(models, optimizers, ids, labels, steps, device, autocast_dtype, order)
    del optimizers
    median_ms = {run: 1e3 * statistics.median(t) for run, t in times.items()}
    inter, layers = CONFIGS[config_name]["intermediate_size"], CONFIGS[config_name]["num_hidden_layers"]
    common = {"config": config_name, "batch": batch, "seq": seq, "dtype": str(dtype).replace("torch.", ""),
              "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "none",
              "forward": forward, "backward": backward, "interleaved": True}
    if backward == "dense_tokens":
        common["dense_fraction"] = dense_fraction
    rows = []
    for name, run_rate in (("dense", 0.0), ("sat", rate)):
        model = models[name]
        if name == "sat":
            sk.set_omission_rate(model, rate)
        parts = _module_ms(model, batch, seq, device, dtype, repeats, autocast_dtype)
        step_ms = median_ms[name]
        mlp_ms, attn_ms = parts["mlp"] * layers, parts["attention"] * layers
        rows.append({**common, "run": name, "backend": backend if name == "sat" else "dense",
                     "omission_rate": run_rate, "attention_omission_rate": (attention_rate or 0.0) * (name == "sat"),
                     "step_ms": step_ms, "tokens_per_s": batch * seq / (step_ms * 1e-3), "mlp_ms": mlp_ms,
                     "attention_ms": attn_ms, "rest_ms": max(0.0, step_ms - mlp_ms - attn_ms),
                     "mlp_share": mlp_ms / step_ms, "attention_share": attn_ms / step_ms})
    dense, sat = rows
    sat["speedup"] = dense["step_ms"] / sat["step_ms"]
    limit = mlp_limit(sk.num_kept(inter, rate) / inter, forward, backward, dense_fraction)
    sat["mlp_only_ceiling"] = dense["step_ms"] / (dense["step_ms"] - dense["mlp_ms"] * (1 - limit))
    sat["of_ceiling"] = sat["speedup"] / sat["mlp_only_ceiling"]
    if ladder:
        mean_ms = sum(f * (median_ms["sat"] if r == rate else median_ms[f"sat@{r:g}"]) for r, f in fractions.items())
        rows.append({**common, "run": "sat-ladder", "backend": backend, "omission_rate": rate,
                     "attention_omission_rate": attention_rate or 0.0, "step_ms": mean_ms,
                     "tokens_per_s": batch * seq / (mean_ms * 1e-3), "speedup": dense["step_ms"] / mean_ms,
                     "ladder": {f"{r:g}": {"share": f, "step_ms": median_ms["sat"] if r == rate
                                           else median_ms[f"sat@{r:g}"]} for r, f in fractions.items()}})
    return rows
