"""Train a small random-weight Llama dense and with SAT on a synthetic corpus; print loss and tokens/s side by side.

    python examples/tiny_llama_dense_vs_sat.py --steps 60

Shows the whole user path: ``replace_mlp`` -> a LORS schedule applied each step -> ``revert`` -> dense eval.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sat_kernels as sk


def batches(steps, batch, seq, vocab, seed):
    """Sequences from a fixed sparse random bigram chain (3 successors per token): learnable, offline."""
    nxt = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq):
            ids[:, t] = nxt[ids[:, t - 1], torch.randint(0, 3, (batch,), generator=gen)]
        yield ids


def run(sat, args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).train()
    sched = sk.LadderOmissionScheduler(args.omission_rate, total_steps=args.steps)
    if sat:
        sk.replace_mlp(model, sched.rate(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, loss = time.perf_counter(), None
    for step, ids in enumerate(batches(args.steps, args.batch, args.seq, args.vocab, seed=0)):
        if sat:
            sk.set_omission_rate(model, sched.rate(step))
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    if sat:
        sk.revert(model)
    model.eval()
    with torch.no_grad():
        held_out = next(batches(1, 64, args.seq, args.vocab, seed=1))
        eval_loss = model(held_out, labels=held_out).loss.item()
    return loss.item(), eval_loss, args.steps * args.batch * args.seq / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--omission-rate", type=float, default=0.5)
    args = p.parse_args()
    print("| run | final train loss | eval loss | tokens/s |\n|---|---|---|---|")
    results = {}
    for name, sat in (("dense", False), ("SAT", True)):
        results[name] = run(sat, args)
        print("| {} | {:.4f} | {:.4f} | {:.0f} |".format(name, *results[name]), flush=True)
    print(f"speedup (tokens/s, SAT/dense): {results['SAT'][2] / results['dense'][2]:.2f}x")


if __name__ == "__main__":
    main()
