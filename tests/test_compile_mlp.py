"""torch.compile of a model patched with replace_mlp: one graph (fullgraph=True) per distinct kept count, training
mode (forward + backward), equal to eager, statistics included."""
import copy

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import sat_kernels as sk
from sat_kernels.ops.mlp import sat_mlp_kept

from helpers import tiny_model


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_recompiles_once_per_kept_count(fresh_dynamo):
    model = sk.replace_mlp(tiny_model("llama"), 0.5)
    eager = copy.deepcopy(model)
    graphs = []

    def counting_backend(gm, example_inputs):
        if "gate_proj" in gm.code:   # the model's forward (the token masks' pre-hook is a small graph of its own)
            graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    rates = [0.5, 0.501, 0.25, 0.5, 0.0]   # kept counts of I = 136: 68, 68, 102, 68, 136 (dense)
    for step, rate in enumerate(rates):
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
        sk.set_omission_rate(model, rate)
        sk.set_omission_rate(eager, rate)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        eager_loss = eager(input_ids=ids, labels=ids).loss
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        summary = sk.sat_stats(model)["mlp"]["summary"]
        assert summary["kept_min"] == sk.num_kept(136, rate) and summary["nonfinite_total"] == 0
    assert len(graphs) == 3, f"{len(graphs)} compilations for 3 distinct kept counts"


def test_sat_mlp_kept_is_sat_mlp_at_that_count():
    x, wg, wu = torch.randn(16, 8), torch.randn(24, 8), torch.randn(24, 8)
    wd = torch.randn(8, 24)
    y, idx = sk.sat_mlp(x, wg, wu, wd, 0.5, return_indices=True)
    y_k, idx_k = sat_mlp_kept(x, wg, wu, wd, 12, return_indices=True)
    assert torch.equal(y, y_k) and torch.equal(idx, idx_k)
    for k in (0, 25, 12.0, True):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 24\]"):
            sat_mlp_kept(x, wg, wu, wd, k)
