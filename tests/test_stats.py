"""Selection statistics (sk.sat_stats): non-finite scores, what the last training forward kept."""
import warnings

import pytest
import torch

import sat_kernels as sk

from helpers import tiny_model


def _batch(seed=0):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_nan_scores_hidden_by_selection_are_counted_and_warned_once():
    """A NaN row of gate_proj ranks lowest and is omitted: the SAT loss stays finite while the dense (eval) loss is
    NaN. sat_stats counts the NaN score of that layer and warns once."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3] = float("nan")
    sk.replace_mlp(model, 0.5, forward="sparse")   # the exact forward ("dense") would show the NaN in the loss
    assert _no_warning(lambda: sk.sat_stats(model)) == {"mlp": {"layers": {}, "summary": {}}}
    loss = model(**_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.warns(RuntimeWarning, match=r"1 SAT layer\(s\) \(model\.layers\.1\.mlp: 1\)"):
        stats = sk.sat_stats(model)["mlp"]
    nonfinite = lambda layer: {key: layer[key] for key in ("nonfinite", "nonfinite_total")}  # noqa: E731
    assert nonfinite(stats["layers"]["model.layers.1.mlp"]) == {"nonfinite": 1, "nonfinite_total": 1}
    assert nonfinite(stats["layers"]["model.layers.0.mlp"]) == {"nonfinite": 0, "nonfinite_total": 0}
    assert nonfinite(stats["summary"]) == {"nonfinite": 1, "nonfinite_total": 1}
    for seed in (1, 2):
        model(**_batch(seed)).loss.backward()
    stats = _no_warning(lambda: sk.sat_stats(model))["mlp"]   # once per module
    assert nonfinite(stats["layers"]["model.layers.1.mlp"]) == {"nonfinite": 1, "nonfinite_total": 3}
    model.eval()
    assert torch.isnan(model(**_batch()).loss)
    assert _no_warning(lambda: sk.sat_stats(model))["mlp"] == stats, "eval forwards leave the statistics alone"
    model.double()   # the counter stays an integer on the weights' device
    assert _no_warning(lambda: sk.sat_stats(model))["mlp"] == stats


def test_sat_mlp_fills_stats():
    x = torch.randn(16, 8)
    w = [torch.randn(24, 8), torch.randn(24, 8), torch.randn(8, 24)]
    w[1][[2, 5]] = float("nan")
    stats = {}
    sk.sat_mlp(x, *w, 0.5, stats=stats)
    assert int(stats["nonfinite"]) == 2 and stats["nonfinite"].dtype == torch.int64 and stats["kept"] == 12
    assert stats["kept_mass"].dtype == torch.float32 and 0.5 < float(stats["kept_mass"]) <= 1
    dense = {}
    sk.sat_mlp(x, *w, 0.0, stats=dense)
    assert dense == {}, "nothing is scored when every neuron is kept"


@pytest.mark.parametrize("unit", ["head", "group"])
def test_sat_attention_fills_stats(unit):
    """Over units: a NaN column of w_o makes one head (one KV group) score NaN under "contrib"; kept_mass is the fp64
    mass of the kept units among the finite scores."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=gen)
    w = [torch.randn(rows, 16, generator=gen) / 4 for rows in (16, 8, 8, 16)]   # H 4, G 2, d 4
    w[3][:, 5] = float("nan")                                                 # head 1, in group 0
    stats = {}
    _, heads = sk.sat_attention(x, *w, 0.5, num_heads=4, num_kv_heads=2, metric="contrib", unit=unit,
                                return_indices=True, stats=stats)
    assert stats["kept"] == (2 if unit == "head" else 1)
    assert int(stats["nonfinite"]) == 1 and stats["nonfinite"].dtype == torch.int64
    scores = sk.head_scores(x.double(), *(t.double() for t in w), num_heads=4, num_kv_heads=2, metric="contrib",
                            unit=unit)
    kept = heads if unit == "head" else heads[::2] // 2
    mass = (scores[kept].sum() / scores[torch.isfinite(scores)].sum()).item()
    assert stats["kept_mass"].dtype == torch.float32 and float(stats["kept_mass"]) == pytest.approx(mass, rel=1e-5)
    dense = {}
    sk.sat_attention(x, *w, 0.0, num_heads=4, num_kv_heads=2, unit=unit, stats=dense)
    assert dense == {}, "nothing is scored when every unit is kept"


@pytest.mark.parametrize("metric", ["l2", "contrib"])
def test_kept_count_and_mass_per_layer(metric):
    model = sk.replace_mlp(tiny_model("llama"), 0.25, metric=metric)
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, sk.SATMLP):
            module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
    model(**_batch()).loss.backward()
    stats = sk.sat_stats(model)["mlp"]
    k = sk.num_kept(136, 0.25)
    masses = []
    for name, x in inputs.items():
        mlp = model.get_submodule(name)
        w = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        scores = sk.neuron_scores(x.double(), *(t.double() for t in w), metric=metric)
        mass = (scores[sk.select_neurons(scores, k)].sum() / scores.sum()).item()
        layer = stats["layers"][name]
        assert layer["kept"] == k and layer["units"] == 136 and layer["nonfinite"] == 0
        assert layer["kept_mass"] == pytest.approx(mass, rel=1e-5) and 0.75 < layer["kept_mass"] < 1
        masses.append(layer["kept_mass"])
    assert len(masses) == 2
    assert stats["summary"] == {"kept_mean": k, "kept_min": k, "kept_mass_mean": pytest.approx(sum(masses) / 2),
                                "kept_mass_min": min(masses), "nonfinite": 0, "nonfinite_total": 0}
    sk.set_omission_rate(model, 0.0)   # a dense training forward scores nothing and keeps everything
    model(**_batch())
    assert sk.sat_stats(model)["mlp"]["summary"] == {"kept_mean": 136, "kept_min": 136, "kept_mass_mean": 1.0,
                                                     "kept_mass_min": 1.0, "nonfinite": 0, "nonfinite_total": 0}


def test_no_sat_mlp_modules():
    assert sk.sat_stats(tiny_model("llama")) == {}


def test_counter_follows_the_weights_off_the_meta_device():
    """Patched before materializing (meta), then to_empty(): the non-finite counter moves with the weights."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    sk.replace_mlp(model, 0.5)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model(**_batch())
    assert sk.sat_stats(model)["mlp"]["summary"]["nonfinite_total"] == 0


def _attention_inputs(model):
    """The keyword arguments of every SAT attention module's next forward, by module name."""
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, sk.SATAttention):
            module.register_forward_pre_hook(lambda m, args, kwargs, name=name: inputs.__setitem__(name, kwargs),
                                             with_kwargs=True)
    return inputs


def _fp64_unit_scores(sat, kwargs, metric):
    """The unit scores of a SAT attention module's forward, recomputed in fp64 from its inputs."""
    double = lambda t: None if t is None else t.detach().double()  # noqa: E731
    mask = kwargs["attention_mask"]
    cos, sin = kwargs["position_embeddings"]
    norm = {"q_norm_weight": double(sat.q_norm.weight), "k_norm_weight": double(sat.k_norm.weight)} \
        if hasattr(sat, "q_norm") else {}
    return sk.head_scores(
        double(kwargs["hidden_states"]), *(double(getattr(sat, f"{p}_proj").weight) for p in "qkvo"),
        num_heads=sat.num_heads, num_kv_heads=sat.num_kv_heads, cos=double(cos), sin=double(sin),
        attention_mask=mask, causal=mask is None, scale=sat.scale, **norm, norm_eps=sat.norm_eps, metric=metric,
        unit=sat.unit)


@pytest.mark.parametrize("family, unit, rate, metric", [("llama", "head", 0.25, "l2"), ("qwen3", "group", 0.5, "l2"),
                                                        ("llama", "head", 0.5, "contrib")])
def test_attention_kept_count_and_mass_per_layer(family, unit, rate, metric):
    """kept_mass of each attention layer against the fp64 unit scores of its inputs (4 heads, 2 KV groups; Qwen3
    with q/k norms), the summary over layers, then a dense training step."""
    model = sk.replace_attention(tiny_model(family), rate, unit=unit, metric=metric).train()
    inputs = _attention_inputs(model)
    model(**_batch()).loss.backward()
    stats = sk.sat_stats(model)
    assert list(stats) == ["attention"]
    stats = stats["attention"]
    units = 4 if unit == "head" else 2
    k = sk.num_kept(units, rate)
    masses = []
    for name, kwargs in inputs.items():
        scores = _fp64_unit_scores(model.get_submodule(name), kwargs, metric)
        mass = (scores[sk.select_neurons(scores, k)].sum() / scores.sum()).item()
        layer = stats["layers"][name]
        assert layer["kept"] == k and layer["units"] == units and layer["nonfinite"] == 0
        assert layer["kept_mass"] == pytest.approx(mass, rel=1e-5) and 0 < layer["kept_mass"] < 1
        masses.append(layer["kept_mass"])
    assert len(masses) == 2
    assert stats["summary"] == {"kept_mean": k, "kept_min": k, "kept_mass_mean": pytest.approx(sum(masses) / 2),
                                "kept_mass_min": min(masses), "nonfinite": 0, "nonfinite_total": 0}
    sk.set_omission_rate(model, attention=0.0)   # a dense training forward scores nothing and keeps every unit
    model(**_batch())
    assert sk.sat_stats(model)["attention"]["summary"] == {
        "kept_mean": units, "kept_min": units, "kept_mass_mean": 1.0, "kept_mass_min": 1.0, "nonfinite": 0,
        "nonfinite_total": 0}


def test_attention_nan_scores_are_counted_and_warned_once():
    """A NaN row of v_proj makes both heads of KV group 0 score NaN; they rank lowest and are omitted, so the SAT loss
    stays finite while the dense (eval) loss is NaN. MLP and attention statistics are read side by side; the
    attention layer is warned about once."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0] = float("nan")
    sk.replace_attention(sk.replace_mlp(model, 0.5, forward="sparse"), 0.5, forward="sparse")
    assert _no_warning(lambda: sk.sat_stats(model)) == {"mlp": {"layers": {}, "summary": {}},
                                                        "attention": {"layers": {}, "summary": {}}}
    loss = model(**_batch()).loss
    assert torch.isfinite(loss)
    with pytest.warns(RuntimeWarning, match=r"unit \(head or KV group\) scores in 1 SAT layer\(s\) "
                                            r"\(model\.layers\.1\.self_attn: 2\)") as caught:
        stats = sk.sat_stats(model)
    assert len(caught) == 1, "the MLP scores are finite"
    nonfinite = lambda layer: {key: layer[key] for key in ("nonfinite", "nonfinite_total")}  # noqa: E731
    attention = stats["attention"]
    assert nonfinite(attention["layers"]["model.layers.1.self_attn"]) == {"nonfinite": 2, "nonfinite_total": 2}
    assert nonfinite(attention["layers"]["model.layers.0.self_attn"]) == {"nonfinite": 0, "nonfinite_total": 0}
    assert nonfinite(attention["summary"]) == {"nonfinite": 2, "nonfinite_total": 2}
    assert attention["layers"]["model.layers.1.self_attn"]["kept_mass"] == 1.0, "the two finite heads are kept"
    assert nonfinite(stats["mlp"]["summary"]) == {"nonfinite": 0, "nonfinite_total": 0}
    for seed in (1, 2):
        model(**_batch(seed))
    attention = _no_warning(lambda: sk.sat_stats(model))["attention"]   # once per module
    assert nonfinite(attention["layers"]["model.layers.1.self_attn"]) == {"nonfinite": 2, "nonfinite_total": 6}
    model.eval()
    assert torch.isnan(model(**_batch()).loss)
    assert _no_warning(lambda: sk.sat_stats(model))["attention"] == attention, "eval forwards leave them alone"
    model.double()   # the counter stays an integer on the weights' device
    assert _no_warning(lambda: sk.sat_stats(model))["attention"] == attention
