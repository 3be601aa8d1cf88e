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
    sk.replace_mlp(model, 0.5)
    assert _no_warning(lambda: sk.sat_stats(model)) == {"mlp": {"layers": {}, "summary": {}}}
    loss = model(**_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.warns(RuntimeWarning, match=r"1 SAT layer\(s\) \(model\.layers\.1\.mlp: 1\)"):
        stats = sk.sat_stats(model)["mlp"]
    assert stats["layers"]["model.layers.1.mlp"] == {"nonfinite": 1, "nonfinite_total": 1}
    assert stats["layers"]["model.layers.0.mlp"] == {"nonfinite": 0, "nonfinite_total": 0}
    assert stats["summary"] == {"nonfinite": 1, "nonfinite_total": 1}
    for seed in (1, 2):
        model(**_batch(seed)).loss.backward()
    stats = _no_warning(lambda: sk.sat_stats(model))["mlp"]   # once per module
    assert stats["layers"]["model.layers.1.mlp"] == {"nonfinite": 1, "nonfinite_total": 3}
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
    assert int(stats["nonfinite"]) == 2 and stats["nonfinite"].dtype == torch.int64
    dense = {}
    sk.sat_mlp(x, *w, 0.0, stats=dense)
    assert dense == {}, "nothing is scored when every neuron is kept"
