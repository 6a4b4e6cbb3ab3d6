"""Shared pytest setup: the repository root on sys.path, two CPU threads, fixed seeds, tiny synthetic sets, and
runs in two processes (torchrun, a free port for torch.multiprocessing)."""
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


# ----------------------------------------------------------------------------------------------------
# Two processes (gloo on the CPU)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def torchrun():
    """run(script, *args) -> subprocess.CompletedProcess: the script in 2 processes under torchrun, 1 thread each."""
    import subprocess

    def run(script, *args):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(sys.path))
        return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=120)
    return run


@pytest.fixture
def free_port():
    """A free TCP port on 127.0.0.1, for init_process_group under torch.multiprocessing.spawn."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
