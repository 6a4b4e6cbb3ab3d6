"""Speed of the MANO layer on the CPU: forward with joints for a batch of random poses, with the
kinematic chain walked level by level (mano.MANO, 4 steps for MANO's tree) beside the naive
joint-by-joint chain (15 steps, as in smplx's `batch_rigid_transform`). Same layer, same maths:
only the chain's grouping differs, so the difference is the chain's Python/dispatch overhead.

Run:  python scripts/bench_mano.py [--batch 1024] [--threads 1] [--mano random|synthetic|PATH] [--json OUT]
`--mano random` (default) uses random arrays of the official sizes (778 vertices, 1538 faces):
speed depends only on the sizes, so no MANO file is needed. Prints ms per batch (best and median of
`--repeats` interleaved calls) and poses/s from the best.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mano  # noqa: E402


@dataclass
class BenchConfig:
    batch: int = field(default=1024, metadata={'help': 'poses per forward call'})
    threads: int = field(default=1, metadata={'help': 'torch CPU threads'})
    repeats: int = field(default=20, metadata={'help': 'timed calls per variant'})
    mano: str = field(default='random', metadata={'help': "'random' (official sizes), 'synthetic' or a file"})
    json: str = field(default='', metadata={'help': 'also write the results to this JSON file'})


def parse_config(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    for f in fields(BenchConfig):
        ap.add_argument(f'--{f.name}', type=type(f.default), default=f.default, help=f.metadata['help'])
    return BenchConfig(**vars(ap.parse_args(argv)))


def random_official_sizes(seed=0):
    """Random arrays in MANO's layout and sizes (V = 778, F = 1538) over MANO's kinematic tree."""
    rng = np.random.default_rng(seed)
    V, parents = 778, [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
    J_regressor = rng.random((16, V)) * (rng.random((16, V)) < 0.05)
    J_regressor[:, 0] += 1e-3
    return {'v_template': rng.normal(0, 0.05, (V, 3)), 'shapedirs': rng.normal(0, 0.01, (V, 3, 10)),
            'posedirs': rng.normal(0, 0.01, (V, 3, 135)),
            'J_regressor': scipy.sparse.csc_matrix(J_regressor / J_regressor.sum(1, keepdims=True)),
            'weights': rng.dirichlet(np.ones(16) * 0.3, size=V),
            'kintree_table': np.array([parents, list(range(16))]), 'f': rng.integers(0, V, (1538, 3)),
            'hands_components': np.eye(45), 'hands_mean': np.zeros(45)}


def time_interleaved(fns, repeats):
    """Milliseconds per call of each function: best and median of `repeats` calls, run in turns so
    that load from other processes hits every variant alike (the best is the least disturbed)."""
    times = {name: [] for name in fns}
    for step in range(repeats + 3):  # the first 3 rounds warm up the allocator and the dispatcher
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if step >= 3:
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: (min(ts), float(np.median(ts))) for name, ts in times.items()}


def main(argv=None):
    cfg = parse_config(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    print(json.dumps(asdict(cfg)))
    model = random_official_sizes() if cfg.mano == 'random' else mano.load_mano(mano.find_mano(cfg.mano))
    level_wise = mano.MANO(model)
    joint_wise = mano.MANO(model)
    joint_wise.levels = [[j] for j in range(len(joint_wise.parents))]  # one joint per step
    pose, betas = torch.randn(cfg.batch, 48) * 0.5, torch.randn(cfg.batch, 10)

    def forward(layer):
        with torch.no_grad():
            return layer(pose, betas).joints

    def forward_backward(layer):
        p = pose.clone().requires_grad_()
        layer(p, betas).joints.sum().backward()

    torch.testing.assert_close(forward(level_wise), forward(joint_wise))  # same maths, same joints

    fns = {(chain, mode): (lambda fn=fn, layer=layer: fn(layer))
           for chain, layer in [('level by level', level_wise), ('joint by joint (naive)', joint_wise)]
           for mode, fn in [('forward', forward), ('forward+backward', forward_backward)]}
    rows = [{'chain': chain, 'mode': mode, 'best_ms': best, 'median_ms': median,
             'poses_per_s': cfg.batch / best * 1000}
            for (chain, mode), (best, median) in time_interleaved(fns, cfg.repeats).items()]
    print(f'MANO layer, batch {cfg.batch}, {level_wise.num_verts} vertices, CPU, {cfg.threads} thread(s), '
          f'torch {torch.__version__}')
    print(f"{'chain':<24}{'mode':<18}{'best ms':>9}{'median ms':>11}{'poses/s':>10}")
    for r in sorted(rows, key=lambda r: r['mode']):
        print(f"{r['chain']:<24}{r['mode']:<18}{r['best_ms']:>9.1f}{r['median_ms']:>11.1f}"
              f"{r['poses_per_s']:>10,.0f}")
    if cfg.json:
        with open(cfg.json, 'w') as f:
            json.dump({'config': asdict(cfg), 'torch': torch.__version__, 'vertices': level_wise.num_verts,
                       'results': rows}, f, indent=1)


if __name__ == '__main__':
    main()
