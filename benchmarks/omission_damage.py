"""How much SAT's sparse training-mode forward raises the loss of a pretrained model before any update, per selection
metric, strategy and omission rate (MLP neurons, or attention heads with ``--unit attention``).

SAT trains the model it runs: the loss it differentiates is that of the sparse forward. The first-step gap between
that loss and the dense loss, on the very batches ``sat-train`` starts with (same corpus, tokenizer, seed and order),
is a cheap, deterministic way to compare metrics and strategies on a model without training it; the training runs
(``sat-train --compare``) are the evidence on quality.

    python benchmarks/omission_damage.py                        # SmolLM2-135M-Instruct, cpt and sft, MLP
    python benchmarks/omission_damage.py --unit attention --rates 0.25 0.5
    python benchmarks/omission_damage.py --json benchmarks/results/omission_damage_mlp.json
"""
from __future__ import annotations

import argparse
import copy

import torch

import sat_kernels as sk
from sat_kernels.bench.results import environment
from sat_kernels.train.compare import write_json
from sat_kernels.selection import METRICS, STRATEGIES
from sat_kernels.train.data import collate, default_corpus, load_corpus, tokenize, training_order
from sat_kernels.train.model import load_model, load_tokenizer

SEQ_LEN = {"cpt": 128, "sft": 256}   # the lengths of the 300-step quality runs in the README


def mean_loss(model, batches) -> float:
    """Mean of the per-batch losses (the Trainer's loss: mean over labelled tokens of each batch). Grad mode stays on:
    a SAT module in training mode runs its dense module when grad mode is off (no backward to accelerate)."""
    return sum(model(**b).loss.detach().item() for b in batches) / len(batches)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="as sat-train --data (default: the stdlib-docstring corpus)")
    p.add_argument("--tasks", nargs="+", default=["cpt", "sft"], choices=["cpt", "sft"])
    p.add_argument("--unit", default="mlp", choices=["mlp", "attention"])
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--rates", type=float, nargs="+", default=[0.125, 0.25, 0.375, 0.5])
    p.add_argument("--batches", type=int, default=8, help="first batches of the training order (default 8)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows and the environment to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model)
    env = environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    patch = sk.replace_mlp if args.unit == "mlp" else sk.replace_attention
    print(f"# first-step loss of the SAT forward vs dense ({args.unit}); {env['device']}, torch {env['torch']}, fp32; "
          f"{args.batches} batches x {args.batch_size}, seed {args.seed}")
    print("| task | metric | strategy | omission | dense loss | SAT loss | SAT / dense - 1 |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for task in args.tasks:
        corpus = load_corpus(args.data, task) if args.data else default_corpus(task)
        train, _ = tokenize(corpus, tokenizer, SEQ_LEN[task])
        order = training_order(train, args.batches * args.batch_size, args.seed)
        batches = [collate(order[i:i + args.batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(order), args.batch_size)]
        base.eval()
        dense = mean_loss(base, batches)
        for metric in args.metrics:
            for strategy in args.strategies:
                for rate in args.rates:
                    model = patch(copy.deepcopy(base), rate, metric=metric, strategy=strategy,
                                  forward="sparse").train()
                    torch.manual_seed(args.seed)   # the draws of "sample" and "random"
                    loss = mean_loss(model, batches)
                    rows.append(dict(task=task, unit=args.unit, metric=metric, strategy=strategy, omission_rate=rate,
                                     dense_loss=dense, sat_loss=loss, rel_diff=loss / dense - 1))
                    print(f"| {task} | {metric} | {strategy} | {rate} | {dense:.4f} | {loss:.4f} | "
                          f"{100 * (loss / dense - 1):+.1f}% |", flush=True)
                    del model
    if args.json:
        write_json({"environment": env, "config": vars(args), "rows": rows}, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
