"""A tiny Llama trained dense and with SAT (LORS from 0.5): the SAT loss falls and ends close to dense."""
import torch

import sat_kernels as sk

from helpers import tiny_model

STEPS = 30


def _bigram_batches(steps, batch=8, seq=24, vocab=96, seed=0):
    """Token sequences from a fixed sparse random bigram chain: learnable structure, no downloads."""
    nxt = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))  # 3 successors each
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        seqs = torch.empty(batch, seq, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq):
            choice = torch.randint(0, 3, (batch,), generator=gen)
            seqs[:, t] = nxt[seqs[:, t - 1], choice]
        out.append(seqs)
    return out


def _train(sat: bool):
    model = tiny_model("llama", seed=0, hidden_size=64, intermediate_size=256).train()
    sched = sk.LadderOmissionScheduler(0.5, total_steps=STEPS)
    if sat:
        sk.replace_mlp(model, sched.rate(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    torch.manual_seed(0)
    for step, ids in enumerate(_bigram_batches(STEPS)):
        if sat:
            sk.set_omission_rate(model, sched.rate(step))
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if sat:
        sk.revert(model)
    model.eval()
    with torch.no_grad():
        held_out = _bigram_batches(1, batch=32, seed=1)[0]
        eval_loss = model(held_out, labels=held_out).loss.item()
    return losses, eval_loss


def test_sat_converges_like_dense():
    dense, dense_eval = _train(sat=False)
    sat, sat_eval = _train(sat=True)
    assert sat[-1] < 0.7 * sat[0], f"SAT loss must fall: {sat[0]:.3f} -> {sat[-1]:.3f}"
    # Tolerance 5%: measured 2.125 (SAT) vs 2.083 (dense), +2.0%, CPU fp32, torch 2.13, transformers 5.24.
    assert sat_eval <= 1.05 * dense_eval, f"SAT eval loss {sat_eval:.4f} vs dense {dense_eval:.4f}"
