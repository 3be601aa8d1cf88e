"""backward="dense_tokens": the exact forward; the tokens of a mask (at the model level, those whose logits enter
the loss) take the dense MLP's backward, every other token the sparse one. Against the fp64 masked-dense reference
(mask 1 at token t, neuron i when i is kept or t is marked), through replace_mlp and the training CLI, and every
refusal."""
import copy
import warnings

import pytest
import torch

import sat_kernels as sk
import sat_kernels.modules as sat_modules_module
from sat_kernels.ops.mlp import LoRA, sat_lora_mlp, sat_mlp_kept
from sat_kernels.ops.reference import reference_mlp

from helpers import NAMES, assert_cli_refused, assert_matches_reference, fp64_copies, make_operands, out_and_grads, \
    parse_train_cli, rel_rms, tiny_model

SHAPES = [(1, 8, 5), (7, 13, 9), (63, 97, 123), (130, 64, 431)]   # T = 1, odd h, I not a multiple of 8
DENSE_TOKENS = dict(forward="dense", backward="dense_tokens")


def _id(shape):
    return "T{}-h{}-I{}".format(*shape)


def _mask(T, kind, seed=0):
    if kind == "none":
        return torch.zeros(T, dtype=torch.bool)
    if kind == "all":
        return torch.ones(T, dtype=torch.bool)
    if kind == "first":
        return torch.arange(T) == 0
    return torch.rand(T, generator=torch.Generator().manual_seed(seed)) < 0.3


def _op(rate, mask, act="silu", **kw):
    return lambda *o: sk.sat_mlp(*o, rate, act=act, dense_token_mask=mask, **DENSE_TOKENS, **kw)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("kind", ["random", "first", "none", "all"])
@pytest.mark.parametrize("rate", [0.5, 0.9], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_fp64_against_the_reference_and_the_two_backwards_it_mixes(shape, rate, kind, act):
    """y is the dense MLP's. A marked token's dx is the dense MLP's, an unmarked one's the sparse backward's; a kept
    neuron's weight gradient is the dense one (kept at every token), an omitted neuron's that of the dense MLP with
    the upstream gradient of the marked tokens only."""
    T, h, inter = shape
    mask = _mask(T, kind)
    operands, dy = make_operands(*shape, torch.float64)
    y, dx, *dw = out_and_grads(_op(rate, mask, act), operands, dy)
    _, idx = sk.sat_mlp(*operands, rate, act=act, forward="dense", return_indices=True)
    ref = out_and_grads(lambda *o: reference_mlp(*o, idx, act=act, dense_token_mask=mask, **DENSE_TOKENS),
                        fp64_copies(operands), dy)
    for name, o, r in zip(NAMES, [y, dx, *dw], ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)

    dense = out_and_grads(lambda *o: reference_mlp(*o, act=act), operands, dy)
    sparse = out_and_grads(lambda *o: sk.sat_mlp(*o, rate, act=act, forward="dense"), operands, dy)
    dense_marked = out_and_grads(lambda *o: reference_mlp(*o, act=act), operands, dy * mask[:, None])
    torch.testing.assert_close(y, dense[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx[mask], dense[1][mask], rtol=1e-12, atol=1e-12, msg="marked tokens: dense dx")
    torch.testing.assert_close(dx[~mask], sparse[1][~mask], rtol=1e-12, atol=1e-12, msg="others: sparse dx")
    omitted = torch.ones(inter, dtype=torch.bool)
    omitted[idx] = False
    for name, g, d, m in zip(NAMES[2:], dw, dense[2:], dense_marked[2:]):
        rows, d_rows, m_rows = (g.t(), d.t(), m.t()) if name == "dw_down" else (g, d, m)
        torch.testing.assert_close(rows[idx], d_rows[idx], rtol=1e-12, atol=1e-12, msg=f"{name}: kept neurons")
        torch.testing.assert_close(rows[omitted], m_rows[omitted], rtol=1e-12, atol=1e-12,
                                   msg=f"{name}: omitted neurons, the marked tokens' share")
    if kind == "none":   # nothing marked: exactly the sparse backward
        for name, o, s in zip(NAMES, [y, dx, *dw], sparse):
            torch.testing.assert_close(o, s, rtol=1e-12, atol=1e-12, msg=name)
    if kind == "all":    # everything marked: the dense MLP's backward
        for name, o, d in zip(NAMES, [y, dx, *dw], dense):
            torch.testing.assert_close(o, d, rtol=1e-12, atol=1e-12, msg=name)
    if kind == "random" and T > 1:
        assert rel_rms(dx, sparse[1]) > 1e-3 and rel_rms(dx, dense[1]) > 1e-3, "differs from both backwards"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_low_precision_against_the_fp64_reference(shape, dtype):
    """fp32 runs token-major on CPU, 16-bit neuron-major (function.neuron_major): both layouts."""
    mask = _mask(shape[0], "random", seed=1)
    operands, dy = make_operands(*shape, dtype)
    _, idx = sk.sat_mlp(*operands, 0.5, dense_token_mask=mask, **DENSE_TOKENS, return_indices=True)
    _, idx_sparse = sk.sat_mlp(*operands, 0.5, forward="dense", return_indices=True)
    assert torch.equal(idx, idx_sparse), "the backward mode does not change the selection"
    assert_matches_reference(_op(0.5, mask), operands, dy, idx, dense_token_mask=mask, **DENSE_TOKENS)


@pytest.mark.parametrize("marked, saved_rows", [(64, 64), (70, 128), (0, 0)])
def test_saves_the_omitted_neurons_at_the_marked_tokens_only(marked, saved_rows):
    """Beside the kept rows, G and U of the omitted neurons at the marked tokens, whose count is padded on CPU to a
    multiple of 64 (function.DENSE_ROWS_MULTIPLE: GEMM shapes that repeat from batch to batch)."""
    T, h, inter, rate = 256, 32, 512, 0.75
    mask = torch.arange(T) % 3 == 0
    mask[mask.nonzero()[marked:, 0]] = False
    k = sk.num_kept(inter, rate)
    for dtype in (torch.float32, torch.bfloat16):
        operands, _ = make_operands(T, h, inter, dtype)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            sk.sat_mlp(*operands, rate, dense_token_mask=mask, **DENSE_TOKENS)
        assert saved.count((k, T)) == 2 and saved.count((inter - k, saved_rows)) == 2, saved
        assert (inter, T) not in saved and (T, inter) not in saved, saved


def test_integer_mask_leading_dims_autocast_rate_zero_and_empty_batches():
    operands, dy = make_operands(None, 24, 50, torch.float64, lead=(3, 7))
    mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) < 0.5).long()
    ours = out_and_grads(_op(0.5, mask), operands, dy)
    _, idx = sk.sat_mlp(*operands, 0.5, forward="dense", return_indices=True)
    ref = out_and_grads(lambda *o: reference_mlp(*o, idx, dense_token_mask=mask.bool(), **DENSE_TOKENS),
                        fp64_copies(operands), dy)
    for name, o, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)
    operands, _ = make_operands(31, 24, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sk.sat_mlp(*operands, 0.5, dense_token_mask=torch.arange(31) < 5, **DENSE_TOKENS)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in operands)
    operands, dy = make_operands(9, 8, 20, torch.float64)
    torch.testing.assert_close(sk.sat_mlp(*operands, 0.0, dense_token_mask=torch.ones(9, dtype=torch.bool),
                                          **DENSE_TOKENS), reference_mlp(*operands))
    for lead in ((0,), (2, 0)):
        operands, dy = make_operands(None, 16, 30, torch.float32, lead=lead)
        mask = torch.zeros(lead, dtype=torch.bool)
        y, *grads = out_and_grads(_op(0.5, mask), operands, dy)
        assert y.shape == lead + (16,)
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, operands)), lead


def test_without_dx_or_frozen_weights_the_other_gradients_are_unchanged():
    operands, dy = make_operands(40, 24, 70, torch.float64)
    mask = _mask(40, "random")
    ref = out_and_grads(_op(0.5, mask), operands, dy)
    x, wg, wu, wd = operands
    grads = torch.autograd.grad(sk.sat_mlp(x.detach(), wg, wu, wd, 0.5, dense_token_mask=mask, **DENSE_TOKENS),
                                (wg, wu, wd), dy)
    for name, g, r in zip(NAMES[2:], grads, ref[2:]):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)
    dx, dwu = torch.autograd.grad(sk.sat_mlp(x, wg.detach(), wu, wd.detach(), 0.5, dense_token_mask=mask,
                                             **DENSE_TOKENS), (x, wu), dy)
    torch.testing.assert_close(dx, ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dwu, ref[3], rtol=1e-12, atol=1e-12)


# the model level: replace_mlp(..., backward="dense_tokens") marks the tokens whose logits enter the loss


def _sft_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 13), generator=gen)
    labels = ids.clone()
    labels[0, :6] = -100    # a prompt
    labels[1, :9] = -100
    return ids, labels


def test_model_gradients_equal_the_reference_mlps_with_the_loss_tokens_dense(monkeypatch):
    """Every MLP of the patched model gets the loss tokens of the batch (labels shifted by one, != -100) as its dense
    tokens: the model's gradients equal those of the same model whose MLPs compute the fp64 reference at the kept
    sets and loss tokens of the run."""
    ids, labels = _sft_batch()
    base = tiny_model("llama").double().train()
    model = sk.replace_mlp(copy.deepcopy(base), 0.5, backward="dense_tokens")
    assert all(m.backward_mode == "dense_tokens" for _, m in sk.sat_modules(model, "mlp"))
    calls = []
    run = sat_modules_module.sat_mlp_kept

    def recording(x, *weights_and_k, **kwargs):
        y, idx = run(x, *weights_and_k, **{**kwargs, "return_indices": True})
        calls.append((idx, kwargs["dense_token_mask"]))
        return y

    monkeypatch.setattr(sat_modules_module, "sat_mlp_kept", recording)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    expected = torch.cat([labels[:, 1:] != -100, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert len(calls) == 2 and all(torch.equal(mask, expected) for _, mask in calls)

    replay = iter(calls)

    def reference(x, w_gate, w_up, w_down, k, **kwargs):
        idx, mask = next(replay)
        return reference_mlp(x, w_gate, w_up, w_down, idx, dense_token_mask=mask, **DENSE_TOKENS)

    monkeypatch.setattr(sat_modules_module, "sat_mlp_kept", reference)
    ref_model = sk.replace_mlp(copy.deepcopy(base), 0.5, backward="dense_tokens")
    ref_loss = ref_model(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def _grads(model, **batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_without_labels_is_dense_and_warns_once():
    ids, _ = _sft_batch()
    base = tiny_model("llama").double().train()
    model = sk.replace_mlp(copy.deepcopy(base), 0.5, backward="dense_tokens")

    def loss_outside(m):   # a loss computed outside the model: its forward sees no labels
        m.zero_grad()
        logits = m(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    with pytest.warns(UserWarning, match="backward='dense_tokens' found no labels in the model's forward"):
        grads = loss_outside(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_outside(model)            # once per module
    dense = loss_outside(base)
    for name, g in grads.items():
        torch.testing.assert_close(g, dense[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids, labels = _sft_batch(1)
    model = sk.replace_mlp(tiny_model("llama").double(), 0.5, backward="dense_tokens").train()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.config.use_cache = False
    plain, checkpointed = _grads(model, input_ids=ids, labels=labels), _grads(ckpt, input_ids=ids, labels=labels)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_sparse_and_dense_tokens_differ_only_in_the_backward():
    ids, labels = _sft_batch(2)
    base = tiny_model("llama").double().train()
    sparse = sk.replace_mlp(copy.deepcopy(base), 0.5)
    dense_tokens = sk.replace_mlp(copy.deepcopy(base), 0.5, backward="dense_tokens")
    loss_s, loss_d = (m(input_ids=ids, labels=labels).loss for m in (sparse, dense_tokens))
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-12, atol=0)
    g_s, g_d, g_dense = (_grads(m, input_ids=ids, labels=labels) for m in (sparse, dense_tokens, base))
    name = "model.embed_tokens.weight"
    assert rel_rms(g_d[name], g_dense[name]) < rel_rms(g_s[name], g_dense[name])


# refusals


def _ops(T=8, h=8, inter=16):
    return make_operands(T, h, inter, torch.float32)[0]


def test_mask_and_mode_must_come_together():
    with pytest.raises(ValueError, match=r"backward='dense_tokens' needs dense_token_mask"):
        sk.sat_mlp(*_ops(), 0.5, **DENSE_TOKENS)
    with pytest.raises(ValueError, match=r"dense_token_mask is an argument of backward='dense_tokens', got "
                                         r"backward='sparse'"):
        sk.sat_mlp(*_ops(), 0.5, forward="dense", dense_token_mask=torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(7, dtype=torch.bool), ValueError, r"dense_token_mask must have shape \[8\]"),
    (torch.ones(8), TypeError, r"dense_token_mask must be a bool or integer tensor \(True or 1 for the tokens whose "
                               r"backward runs through every neuron"),
    ([True] * 8, TypeError, r"dense_token_mask must be None or a bool/integer tensor of shape \[8\]"),
    (torch.ones(8, dtype=torch.bool, device="meta"), ValueError, r"dense_token_mask must be on cpu"),
])
def test_bad_masks_are_refused(mask, error, match):
    with pytest.raises(error, match=match):
        sk.sat_mlp(*_ops(), 0.5, dense_token_mask=mask, **DENSE_TOKENS)


def test_sparse_forward_priority_and_other_backends_are_refused():
    mask = torch.ones(8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"backward='dense_tokens' needs forward='dense', got forward='sparse'"):
        sk.sat_mlp(*_ops(), 0.5, backward="dense_tokens", dense_token_mask=mask)
    with pytest.raises(ValueError, match=r"backward='dense_tokens' needs forward='dense'"):
        sk.replace_mlp(tiny_model("llama"), 0.5, forward="sparse", backward="dense_tokens")
    match = r"backward='dense_tokens' does not support strategy='priority'"
    with pytest.raises(ValueError, match=match):
        sk.sat_mlp(*_ops(), 0.5, strategy="priority", dense_token_mask=mask, **DENSE_TOKENS)
    with pytest.raises(ValueError, match=match):
        sk.replace_mlp(tiny_model("llama"), 0.5, strategy="priority", backward="dense_tokens")
    for backend in ("triton", "cuda"):
        match = f"backward='dense_tokens' is implemented by the torch backend only, got backend='{backend}'"
        with pytest.raises(ValueError, match=match):
            sk.sat_mlp(*_ops(), 0.5, backend=backend, dense_token_mask=mask, **DENSE_TOKENS)
        with pytest.raises(ValueError, match=match):
            sk.replace_mlp(tiny_model("llama"), 0.5, backend=backend, backward="dense_tokens")


def test_gathered_and_lora_mlps_are_refused():
    with pytest.raises(ValueError, match=r"gathered_mlp: backward='dense_tokens' needs the exact forward over every "
                                         r"neuron"):
        sk.gathered_mlp(*_ops(), torch.tensor([1, 5]), backward="dense_tokens")
    x, wg, wu, wd = _ops()
    adapters = (LoRA(torch.randn(2, 8), torch.randn(16, 2), 2.0), None, None)
    with pytest.raises(ValueError, match=r"sat_lora_mlp: backward='dense_tokens' is not supported on LoRA MLPs: the "
                                         r"LoRA op implements the sparse backward only"):
        sat_lora_mlp(x, wg, wu, wd, adapters, 8, **DENSE_TOKENS)


def test_peft_lora_projections_are_refused():
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"])
    lora_model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**config))
    with pytest.raises(ValueError, match=r"replace_mlp: backward='dense_tokens' is not supported on MLPs with PEFT "
                                         r"adapters \(.*\): the LoRA op implements the sparse backward only"):
        sk.replace_mlp(lora_model, 0.5, backward="dense_tokens")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_is_refused(fresh_dynamo):
    operands, _ = make_operands(16, 8, 20, torch.float32)
    mask = torch.arange(16) < 4
    fn = torch.compile(lambda *o: sk.sat_mlp(*o, 0.5, dense_token_mask=mask, **DENSE_TOKENS), backend="aot_eager",
                       fullgraph=True)
    with pytest.raises(Exception, match=r"backward='dense_tokens' is not supported under torch.compile"):
        fn(*operands)


def test_torch_backend_equals_auto():
    operands, dy = make_operands(33, 16, 45, torch.float32)
    mask = _mask(33, "random")
    auto = out_and_grads(_op(0.5, mask), operands, dy)
    torch_ = out_and_grads(lambda *o: sat_mlp_kept(*o, sk.num_kept(45, 0.5), backend="torch",
                                                   dense_token_mask=mask, **DENSE_TOKENS), operands, dy)
    for name, a, t in zip(NAMES, auto, torch_):
        assert torch.equal(a, t), name


# the training CLI


def test_cli_backward_option():
    cfg = parse_train_cli(["--backward", "dense_tokens"])
    assert cfg.backward == "dense_tokens" and cfg.forward == "dense"


@pytest.mark.parametrize("argv, message", [
    (["--backward", "dense_tokens", "--forward", "sparse"], "--backward dense_tokens needs --forward dense"),
    (["--backward", "dense_tokens", "--lora-rank", "4"], "--backward dense_tokens is not supported with --lora-rank"),
    (["--backward", "dense_tokens", "--strategy", "priority"],
     "--backward dense_tokens is not supported with --strategy priority"),
])
def test_cli_refusals(argv, message, capsys):
    assert_cli_refused(argv, message, capsys)


# with what users combine it: TRL's SFTTrainer (its labels mark the completion tokens; gradient checkpointing on)


def test_trl_sft_trainer_marks_the_completion_tokens(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from helpers import word_tokenizer

    gen = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(t)}" for t in torch.randint(0, 92, (n,), generator=gen))

    data = Dataset.from_dict({"prompt": [words(12) for _ in range(8)], "completion": [words(5) for _ in range(8)]})
    model = sk.replace_mlp(tiny_model("llama"), 0.5, backward="dense_tokens")
    marked = []
    run = sat_modules_module.sat_mlp_kept

    def recording(x, *args, **kwargs):
        marked.append(kwargs["dense_token_mask"].float().mean().item())
        return run(x, *args, **kwargs)

    monkeypatch.setattr(sat_modules_module, "sat_mlp_kept", recording)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=24, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(),
                         callbacks=[sk.SATCallback(sk.LadderOmissionScheduler(0.5))])
    assert args.gradient_checkpointing and args.completion_only_loss is not False
    before = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # labels reach the model: no "found no labels" warning
        trainer.train()
    assert marked and all(0.0 < share < 0.6 for share in marked), marked   # the completions, not the prompts
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert not torch.equal(model.model.layers[0].mlp.gate_proj.weight.detach(), before)
