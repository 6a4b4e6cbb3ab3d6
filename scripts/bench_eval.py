"""Time the official-metric computation of evaluate.py at FreiHAND evaluation size.

Builds 3960 random hand-sized GT samples (21 joints, 778 vertices) and predictions that differ from them
by a random similarity transform plus ~5 mm noise (so F@5/F@15 are not trivial), then times each stage
of `evaluate.score` (wall and CPU seconds) and, with --io, writing and reading back the official pred.json.
The KD-tree searches run in threads (evaluate.nn_distances); the two nearest-neighbour lines show one
query direction of the aligned F-score with 1 and 2 threads.

    python scripts/bench_eval.py [--n 3960] [--verts 778] [--threads 2] [--io]

Shapes: B samples, V vertices.
"""
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from engine import config_from_cli, option  # noqa: E402  (after the sys.path line, so the script runs from any folder)


def random_rotations(rng, n):
    """(n,3,3) uniformly random proper rotations (QR of Gaussian matrices, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    return q * np.sign(np.linalg.det(q))[:, None, None]


def make_data(n, n_verts, seed=0):
    """GT hands ~10 cm across, 0.5 m in front of the camera; predictions = similarity(GT) + 5 mm noise."""
    rng = np.random.default_rng(seed)
    verts = rng.normal(size=(n, n_verts, 3)) * 0.03 + np.array([0, 0, 0.5])   # (B, V, 3)
    xyz = verts[:, :21]                                                        # (B, 21, 3)
    R, s = random_rotations(rng, n), rng.uniform(0.8, 1.2, (n, 1, 1))
    t = rng.normal(size=(n, 1, 3)) * 0.02

    def similar(x):
        return s * x @ R.transpose(0, 2, 1) + t + rng.normal(size=x.shape) * 0.005
    return similar(xyz), similar(verts), xyz, verts


def timed(name, fn, times):
    """Run fn, record (wall seconds, CPU seconds of this process over all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
    return out


@dataclass
class BenchEvalConfig:
    """Time the official-metric computation of evaluate.py at FreiHAND evaluation size."""
    n: int = option(3960, 'samples (FreiHAND evaluation split: 3960)')
    verts: int = option(778, 'vertices per mesh (MANO: 778)')
    threads: int = option(2, 'torch threads (the SVDs)')
    io: bool = option(False, 'also time writing/reading pred.json + pred.zip')


def main(argv=None):
    args = config_from_cli(BenchEvalConfig, argv)
    torch.set_num_threads(args.threads)
    pred_xyz, pred_verts, gt_xyz, gt_verts = make_data(args.n, args.verts)

    times = {}
    xyz_pa = timed('procrustes joints', lambda: evaluate.procrustes(pred_xyz, gt_xyz), times)
    verts_pa = timed('procrustes vertices', lambda: evaluate.procrustes(pred_verts, gt_verts), times)
    timed('errors + AUC (joints, vertices)', lambda: [evaluate.auc_pck(evaluate.point_errors(a, b)) for a, b in
                                                      ((xyz_pa, gt_xyz), (verts_pa, gt_verts))], times)
    timed('F-score (unaligned + aligned)', lambda: [evaluate.f_score(a, gt_verts) for a in (pred_verts, verts_pa)],
          times)
    timed('  nearest neighbours, 1 thread', lambda: evaluate.nn_distances(verts_pa, gt_verts, 0.0225, workers=1), times)
    timed('  nearest neighbours, 2 threads', lambda: evaluate.nn_distances(verts_pa, gt_verts, 0.0225, workers=2),
          times)
    metrics = timed('score() total', lambda: evaluate.score(pred_xyz, pred_verts, gt_xyz, gt_verts), times)
    if args.io:
        with tempfile.TemporaryDirectory() as d:
            path = timed('write_submission', lambda: evaluate.write_submission(pred_xyz, pred_verts, d), times)
            timed('load_prediction', lambda: evaluate.load_prediction(path), times)
            size = os.path.getsize(path) / 2 ** 20
            zsize = os.path.getsize(os.path.join(d, 'pred.zip')) / 2 ** 20
            print(f'pred.json {size:.0f} MiB, pred.zip {zsize:.0f} MiB')

    print(f'{args.n} samples x {args.verts} vertices, {args.threads} threads '
          f'(PA-MPVPE {1000 * metrics["pa_mpvpe"]:.2f} mm, F@5 {metrics["pa_f5"]:.3f}, F@15 {metrics["pa_f15"]:.3f})')
    print(f'  {"stage":34s}{"wall s":>8s}{"CPU s":>8s}   (the machine may be shared: compare CPU seconds)')
    for name, (wall, cpu) in times.items():
        print(f'  {name:34s}{wall:8.2f}{cpu:8.2f}')


if __name__ == '__main__':
    main()
