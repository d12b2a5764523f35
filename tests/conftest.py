"""Shared pytest set-up.

`make test` runs the suite on 2 xdist workers; each worker then uses one torch thread so the two
workers do not oversubscribe a 2-core machine.
"""

import os

import matplotlib
import pytest

matplotlib.use("Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster than two fighting over shared cores, and deterministic.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
