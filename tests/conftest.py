"""Shared pytest set-up.

`make test` runs the suite on 2 xdist workers; each worker then uses one torch thread so the two
workers do not oversubscribe a 2-core machine.
"""

import os

import matplotlib

matplotlib.use("Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
