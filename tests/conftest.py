import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Tests use tiny tensors: with few shared cores, OpenMP's spinning threads make small ops
    # up to ~100x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
