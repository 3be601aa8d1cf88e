"""SAT under DeepSpeed ZeRO on CPU (gloo): a SAT model trained by a DeepSpeed engine gives the losses, kept sets,
gradients and weights of the same SAT model trained in plain PyTorch (same AdamW, same data), in one process and in
two; SAT at omission rate 0 gives the dense model's; what does not work (torch.compile, a weight read outside the
engine's forward, skip_omitted_updates) is refused.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0`` (else the tiny model's parameters would all stay whole),
``gradient_clipping: 0`` (DeepSpeed clips at 1.0 by default) and a torch AdamW (``zero_allow_untested_optimizer``).
The one-process runs use a 1-rank gloo group in this process, ``memory_efficient_linear: false`` (else ZeRO-3
replaces ``torch.nn.functional.linear`` for the whole process) and no prefetching; the two-process run spawns its
ranks, with DeepSpeed's default prefetching and linear. DeepSpeed's CPU backend compiles a shared-memory all-reduce
op at start-up (about a minute of C++ on two cores, once per machine) that only its inference all-reduce uses, not
ZeRO training: the tests skip that build (:func:`_skip_shm_op_build`).
"""
import gc
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sat_kernels as sk
import sat_kernels.modules as sat_modules_impl

from helpers import tiny_config, tiny_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

WORLD, STEPS, BATCH, LR = 2, 3, 4, 1e-3


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (BATCH, 11), generator=gen) for _ in range(STEPS)]


def _config(stage=3, rank_batch=BATCH, **zero):
    # small buckets: DeepSpeed allocates them whole (500M elements by default), and the NaN fill of fresh
    # allocations (conftest.py) touches every page
    zero_opt = {"stage": stage, "reduce_bucket_size": 100_000, "allgather_bucket_size": 100_000}
    if stage == 3:
        zero_opt.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0,
                        memory_efficient_linear=False)
    zero_opt.update(zero)
    return {"train_micro_batch_size_per_gpu": rank_batch, "gradient_accumulation_steps": 1,
            "zero_optimization": zero_opt, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False}


def _sat_model(kind="both", rate=0.5, family="llama"):
    model = tiny_model(family)
    if kind in ("mlp", "both"):
        sk.replace_mlp(model, rate)
    if kind in ("attention", "both"):
        sk.replace_attention(model, rate)
    return model.train()


def _skip_shm_op_build():
    """Keep DeepSpeed's CPU backend from compiling its shared-memory op, which serves inference only (module doc)."""
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")   # the module: deepspeed.comm.torch is torch
    if hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None


def _grads(model, full_grad=None):
    """``{name: gradient}`` of every parameter (DeepSpeed's whole gradient through ``full_grad``)."""
    return {name: (full_grad(p) if full_grad else p.grad).detach().clone() for name, p in model.named_parameters()}


def _train_plain(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(_grads(model))
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "grads": grads, "state": _state(model)}


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


_ENGINES = []   # the engines a test created, destroyed after it (engines_destroyed)


def _engine(model, config, optimizer=None):
    """A DeepSpeed engine over ``model`` with ``optimizer`` (a torch AdamW by default); the engine and DeepSpeed's
    optimizer."""
    import deepspeed

    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=LR)
    engine, ds_optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _ENGINES.append(engine)
    return engine, ds_optimizer


def _train_deepspeed(model, batches, config, rank=0, world=1):
    """Train ``model`` under a DeepSpeed engine on rank ``rank``'s share of each batch; the losses (mean over the
    ranks), the whole gradients of each step and the final whole weights."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    engine, _ = _engine(model, config)
    per = BATCH // world
    losses, grads = [], []
    for ids in batches:
        local = ids[rank * per:(rank + 1) * per]
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        grads.append(_grads(model, safe_get_full_grad))
        engine.step()
        losses.append(loss.detach().clone())
    losses = torch.stack(losses)
    if world > 1:
        dist.all_reduce(losses)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        state = _state(model)
    return {"losses": losses / world, "grads": grads, "state": state, "engine": engine}


def _assert_same_training(out, ref, weight_atol=1e-4):
    """A DeepSpeed run ``out`` against the plain run ``ref``: the losses; at every step the zero pattern of every
    gradient (the omitted rows and columns, so the kept sets) exactly; the first step's gradients to rounding; later
    gradients within 1e-3 of each tensor's largest entry and the final weights within ``weight_atol``. AdamW divides
    each entry's step by the entry's own gradient size, so its early steps move a weight by about ``LR`` whatever
    the gradient and a missing or wrong gradient shows as ~1e-3; for entries near AdamW's eps (1e-8) the same
    division turns DeepSpeed's rounding into weight differences of up to 3e-5 (measured: the SAT MLP model; 3e-7 for
    the dense model)."""
    torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-6, atol=1e-6)
    for step, (got, want) in enumerate(zip(out["grads"], ref["grads"])):
        assert list(got) == list(want)
        for name, g in got.items():
            w = want[name]
            assert torch.equal(g == 0, w == 0), f"step {step}: {name} has other zero (omitted) entries"
            rtol, atol = (1e-5, 1e-7) if step == 0 else (1e-3, 1e-3 * float(w.abs().max()))
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {name}: {m}")
    for name, value in ref["state"].items():
        torch.testing.assert_close(out["state"][name], value, rtol=0, atol=weight_atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A 1-rank gloo process group in this process for DeepSpeed engines; afterwards the group is destroyed and the
    environment variables DeepSpeed reads or sets and ``torch.nn.functional.linear`` are put back."""
    pytest.importorskip("deepspeed")
    env, linear = dict(os.environ), torch.nn.functional.linear
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('deepspeed') / 'init'}", rank=0,
                            world_size=1)
    _skip_shm_op_build()
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        torch.nn.functional.linear = linear


@pytest.fixture(autouse=True)
def engines_destroyed():
    yield
    while _ENGINES:
        _ENGINES.pop().destroy()
    gc.collect()


@pytest.fixture
def weight_reads(monkeypatch):
    """The shapes of the weights the SAT modules pass to their ops, recorded per call."""
    seen = []

    def spy(op):
        def run(x, *weights, **kwargs):
            seen.append([tuple(w.shape) for w in weights if isinstance(w, torch.Tensor)])
            return op(x, *weights, **kwargs)
        return run

    monkeypatch.setattr(sat_modules_impl, "sat_mlp_kept", spy(sat_modules_impl.sat_mlp_kept))
    monkeypatch.setattr(sat_modules_impl, "sat_attention_kept", spy(sat_modules_impl.sat_attention_kept))
    return seen


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_zero3_matches_plain_training(one_rank_group, weight_reads, kind):
    ref = _train_plain(_sat_model(kind), _batches())
    model = _sat_model(kind)
    whole = {tuple(p.shape) for p in model.parameters()}
    weight_reads.clear()
    out = _train_deepspeed(model, _batches(), _config())
    _assert_same_training(out, ref)
    # partitioned outside the forward, whole where SAT reads the weights (2 layers x 3 steps)
    assert all(p.numel() == 0 and hasattr(p, "ds_id") for p in model.parameters())
    assert len(weight_reads) == 2 * STEPS and all(set(shapes) <= whole for shapes in weight_reads)
    assert all(0 not in shape for shapes in weight_reads for shape in shapes)
    # what reads the modules, not the weights
    stats = sk.sat_stats(model)[kind]["summary"]
    units = 136 if kind == "mlp" else 4
    assert stats["kept_min"] == sk.num_kept(units, 0.5) and stats["nonfinite_total"] == 0
    assert sk.patch_summary(model)[kind].complete
    # eval runs the dense modules
    engine = out["engine"]
    engine.eval()
    with torch.no_grad():
        eval_loss = engine(input_ids=_batches()[0], labels=_batches()[0]).loss
    plain = tiny_model("llama")
    plain.load_state_dict(ref["state"])
    with torch.no_grad():
        torch.testing.assert_close(eval_loss, plain.eval()(input_ids=_batches()[0], labels=_batches()[0]).loss,
                                   rtol=1e-5, atol=1e-5)


def test_zero3_rate0_is_the_dense_model(one_rank_group):
    dense = _train_deepspeed(tiny_model("llama").train(), _batches(), _config())
    rate0 = _train_deepspeed(_sat_model("both", rate=0.0), _batches(), _config())
    assert torch.equal(rate0["losses"], dense["losses"])
    for name, value in dense["state"].items():
        assert torch.equal(rate0["state"][name], value), name


@pytest.mark.parametrize("stage, offload", [(1, False), (2, False), (3, True)], ids=["zero1", "zero2", "zero3-offload"])
def test_other_zero_set_ups_match_plain_training(one_rank_group, stage, offload):
    """ZeRO-1/2 keep whole parameters on every rank; ZeRO-3 with its parameters and optimizer offloaded to the CPU
    (on a CPU-only machine, where offloading moves nothing, so this checks the code path, not a device copy)."""
    extra = {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}} if offload else {}
    ref = _train_plain(_sat_model(), _batches())
    _assert_same_training(_train_deepspeed(_sat_model(), _batches(), _config(stage, **extra)), ref)


def test_zero3_per_layer_budget_matches_plain_training(one_rank_group):
    def budget_run(model, train):
        budget = sk.PerLayerBudget(model, momentum=0.0)
        counts = []
        orig_forward = model.forward

        def forward(*args, **kwargs):   # observe the last step's scores and split the budget before each step
            budget.observe()
            budget.apply()
            counts.append(budget.kept())
            return orig_forward(*args, **kwargs)
        model.forward = forward
        return train(model), counts

    ref, ref_counts = budget_run(_sat_model("mlp"), lambda m: _train_plain(m, _batches()))
    out, counts = budget_run(_sat_model("mlp"), lambda m: _train_deepspeed(m, _batches(), _config()))
    assert counts == ref_counts and len(set(map(str, counts))) > 1, "the budget moves kept counts between layers"
    _assert_same_training(out, ref)


def test_model_partitioned_before_patching(one_rank_group):
    """Hugging Face loads a model under ``deepspeed.zero.Init`` with ZeRO-3: patched while partitioned (Qwen3, for the
    q_norm/k_norm checks), it trains as the plain model with the same weights."""
    import deepspeed
    import transformers

    # built first, so that the Qwen3 classes are defined (imported) before zero.Init: a class defined inside it gets
    # its original __init__ back on exit, without what decorators put on top (transformers' kernel functions)
    plain = tiny_model("qwen3")
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=_config()):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3"))
    assert all(p.numel() == 0 for p in model.parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = _state(model)
    sk.replace_attention(sk.replace_mlp(model, 0.5), 0.5).train()
    assert sk.patch_summary(model)["attention"].complete and sk.patch_summary(model)["mlp"].complete
    plain.load_state_dict(weights)
    ref = _train_plain(sk.replace_attention(sk.replace_mlp(plain, 0.5), 0.5).train(), _batches())
    _assert_same_training(_train_deepspeed(model, _batches(), _config()), ref)


def _deepspeed_worker(rank, init_file, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    _skip_shm_op_build()
    config = _config(rank_batch=BATCH // WORLD)
    for key in ("stage3_prefetch_bucket_size", "memory_efficient_linear"):   # DeepSpeed's defaults
        del config["zero_optimization"][key]
    out = _train_deepspeed(_sat_model(), _batches(), config, rank, WORLD)
    out.pop("engine")
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_zero3_two_processes_match_one_process_on_the_global_batch(tmp_path):
    """2 ranks x 2 sequences with synchronized selection (the default under torch.distributed) = 1 process x 4."""
    pytest.importorskip("deepspeed")
    mp.spawn(_deepspeed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ref = _train_plain(_sat_model(), _batches())
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same_training(out, ref)


def test_compiled_sat_modules_are_refused_under_zero3(one_rank_group):
    model = _sat_model("mlp")
    engine, _ = _engine(model, _config())
    model.model.layers[0].mlp.compile(backend="eager")
    try:
        with pytest.raises(ValueError, match=r"SATMLP\.gate_proj\.weight is a DeepSpeed ZeRO-3 parameter that SAT "
                                             r"cannot read whole here .*run SAT without torch\.compile"):
            engine(input_ids=_batches()[0], labels=_batches()[0])
    finally:
        torch._dynamo.reset()


def test_sat_module_called_outside_the_engine_is_refused_under_zero3(one_rank_group):
    model = _sat_model("attention")
    _engine(model, _config())
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 48)
    cos, sin = model.model.rotary_emb(x, torch.arange(5)[None])
    with pytest.raises(ValueError, match=r"SATAttention\.q_proj\.weight is a DeepSpeed ZeRO-3 parameter that SAT "
                                         r"cannot read whole here \(it was not gathered for this forward: "
                                         r"ZeroParamStatus\.NOT_AVAILABLE, 0 of 2304 elements here\)"
                                         r".*call the model or the engine, not one of its submodules"):
        attn(x, position_embeddings=(cos, sin), attention_mask=None)


@pytest.mark.parametrize("stage", [2, 3])
def test_skip_omitted_updates_is_refused_under_zero(one_rank_group, stage):
    """Under ZeRO the optimizer steps DeepSpeed's flat partitions: the hooks would skip nothing (measured: every
    gate_proj row of a SAT layer moved with them under ZeRO-2)."""
    model = _sat_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    _, ds_opt = _engine(model, _config(stage), opt)
    first = (r"model\.layers\.0\.mlp\.gate_proj\.weight is a DeepSpeed ZeRO-3 parameter" if stage == 3 else
             r"the optimizer is DeepSpeed's DeepSpeedZeroOptimizer")
    with pytest.raises(ValueError, match=rf"skip_omitted_updates: {first}\. .*skip nothing"):
        sk.skip_omitted_updates(model, ds_opt)
    if stage == 2:   # the torch optimizer given to DeepSpeed, which replaced its parameters by flat partitions
        first = r"the optimizer updates none of the model's trainable parameters"
    with pytest.raises(ValueError, match=rf"skip_omitted_updates: {first}.*skip nothing"):
        sk.skip_omitted_updates(model, opt)
