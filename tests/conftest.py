import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    """Fill fresh ``torch.empty`` allocations with NaN so an unwritten output element cannot pass a test."""
    import torch.utils.deterministic as det

    old_flag, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_flag, warn_only=old_warn)
