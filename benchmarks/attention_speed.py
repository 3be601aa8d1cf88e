"""Forward+backward time of SAT attention (torch backend) vs the dense Hugging Face attention module it wraps.

The dense provider is ``LlamaAttention`` itself in training mode (``attn_implementation`` ``"sdpa"`` by default, the
transformers default on CPU); SAT is :class:`sat_kernels.SATAttention` wrapping that very module. Both get the same
hidden states, RoPE tables from ``LlamaRotaryEmbedding`` and causal masking. Dense and SAT runs are interleaved (dense,
SAT, dense, SAT, ...) so both see the same machine state; the figure is the median of the per-pair ratios SAT/dense,
next to the FLOP limit of the in-step scheme::

    dense = 3 P + 3.5 C                      P: q/k/v/o projection FLOPs of the forward, C: causal attention forward
    SAT   = P_qkv + rho P_o + C + 2 (rho P_q + gamma P_kv + rho P_o) + 2.5 rho C      forward="sparse"
    SAT   = P_qkv + P_o + C + 2 (rho P_q + gamma P_kv + rho P_o) + 2.5 rho C          forward="dense"

``rho`` = kept query heads / H, ``gamma`` = kept KV groups / G (``unit="group"``: ``gamma = rho``; ``unit="head"``:
``gamma = 1``, the usual case with grouped-query attention, where most groups keep a head). The attention backward is
counted as 2.5 forwards (flash attention recomputes the scores).

    python benchmarks/attention_speed.py                               # SmolLM2-135M shapes, CPU, omission 0.5
    python benchmarks/attention_speed.py --rates 0.25 0.5 0.75 --units head group --seqs 256 512 1024
    python benchmarks/attention_speed.py --forward sparse dense --seqs 512 --threads 1    # exact-forward mode too
    python benchmarks/attention_speed.py --llama7b --device cuda --dtype bfloat16    # meant for a GPU

``--llama7b`` uses Llama-2-7B attention shapes (h 4096, 32 heads x 128, MHA, seq 2048/4096, batch 1); it is meant for a
GPU and has not been measured on one (on CPU the torch backend's attention core is the fused CPU kernel; elsewhere it
is the explicit matmul + softmax path).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import sat_kernels as sk
from baseline import load_baseline
from sat_kernels.bench.results import environment

SMOLLM2 = dict(hidden=576, heads=9, kv_heads=3, head_dim=64, batch=4, seqs=(256, 512, 1024))
LLAMA7B = dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, batch=1, seqs=(2048, 4096))


def _attention(hidden, heads, kv_heads, head_dim, impl, dtype, device, seed=0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      intermediate_size=4 * hidden, num_hidden_layers=1, max_position_embeddings=8192,
                      attn_implementation=impl)
    torch.manual_seed(seed)
    attn = LlamaAttention(cfg, layer_idx=0).to(device=device, dtype=dtype).train()
    return cfg, attn, LlamaRotaryEmbedding(cfg).to(device)


def flop_limit(hidden, heads, kv_heads, head_dim, batch, seq, kept_heads, kept_groups, forward="sparse"):
    tok = batch * seq
    p_q = p_o = 2 * tok * hidden * heads * head_dim
    p_kv = 2 * 2 * tok * hidden * kv_heads * head_dim
    core = 2 * batch * seq * seq * head_dim * heads            # causal: half of 4 B T^2 d H
    rho, gamma = kept_heads / heads, kept_groups / kv_heads
    dense = 3 * (p_q + p_kv + p_o) + 3.5 * core
    o_forward = p_o if forward == "dense" else rho * p_o
    sat = p_q + p_kv + o_forward + core + 2 * (rho * p_q + gamma * p_kv + rho * p_o) + 2.5 * rho * core
    return sat / dense


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(shape: dict, seq: int, rate: float, unit: str, repeats: int, impl="sdpa", dtype=torch.float32,
            device="cpu", forward="sparse", base=None):
    hidden, heads, kv_heads, head_dim, batch = (shape[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "batch"))
    cfg, attn, rotary = _attention(hidden, heads, kv_heads, head_dim, impl, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float32).to(device, dtype).requires_grad_()
    dy = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float32).to(device, dtype)
    pos = torch.arange(seq, device=device)[None]
    cos, sin = rotary(x, pos)
    mask = None
    if impl == "eager":   # eager attention takes the causal mask as an additive tensor, as the model builds it
        mask = torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)[None, None]
    holder = torch.nn.Module()
    holder.self_attn = attn
    sat = sk.replace_attention(holder, rate, unit=unit, forward=forward).self_attn   # wraps `attn`: same parameters
    arms = {"dense": attn, "sat": sat}
    if base is not None:   # the package at --baseline, wrapping the same module
        holder_b = torch.nn.Module()
        holder_b.self_attn = attn
        arms["base"] = base.replace_attention(holder_b, rate, unit=unit, forward=forward).self_attn
    params = list(attn.parameters())

    def step(module):
        for t in (x, *params):
            t.grad = None
        y, _ = module(x, position_embeddings=(cos, sin), attention_mask=mask)
        y.backward(dy)
        _sync(device)

    for module in (*arms.values(), *arms.values()):   # warm-up
        step(module)
    kept_heads = int((attn.q_proj.weight.grad.view(heads, -1).abs().sum(1) != 0).sum())
    kept_groups = int((attn.k_proj.weight.grad.view(kv_heads, -1).abs().sum(1) != 0).sum())
    times = {name: [] for name in arms}
    for r in range(repeats):   # the arms in turn, the order reversed every round
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t0 = time.perf_counter()
            step(arms[name])
            times[name].append(time.perf_counter() - t0)
    ratios = [s / d for s, d in zip(times["sat"], times["dense"])]
    extra = {}
    if base is not None:
        extra = {"base_ms": 1e3 * statistics.median(times["base"]),
                 "base_ratio": statistics.median(b / d for b, d in zip(times["base"], times["dense"]))}
    return {**extra,
        "B": batch, "T": seq, "h": hidden, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "omission_rate": rate, "unit": unit, "forward": forward, "impl": impl,
        "dtype": str(dtype).replace("torch.", ""),
        "kept_heads": kept_heads, "kept_groups": kept_groups,
        "dense_ms": 1e3 * statistics.median(times["dense"]), "sat_ms": 1e3 * statistics.median(times["sat"]),
        "ratio": statistics.median(ratios),
        "flop_limit": flop_limit(hidden, heads, kv_heads, head_dim, batch, seq, kept_heads, kept_groups, forward),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[0.5])
    p.add_argument("--units", nargs="+", default=["head"], choices=["head", "group"])
    p.add_argument("--forward", nargs="+", default=["sparse"], choices=["sparse", "dense"],
                   help="forward mode(s) of the SAT module (dense: exact output, sparse backward)")
    p.add_argument("--seqs", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--impl", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--llama7b", action="store_true", help="Llama-2-7B attention shapes (batch 1, T 2048/4096)")
    p.add_argument("--baseline", default=None, help="git revision whose SATAttention is timed in the same rounds")
    p.add_argument("--out", default=None, help="write the rows and the environment to this JSON file")
    args = p.parse_args(argv)
    base = load_baseline(args.baseline) if args.baseline else None
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(LLAMA7B if args.llama7b else SMOLLM2)
    if args.batch:
        shape["batch"] = args.batch
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    env = dict(environment(torch.device(args.device)), baseline=args.baseline, repeats=args.repeats)
    print(f"# {where}, bf16 ISA {env.get('cpu_bf16', '-')}, torch {torch.__version__}, git {env['git']}, "
          f"{args.dtype}, attn_implementation={args.impl}")
    print("| B | T | h | heads/kv | d | omission | unit | forward | kept heads/groups | dense ms | SAT ms | "
          "SAT/dense | FLOP limit | vs limit |" + (" base/dense |" if base else ""))
    print("|---" * (14 + (1 if base else 0)) + "|")
    rows = []
    for seq in args.seqs or shape["seqs"]:
        for rate in args.rates:
            for unit in args.units:
                for forward in args.forward:
                    r = measure(shape, seq, rate, unit, args.repeats, args.impl, dtype, args.device, forward, base)
                    rows.append(r)
                    print(f"| {r['B']} | {r['T']} | {r['h']} | {r['heads']}/{r['kv_heads']} | {r['head_dim']} | "
                          f"{rate:g} | {unit} | {forward} | {r['kept_heads']}/{r['kept_groups']} | "
                          f"{r['dense_ms']:.1f} | {r['sat_ms']:.1f} | {r['ratio']:.3f} | {r['flop_limit']:.3f} | "
                          f"{r['ratio'] / r['flop_limit']:.3f} |" + (f" {r['base_ratio']:.3f} |" if base else ""),
                          flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
