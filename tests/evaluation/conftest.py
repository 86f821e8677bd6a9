import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: with several processes sharing few cores, OpenMP's spinning threads make
    # 200x200 ops ~100x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
