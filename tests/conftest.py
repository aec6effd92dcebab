"""Project-wide test settings.

Tests run tiny models on a 2-core machine: one torch thread per process avoids the oversubscription
that makes small convolutions ~100x slower when the cores are busy, and keeps CI times steady.
Subprocesses started by tests get OMP_NUM_THREADS=1 for the same reason.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
