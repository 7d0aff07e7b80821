"""pytest fixtures shared by several test modules (builders and loaders that are not fixtures live in helpers.py)."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny models: extra threads buy nothing there, and on a loaded machine every
    parallel op would wait for a descheduled worker thread. Restored afterwards. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
