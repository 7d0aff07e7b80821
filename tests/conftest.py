"""pytest fixtures shared by several test modules (builders and loaders that are not fixtures live in helpers.py)."""

import pytest
import torch
from fake_hub import serve_fake_hub


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny models: extra threads buy nothing there, and on a loaded machine every
    parallel op would wait for a descheduled worker thread. Restored afterwards. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fake_hub():
    """The local Hub stand-in of fake_hub.py, served for one module; talk to it with `fake_hub.hub_env`."""
    with serve_fake_hub() as server:
        yield server
