"""Shared pytest setup: the repository root on sys.path, two CPU threads, fixed seeds."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    import numpy as np
    import torch
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    yield
