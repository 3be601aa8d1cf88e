"""How much the tokens that are scored change SAT's kept neurons, on the batches ``sat-train --task sft`` starts with.

For each of the first batches of the training order (the same corpus, tokenizer, seed, order and padding collator as
``sat-train``), one dense forward records every MLP's input; each layer's neuron scores are then computed as the
SAT modules compute them (``sk.neuron_scores`` with the module's token mask) over all tokens, over the real tokens
(``attention_mask``) and over the loss tokens (the next-token label is not -100), and the kept sets at the omission
rate are compared: how many of the ``k`` kept neurons differ from those of the real tokens. No training; the
training runs (``sat-train --score-tokens``) are the evidence on quality.

    python benchmarks/token_mask_selection.py --json benchmarks/results/token_mask/selection_sft.json
"""
from __future__ import annotations

import argparse

import torch

import sat_kernels as sk
from sat_kernels.bench.results import environment
from sat_kernels.train.compare import write_json
from sat_kernels.train.data import IGNORE_INDEX, collate, default_corpus, tokenize, training_order
from sat_kernels.train.model import load_model, load_tokenizer


def token_masks(batch):
    """``{"all": None, "real": bool [B, T], "loss": bool [B, T]}`` as the SAT modules derive them."""
    real = batch["attention_mask"] != 0
    labels = batch["labels"]
    loss = torch.cat([labels[:, 1:] != IGNORE_INDEX, torch.zeros_like(real[:, :1])], dim=1) & real
    return {"all": None, "real": real, "loss": loss}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--seq-len", type=int, default=128, help="as sat-train --seq-len (default 128: the cpu preset)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=8, help="first batches of the training order (default 8)")
    p.add_argument("--rate", type=float, default=0.5, help="omission rate (default 0.5, the ladder's first rung)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows and the environment to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    env = environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    train, _ = tokenize(default_corpus("sft"), tokenizer, args.seq_len)
    order = training_order(train, args.batches * args.batch_size, args.seed)
    mlps = [layer.mlp for layer in model.model.layers]
    inter = mlps[0].gate_proj.out_features
    k = sk.num_kept(inter, args.rate)
    print(f"# kept neurons that differ from those of the real tokens, sft, omission {args.rate} (k = {k} of {inter}); "
          f"{env['device']}, torch {env['torch']}, fp32; {args.batches} batches x {args.batch_size}, seq-len "
          f"{args.seq_len}, seed {args.seed}")
    print("| batch | tokens | padding | loss tokens | all vs real: mean (min-max) over layers | "
          "loss vs real: mean (min-max) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for b in range(args.batches):
        batch = collate(order[b * args.batch_size:(b + 1) * args.batch_size], tokenizer.pad_token_id)
        inputs = []
        handles = [m.register_forward_hook(lambda mod, a, out: inputs.append(a[0])) for m in mlps]
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in handles:
            h.remove()
        masks = token_masks(batch)
        differ = {"all": [], "loss": []}
        for x, m in zip(inputs, mlps):
            kept = {name: set(sk.select_neurons(sk.neuron_scores(x, m.gate_proj.weight, m.up_proj.weight,
                                                                 m.down_proj.weight, token_mask=mask), k).tolist())
                    for name, mask in masks.items()}
            for name in differ:
                differ[name].append(k - len(kept[name] & kept["real"]))
        tokens = batch["attention_mask"].numel()
        row = dict(batch=b, tokens=tokens, padding=int((~masks["real"]).sum()), loss_tokens=int(masks["loss"].sum()),
                   k=k, neurons=inter, differ_all_vs_real=differ["all"], differ_loss_vs_real=differ["loss"])
        rows.append(row)
        summary = {n: f"{sum(v) / len(v):.1f} ({min(v)}-{max(v)})" for n, v in differ.items()}
        print(f"| {b} | {tokens} | {row['padding']} ({100 * row['padding'] / tokens:.0f}%) | {row['loss_tokens']} | "
              f"{summary['all']} | {summary['loss']} |")
    if args.json:
        write_json({"environment": env, "config": vars(args), "rows": rows}, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
