"""DDP, FSDP2 and FSDP1 on 2 CPU processes (gloo): SAT training matches single-process training on the global batch,
and synchronized selection gives every rank the same kept neurons. Set-ups that gather a projection's weight only in
its own forward (FSDP units at the projections) are refused, and so is a DeepSpeed ZeRO-3 weight that is not whole
where SAT reads it (DeepSpeed itself: tests/test_deepspeed.py)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sat_kernels as sk

from helpers import tiny_model

WORLD, STEPS, PER_RANK = 2, 3, 2


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (WORLD * PER_RANK, 11), generator=gen) for _ in range(STEPS)]


def _kept_rows(model_or_layers):
    """Per layer, the rows of gate_proj with non-zero gradient (the kept neurons), as a bool mask; an empty tensor
    under FSDP1, which keeps the gradients in its flat parameters."""
    masks = []
    for layer in model_or_layers:
        g = layer.mlp.gate_proj.weight.grad
        if g is None:
            return torch.empty(0)
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        masks.append(g.abs().sum(1) != 0)
    return torch.stack(masks)


def _train(model, layers, batches, rank=0, world=1, hold=False):
    """SGD steps on the rank's share of each batch; with ``hold``, as PER_RANK micro-batches (micro-batch j: the j-th
    sequence of every rank) sharing the first one's selection (``sk.hold_selection``)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, kept = [], []
    for ids in batches:
        local = ids[rank * PER_RANK:(rank + 1) * PER_RANK] if world > 1 else ids
        if hold:
            loss = 0.0
            with sk.hold_selection(model):
                for j in range(PER_RANK):
                    part = model(input_ids=local[j::PER_RANK], labels=local[j::PER_RANK]).loss / PER_RANK
                    part.backward()
                    loss = loss + part.detach()
        else:
            loss = model(input_ids=local, labels=local).loss
            loss.backward()
        kept.append(_kept_rows(layers))
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), torch.stack(kept)


def _full_state(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _worker(rank, init_file, wrap, sync, out_dir, forward="sparse", hold=False):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = sk.replace_mlp(tiny_model("llama"), 0.5, sync_selection=sync, forward=forward).train()
    layers = model.model.layers
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    elif wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(layers[0])}),
                                           device_id=torch.device("cpu"))
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    losses, kept = _train(wrapped, layers, _batches(), rank, WORLD, hold)
    dist.all_reduce(losses)
    if wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType
        with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
            state = _full_state(wrapped)
    else:
        state = _full_state(model)
    torch.save({"losses": losses / WORLD, "kept": kept, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()   # both ranks done before either tears the group down (one rank once hung in the teardown)
    dist.destroy_process_group()
    # Everything is written and the group is gone: leave without the interpreter's teardown, where a rank once
    # aborted ("terminate called without an active exception", a C++ thread of the gloo / FSDP2 run at exit).
    os._exit(0)


def _spawn(tmp_path, wrap, sync, forward="sparse", hold=False):
    mp.spawn(_worker, args=(str(tmp_path / "init"), wrap, sync, str(tmp_path), forward, hold), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(forward="sparse", hold=False):
    torch.manual_seed(0)
    model = sk.replace_mlp(tiny_model("llama"), 0.5, forward=forward).train()
    keys = list(tiny_model("llama").state_dict())
    losses, kept = _train(model, model.model.layers, _batches(), hold=hold)
    return {"losses": losses, "kept": kept, "state": _full_state(model), "keys": keys}


@pytest.fixture(scope="module")
def single_process():
    return _single_process()


@pytest.mark.parametrize("wrap, forward, hold", [("ddp", "sparse", False), ("fsdp2", "sparse", False),
                                                 ("ddp", "dense", False), ("ddp", "dense", True)],
                         ids=["ddp-sparse", "fsdp2-sparse", "ddp-dense", "ddp-dense-hold_selection"])
def test_synchronized_selection_matches_single_process(tmp_path, wrap, forward, hold, single_process):
    """With ``hold``: 2 micro-batches per step under ``sk.hold_selection``; the ranks keep the set chosen from the
    first global micro-batch, as one process holding it does."""
    ranks = _spawn(tmp_path, wrap, None, forward, hold)   # sync_selection=None: on, since a 2-rank group exists
    ref = single_process if forward == "sparse" and not hold else _single_process(forward, hold)
    for out in ranks:
        assert torch.equal(out["kept"], ranks[0]["kept"]), "every rank must keep the same neurons"
        assert torch.equal(out["kept"], ref["kept"]), "the kept set must be the one of the global batch"
        assert int(out["kept"][0, 0].sum()) == sk.num_kept(136, 0.5)
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert list(out["state"]) == ref["keys"], "state_dict keys must stay the original ones"
        for name, value in ref["state"].items():
            torch.testing.assert_close(out["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp1_with_decoder_layer_units_matches_single_process(tmp_path, single_process):
    """FSDP1 gathers a decoder layer's flat parameter before the layer's forward, so SAT reads whole weights."""
    ranks = _spawn(tmp_path, "fsdp1", None)
    ref = single_process
    for out in ranks:
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert sorted(out["state"]) == sorted(ref["keys"])
        for name, value in ref["state"].items():
            torch.testing.assert_close(out["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_unsynchronized_ranks_select_from_their_own_batch(tmp_path):
    ranks = _spawn(tmp_path, "ddp", False)
    # DDP averages the ranks' gradients: without sync, rows kept by either rank get gradient (the union of two sets)
    rows_with_grad = ranks[0]["kept"].sum(-1)
    assert (rows_with_grad > sk.num_kept(136, 0.5)).any(), "local selections differ, so their union exceeds k"


def test_sync_selection_argument_errors():
    x, w = torch.randn(4, 8), [torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)]
    with pytest.raises(ValueError, match="sync_selection=True needs an initialised"):
        sk.sat_mlp(x, *w, 0.5, sync_selection=True)
    with pytest.raises(TypeError, match="sync_selection must be"):
        sk.sat_mlp(x, *w, 0.5, sync_selection="world")
    assert sk.sat_mlp(x, *w, 0.5, sync_selection=None).shape == x.shape   # auto without a process group: local


def test_projections_sharded_on_their_own_are_refused(tmp_path):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = sk.replace_mlp(tiny_model("llama"), 0.5).train()
        fully_shard(model.model.layers[0].mlp.gate_proj)
        with pytest.raises(ValueError, match="fully_shard the decoder layers"):
            model(torch.randint(0, 96, (1, 5)))
    finally:
        dist.destroy_process_group()


def test_fsdp1_units_at_the_projections_are_refused(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = sk.replace_mlp(tiny_model("llama"), 0.5).train()
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                                           device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"SATMLP\.gate_proj is an FSDP1 unit of its own .*decoder layers the "
                                             r"wrapping units.*SAT training supports DDP, FSDP2"):
            wrapped(torch.randint(0, 96, (1, 5)))
    finally:
        dist.destroy_process_group()


def _partitioned(ds_id=None):
    """A parameter as DeepSpeed ZeRO-3 leaves it outside a forward: empty, with a ``ds_id`` (no ``ds_status``)."""
    p = torch.nn.Parameter(torch.empty(0))
    if ds_id is not None:
        p.ds_id = ds_id
    return p


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_partitioned_weights_not_gathered_are_refused_in_training(kind):
    model = tiny_model("llama").train()
    if kind == "mlp":
        sk.replace_mlp(model, 0.5)
        module, name, match = model.model.layers[0].mlp, "down_proj", r"SATMLP\.down_proj\.weight is a DeepSpeed ZeRO-3"
    else:
        sk.replace_attention(model, 0.5)
        module, name, match = model.model.layers[0].self_attn, "k_proj", r"SATAttention\.k_proj\.weight is a DeepSpeed"
    getattr(module, name).weight = _partitioned(ds_id=7)
    with pytest.raises(ValueError, match=match + r" .*cannot read whole here \(it was not gathered for this forward: "
                                               r"None, 0 of \? elements here\).*without torch\.compile.*ZeRO-1/2/3"):
        model(torch.randint(0, 96, (1, 5)))
    getattr(module, name).weight = _partitioned()
    with pytest.raises(ValueError, match=rf"{name}\.weight is empty \(\(0,\)\): a partitioned parameter"):
        model(torch.randint(0, 96, (1, 5)))
