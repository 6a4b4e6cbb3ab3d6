"""Shared pytest setup: the repository root on sys.path, two CPU threads, fixed seeds, tiny synthetic sets."""
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


# ----------------------------------------------------------------------------------------------------
# Tiny synthetic sets shared by several test files
# ----------------------------------------------------------------------------------------------------

def make_synthetic_set(tmpdir, n, layout='freihand', n_eval=4, **kw):
    """A tiny synthetic set written by synthetic.synth."""
    import synthetic
    out = os.path.join(str(tmpdir), f'{layout}_{n}')
    if not os.path.isdir(out):
        synthetic.synth(out, n, layout=layout, n_eval=n_eval, **kw)
    return out


@pytest.fixture(scope='session')
def layer():
    from data import resolve_mano
    return resolve_mano('synthetic')


@pytest.fixture(scope='session')
def freihand_set(tmp_path_factory):
    return make_synthetic_set(tmp_path_factory.mktemp('synth'), 6, 'freihand', n_eval=4, versions=2)


@pytest.fixture(scope='session')
def ho3d_set(tmp_path_factory):
    return make_synthetic_set(tmp_path_factory.mktemp('synth'), 3, 'ho3d', n_eval=2)
