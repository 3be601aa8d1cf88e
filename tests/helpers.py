"""Shared test helpers: operands, the fp64 comparison rule, tiny Hugging Face models."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from sat_kernels.ops.reference import reference_mlp


def make_operands(T, h, inter, dtype, seed=0, lead=None, device="cpu"):
    """``x`` (shape ``lead + [h]`` or ``[T, h]``), the three weights and an upstream gradient, all leaf tensors."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (h,) if lead else (T, h)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    wg = torch.randn(inter, h, generator=gen, dtype=torch.float64) / h ** 0.5
    wu = torch.randn(inter, h, generator=gen, dtype=torch.float64) / h ** 0.5
    wd = torch.randn(h, inter, generator=gen, dtype=torch.float64) / inter ** 0.5
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, wg, wu, wd)], dy.to(device, dtype)


def out_and_grads(fn, operands, dy):
    for t in operands:
        t.grad = None
    y = fn(*operands)
    grads = torch.autograd.grad(y, operands, dy)
    return [y.detach(), *grads]


def fp64_copies(operands):
    return [t.detach().double().requires_grad_() for t in operands]


def rel_rms(a, ref):
    ref = ref.double()
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


NAMES = ("y", "dx", "dw_gate", "dw_up", "dw_down")


def assert_matches_reference(fn, operands, dy, indices, act="silu", forward="sparse", backward="sparse",
                             dense_token_mask=None):
    """``fn`` (y and every gradient) against the fp64 masked-dense reference, within 2x plain PyTorch's error at the
    operands' dtype (flash-attention's rule) plus a few ulps of headroom."""
    def ref_fn(*o):
        return reference_mlp(*o, indices, act=act, forward=forward, backward=backward,
                             dense_token_mask=dense_token_mask)

    ours = out_and_grads(fn, operands, dy)
    ref = out_and_grads(ref_fn, fp64_copies(operands), dy.double())
    plain = out_and_grads(ref_fn, [t.detach().clone().requires_grad_() for t in operands], dy)
    eps = torch.finfo(operands[0].dtype).eps
    for name, o, r, p in zip(NAMES, ours, ref, plain):
        assert o.shape == r.shape and o.dtype == operands[0].dtype, name
        assert not torch.isnan(o).any(), f"{name} has NaN"
        err, err_plain = rel_rms(o, r), rel_rms(p, r)
        assert err <= 2 * err_plain + 8 * eps, f"{name}: rel-RMS error {err:.3e} > 2 x plain PyTorch {err_plain:.3e}"
    return ours


def parse_train_cli(argv):
    """The ``TrainConfig`` of ``sat-train argv``, through the CLI's own checks."""
    from sat_kernels.train.cli import _check_args, build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return config_from_args(args)


def assert_cli_refused(argv, message, capsys):
    """``sat-train argv`` exits with status 2 and ``message`` in its error output."""
    import pytest

    with pytest.raises(SystemExit) as e:
        parse_train_cli(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def check_zero_tokens(dtype, backend="auto", device="cpu"):
    """``sat_mlp`` (in-step and dense), ``gathered_mlp`` and ``neuron_scores`` on an empty batch and an empty
    sequence: empty ``y``, exact zero gradients of ``x`` and every weight, a valid kept set, zero scores."""
    import sat_kernels as sk

    for lead in ((0,), (0, 16), (2, 0)):
        operands, dy = make_operands(None, 40, 90, dtype, lead=lead, device=device)
        calls = {"sat": lambda *o: sk.sat_mlp(*o, 0.5, backend=backend),
                 "dense": lambda *o: sk.sat_mlp(*o, 0.0, backend=backend),
                 "gathered": lambda *o: sk.gathered_mlp(*o, torch.tensor([3, 50], device=device), backend=backend)}
        for name, fn in calls.items():
            y, *grads = out_and_grads(fn, operands, dy)
            assert y.shape == lead + (40,) and y.dtype == dtype, (name, lead)
            for t, g in zip(operands, grads):
                assert g.shape == t.shape and not g.any(), (name, lead)
        _, idx = sk.sat_mlp(*operands, 0.5, backend=backend, return_indices=True)
        assert idx.numel() == sk.num_kept(90, 0.5) and torch.equal(idx, torch.unique(idx)), lead
        assert not sk.neuron_scores(*operands).any(), lead


def tiny_config(family="llama", **overrides):
    """A tiny config of one of the supported decoder families (random weights, no downloads)."""
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma": "GemmaConfig", "gemma3": "Gemma3TextConfig"}[family]
    kwargs = dict(vocab_size=96, hidden_size=48, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family in ("qwen3", "gemma", "gemma3"):
        kwargs["head_dim"] = 12
    if family == "gemma3":   # a sliding-window layer, then a global one; a query scale other than head_dim ** -0.5
        kwargs.update(sliding_window=6, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
    kwargs.update(overrides)
    return getattr(transformers, cls)(**kwargs)


def tiny_model(family="llama", seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if family == "gemma3":   # Gemma 3 initializes its (1 + w) norm weights w to 0: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.5)
    return model.float()


def word_tokenizer(vocab_size=96):
    """A word-level tokenizer over ``w0 .. w91`` and four special tokens, built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[EOS]", "[BOS]", "[UNK]"]
    vocab = {f"w{i}": i for i in range(vocab_size - len(specials))}
    vocab.update({tok: vocab_size - len(specials) + i for i, tok in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                                   unk_token="[UNK]")


def run_interpreter_cases(cases, timeout: int) -> None:
    """Run the pytest file ``cases`` under ``TRITON_INTERPRET=1`` in a child process (the interpreter is chosen when
    triton is first imported); assert that it passed with nothing skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                          cwd=cases.parent.parent, env=env, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, tail
