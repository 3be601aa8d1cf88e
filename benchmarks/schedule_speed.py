"""Training-step time of a real model at each MLP omission rate, dense and SAT interleaved, and the speedup of whole
omission schedules computed from it.

SAT's step time depends on the shapes and the omission rate, not on the weights' values, so one interleaved
measurement per rate (``sat_kernels.train.step_times.interleaved_step_times``: dense and SAT training steps with AdamW
on the first batch of ``sat-train``'s order, in alternating rounds) gives the speed of any schedule over those rates:
``steps x t_dense / sum over steps of t_SAT(rate)``. Used for the speed column of the README's quality runs, whose own
tokens/s came from runs that shared the machine.

    python benchmarks/schedule_speed.py --threads 1 --json benchmarks/results/schedule_speed_1thread.json
    python benchmarks/schedule_speed.py --tasks cpt --batch-size 4 --seq-len 128 --threads 2
    python benchmarks/schedule_speed.py --forward dense --starts 0.5 0.75 --attn-starts 0.5 --threads 1
    python benchmarks/schedule_speed.py --tasks sft --lora-rank 16 --threads 1 --clock cpu   # LoRA fine-tuning steps
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

import sat_kernels as sk
from sat_kernels.bench.results import environment
from sat_kernels.selection import DEFAULT_FORWARD, FORWARD_MODES, STRATEGIES
from sat_kernels.train.compare import write_json
from sat_kernels.train.data import default_corpus, tokenize, training_order
from sat_kernels.train.model import load_model, load_tokenizer
from sat_kernels.train.runner import LoRASettings, TrainConfig
from sat_kernels.train.step_times import interleaved_step_times

# (batch, seq_len) of the README's 300-step quality runs
SHAPES = {"cpt": (2, 128), "sft": (4, 256)}
LADDER_STARTS = (0.5, 0.375, 0.25, 0.125)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["cpt", "sft"], choices=["cpt", "sft"])
    p.add_argument("--batch-size", type=int, default=None, help="default: the quality runs' (cpt 2, sft 4)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the quality runs' (cpt 128, sft 256)")
    p.add_argument("--steps", type=int, default=300, help="schedule length (default 300)")
    p.add_argument("--starts", type=float, nargs="+", default=list(LADDER_STARTS),
                   help="initial rates of the default ladder (2 rungs, last 10%% dense) to evaluate")
    p.add_argument("--attn-starts", type=float, nargs="+", default=None,
                   help="also omit attention heads: the attention ladder's initial rate for each of --starts (one "
                        "value for all, or one per start)")
    p.add_argument("--forward", choices=FORWARD_MODES, default=DEFAULT_FORWARD,
                   help="SAT forward mode of the MLP and attention (default: dense, as sat-train)")
    p.add_argument("--model", default=None, help="sat-train --model (default: smollm2-135m)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA fine-tuning steps: both models get the same PEFT adapters of this rank (alpha 2 x rank, "
                        "no dropout) on every linear layer of the decoder, AdamW over the adapters (sat-train "
                        "--lora-rank); default: full fine-tuning")
    p.add_argument("--strategy", choices=STRATEGIES, default="topk", help="neuron selection (default: topk)")
    p.add_argument("--skip-omitted-updates", action="store_true",
                   help="SAT steps skip the optimizer update of omitted units (sat-train --skip-omitted-updates)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: process CPU time (needs --threads 1), robust to other processes "
                        "on the machine (default: wall)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    attn_starts = args.attn_starts or [None]
    if len(attn_starts) not in (1, len(args.starts)):
        p.error(f"--attn-starts: give one value or one per --starts ({len(args.starts)}), got {len(attn_starts)}")
    attn_starts = attn_starts * len(args.starts) if len(attn_starts) == 1 else attn_starts
    if args.lora_rank is not None and args.lora_rank < 1:
        p.error(f"--lora-rank: expected a positive integer, got {args.lora_rank}")
    lora = LoRASettings(rank=args.lora_rank) if args.lora_rank is not None else None
    tokenizer, pristine = load_tokenizer(args.model), load_model(args.model)
    model_name = args.model or "smollm2-135m"
    env = environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    schedules = {}
    for start, attn_start in zip(args.starts, attn_starts):
        mlp = sk.LadderOmissionScheduler(start, total_steps=args.steps)
        attn = sk.LadderOmissionScheduler(attn_start, total_steps=args.steps) if attn_start is not None else None
        name = f"ladder from {start:g}" + (f", attention from {attn_start:g}" if attn is not None else "")
        schedules[name] = [(mlp.rate(s), attn.rate(s) if attn is not None else None) for s in range(args.steps)]
    rates = sorted({r for rs in schedules.values() for r in rs}, key=lambda r: (-r[0], -(r[1] or 0.0)))
    label = lambda r: f"SAT {r[0]:g}" + (f" / attention {r[1]:g}" if r[1] is not None else "")  # noqa: E731
    adapters = f", LoRA r {lora.rank} alpha {lora.alpha:g} on {' '.join(lora.targets)}" if lora is not None else ""
    print(f"# interleaved training-step times, {model_name}{adapters}, {env['device']}, torch {env['torch']}, fp32, "
          f"forward={args.forward}, strategy={args.strategy}{', lazy updates' if args.skip_omitted_updates else ''}, "
          f"{args.clock} clock, "
          f"median of {args.repeats} rounds")
    results = []
    for task in args.tasks:
        batch, seq = SHAPES[task]
        batch, seq = args.batch_size or batch, args.seq_len or seq
        cfg = TrainConfig(task=task, steps=args.steps, seq_len=seq, batch_size=batch, precision="fp32",
                          forward=args.forward, attn_omission_rate=0.5 if args.attn_starts else None, lora=lora,
                          skip_omitted_updates=args.skip_omitted_updates, strategy=args.strategy)
        train, _ = tokenize(default_corpus(task), tokenizer, seq)
        first = training_order(train, batch, cfg.seed)
        st = interleaved_step_times(pristine, first, cfg, pad_id=tokenizer.pad_token_id,
                                    schedule=rates, repeats=args.repeats, clock=args.clock)
        ms = st["step_ms"]
        row = {"task": task, "batch": batch, "seq_len": seq, "batch_tokens": st["batch_tokens"], "step_ms": ms,
               "step_ms_p20_p80": st["step_ms_p20_p80"],
               "control_dense_over_sat_rate0": st["control_dense_over_sat_rate0"], "schedules": {}}
        print(f"\n{task}: batch {batch} x <= {seq} tokens ({st['batch_tokens']} tokens in the first batch)")
        print("| variant | step ms | dense / variant |")
        print("|---|---|---|")
        for name in ["dense"] + [label(r) for r in rates]:
            print(f"| {name} | {ms[name]:.0f} | {ms['dense'] / ms[name]:.3f}x |")
        print("| schedule | mean omission | speedup |")
        print("|---|---|---|")
        for name, rs in schedules.items():
            speedup = len(rs) * ms["dense"] / sum(ms[label(r)] for r in rs)
            mean = sum(r[0] for r in rs) / len(rs)
            row["schedules"][name] = {"mean_omission": mean, "speedup": speedup}
            print(f"| {name} | {mean:.3f} | {speedup:.3f}x |", flush=True)
        results.append(row)
    if args.json:
        write_json({"environment": env, "config": vars(args), "lora": asdict(lora) if lora is not None else None,
                    "rows": results}, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
