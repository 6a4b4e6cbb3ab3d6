"""Speed of the MANO layer (mano.MANO) beside smplx's MANO on the CPU, and their agreement.

Both get the same random absolute axis-angle poses (B, 48) (zero = flat hand: smplx with
flat_hand_mean=True, no PCA) and betas (B, 10), and return vertices and joints (ours 21 with the
fingertips, smplx its 16), under no_grad with the same thread count. They run in turns, round by
round, so that load from other processes hits both alike; a timed sample is at least 1024 poses.
The table gives median poses/s, the median of the per-round speed ratios, and the max abs
difference of the vertices and 16 joints. smplx is optional (`pip install smplx`, used here only):
without it only our layer is timed.

Run:  python scripts/bench_mano.py [--batches 32 1024] [--threads 2] [--models official synthetic]
`official` is random arrays of the official sizes (778 vertices): speed depends only on the sizes,
so no MANO file is needed; `synthetic` is the synthetic hand (1128 vertices); a path reads a MANO file.
On a machine busy with other work, multi-threaded timings mostly measure waits for the other thread
(`chrt -f 10 python ...`, as root, gives the benchmark the CPUs while it runs).
"""
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mano  # noqa: E402
import synthetic  # noqa: E402
from engine import config_from_cli, option  # noqa: E402


@dataclass
class BenchConfig:
    """Speed of mano.MANO beside smplx's MANO layer on the CPU."""
    batches: tuple = option((32, 1024), 'poses per forward call')
    threads: int = option(2, 'torch CPU threads, for both layers')
    repeats: int = option(15, 'timed samples per layer and batch size')
    models: tuple = option(('official', 'synthetic'), "'official' (random arrays, 778 vertices), "
                                                      "'synthetic' (1128 vertices) or a MANO file")
    json: str = option('', 'also write the results to this JSON file')


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


def smplx_forward(model):
    """smplx's MANO on the same arrays as a function (pose, betas) -> (vertices, 16 joints), or None
    without smplx. It reads a plain pickle (synthetic.save_mano writes one: no chumpy needed)."""
    try:
        import smplx
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        synthetic.save_mano(model, os.path.join(folder, 'MANO_RIGHT.pkl'))
        layer = smplx.MANO(folder, is_rhand=True, use_pca=False, flat_hand_mean=True,
                           create_global_orient=False, create_hand_pose=False, create_betas=False,
                           create_transl=False)

    def forward(pose, betas):
        out = layer(betas=betas, global_orient=pose[:, :3], hand_pose=pose[:, 3:])
        return out.vertices, out.joints
    return forward


def time_in_turns(fns, batch, repeats):
    """Seconds per sample of each function (a sample is ceil(1024 / batch) calls), timed in turns."""
    calls, times = -(-1024 // batch), {name: [] for name in fns}
    for step in range(repeats + 2):  # 2 rounds of warm-up (allocator, dispatcher, caches)
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    return calls * batch, {name: np.array(ts) for name, ts in times.items()}


@torch.no_grad()
def main(argv=None):
    cfg = config_from_cli(BenchConfig, argv)
    torch.set_num_threads(cfg.threads)
    print(f'torch {torch.__version__}, CPU, {cfg.threads} thread(s), float32, forward with joints, no grad')
    print(f"{'model':<10}{'V':>6}{'batch':>7}{'ours/s':>10}{'smplx/s':>10}{'ratio':>7}{'max |diff| m':>14}")
    rows = []
    for name in cfg.models:
        model = random_official_sizes() if name == 'official' else \
            synthetic.synthetic_mano() if name == 'synthetic' else mano.load_mano(mano.find_mano(name))
        ours, theirs = mano.MANO(model), smplx_forward(model)
        for batch in cfg.batches:
            g = torch.Generator().manual_seed(batch)
            pose, betas = 0.5 * torch.randn(batch, 48, generator=g), torch.randn(batch, 10, generator=g)
            fns = {'ours': lambda: ours(pose, betas)}
            row = dict(model=name, vertices=ours.num_verts, batch=batch)
            if theirs is not None:
                fns['smplx'] = lambda: theirs(pose, betas)
                (v, j), (v_ref, j_ref) = ours(pose, betas), theirs(pose, betas)
                row['max_abs_diff_m'] = max((v - v_ref).abs().max().item(),
                                            (j[:, mano.FREIHAND_TO_MANO[:16]] - j_ref).abs().max().item())
            poses, times = time_in_turns(fns, batch, cfg.repeats)
            row.update({f'{k}_poses_per_s': poses / float(np.median(t)) for k, t in times.items()})
            if theirs is not None:  # the median of the per-round ratios: load that drifts cancels out
                row['ratio'] = float(np.median(times['smplx'] / times['ours']))
            rows.append(row)
            print(f"{name:<10}{ours.num_verts:>6}{batch:>7}{row['ours_poses_per_s']:>10,.0f}"
                  + (f"{row['smplx_poses_per_s']:>10,.0f}{row['ratio']:>7.2f}{row['max_abs_diff_m']:>14.1e}"
                     + ('  DIFFERENT (> 1e-6 m)' if row['max_abs_diff_m'] > 1e-6 else '')
                     if theirs is not None else '  (smplx not installed: pip install smplx to compare)'),
                  flush=True)
    if cfg.json:
        with open(cfg.json, 'w') as f:
            json.dump({'config': vars(cfg), 'torch': torch.__version__, 'results': rows}, f, indent=1)


if __name__ == '__main__':
    main()
