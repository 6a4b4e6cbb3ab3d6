"""Signs that HandMIM pretraining learns, on a small synthetic hand set, on CPU.

1. Pretrains a small ViT (ViT-Tiny width, 4 blocks, 64 px, 8 px patches) with pretrain.py for a few
   hundred steps on a few hundred synthetic hands and prints the loss curves from log.jsonl: the
   patch-MIM and pixel losses should fall.
2. Collapse check: the entropy of the centred teacher [CLS] distribution (log.jsonl 't_entropy'; 0 =
   one-hot collapse, log(out_dim) = uniform collapse) and the spread of the PKA pseudo keypoints
   across images ('kp_spread'; 0 = every image gets the same keypoints).
3. Equivariance: on held-out images, the teacher's pseudo keypoints of a rotated view are compared
   with the keypoints of the upright view carried through the rotation. The error is reported
   next to the error of keypoints that would not move at all, for the trained and an untrained
   teacher.

Run:  python scripts/pretrain_signs.py --out runs/signs            (about 2 minutes on 2 CPU cores)
"""
import json
import math
import os
import sys

from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import pretrain as P  # noqa: E402


def curve(log, key, n_points=7, window=20):
    """Window means of log[key] at n_points evenly spaced steps."""
    values = [r[key] for r in log if key in r]
    idx = [round(i * (len(values) - window) / (n_points - 1)) for i in range(n_points)]
    return [(log[i]['step'], sum(values[i:i + window]) / window) for i in idx]


@torch.no_grad()
def keypoint_equivariance(vit, paths, img_size, angles):
    """Mean distance (in view pixels) between the keypoints of a rotated view and the upright view's
    keypoints mapped by the rotation, and the same for keypoints assumed not to move."""
    import data as D
    grid = (img_size // vit.patch_size,) * 2
    err, static = {a: [] for a in angles}, {a: [] for a in angles}
    for path in paths:
        src = D.to_tensor(D.load_rgb(path))
        H, W = src.shape[-2:]
        centre, side = ((W - 1) / 2, (H - 1) / 2), min(H, W)
        views = {a: D.similarity(centre, side, math.radians(a), img_size) for a in (0, *angles)}
        x = torch.stack([D.normalize(D.warp_affine(src, A, (img_size, img_size))) for A in views.values()])
        _, attn = vit(x, return_attn=True)
        kp = P.attention_keypoints(attn, grid)                                   # (1+A, K, 2)
        A0 = views[0][None, :2].float()
        for i, a in enumerate(angles, start=1):
            mapped = P.map_between_views(kp[:1], A0, img_size, views[a][None, :2].float(), img_size)
            err[a].append(float((mapped - kp[i:i + 1]).norm(dim=-1).mean()) * img_size / 2)
            static[a].append(float((kp[:1] - kp[i:i + 1]).norm(dim=-1).mean()) * img_size / 2)
    mean = lambda v: sum(v) / len(v)
    return {a: (mean(err[a]), mean(static[a])) for a in angles}


@dataclass
class SignsConfig:
    """Signs that HandMIM pretraining learns, on a small synthetic hand set, on CPU."""
    out: str = engine.option('runs/signs', 'working folder')
    data: str = engine.option('', 'FreiHAND-layout folder (default: synthesize one in OUT/hands)')
    n: int = engine.option(400, 'synthetic training images')
    epochs: int = engine.option(12, 'pretraining epochs')
    batch_size: int = engine.option(16, 'images per step')
    blr: float = engine.option(4e-3, 'base lr (lr = blr * batch / 256)')
    momentum: float = engine.option(0.98, 'EMA momentum at the start')
    threads: int = engine.option(1, 'torch threads')


def main(argv=None):
    args = engine.config_from_cli(SignsConfig, argv)
    torch.set_num_threads(args.threads)
    import synthetic
    import model as M
    data = args.data or os.path.join(args.out, 'hands')
    if not os.path.isdir(data):
        synthetic.synth(data, args.n, n_eval=40, seed=1)
    run = os.path.join(args.out, 'pretrain')
    flags = ['--data', data, '--output_dir', run, '--arch', 'vit_tiny', '--depth', '4', '--img_size', '64',
             '--patch_size', '8', '--out_dim', '1024', '--head_hidden', '512', '--batch_size', str(args.batch_size),
             '--epochs', str(args.epochs), '--warmup_epochs', '1', '--warmup_teacher_temp_epochs', '3',
             '--blr', str(args.blr), '--momentum_teacher', str(args.momentum), '--log_every', '1', '--workers', '1']
    if not os.path.exists(os.path.join(run, 'backbone.pth')):
        resume = os.path.join(run, 'checkpoint.pth')
        if P.main(flags + (['--resume', resume] if os.path.exists(resume) else [])) != 0:
            sys.exit('pretraining did not finish')
    log = [json.loads(line) for line in open(os.path.join(run, 'log.jsonl'))]

    print(f'\n{len(log)} steps; window means (20 steps) at evenly spaced steps:')
    for key in ('loss', 'mim', 'pix', 'cls', 'pka', 't_entropy', 'kp_spread'):
        print(f'  {key:10s}' + ' '.join(f'{s:4d}:{v:7.3f}' for s, v in curve(log, key)))
    print(f'  (t_entropy bounds: 0 = one-hot collapse, log(1024) = {math.log(1024):.2f} = uniform collapse)')

    eval_dir = os.path.join(data, 'evaluation', 'rgb')   # held out: pretraining never sees these
    paths = sorted(os.path.join(eval_dir, f) for f in os.listdir(eval_dir))
    angles = (15, 30, 60, 90)
    torch.manual_seed(0)
    trained = torch.load(os.path.join(run, 'backbone.pth'), weights_only=True)
    for name, state in (('untrained', None), ('trained', trained)):
        vit = M.vit_tiny(depth=4, img_size=64, patch_size=8).eval()
        if state is not None:
            vit.load_state_dict(state)
        res = keypoint_equivariance(vit, paths, 64, angles)
        print(f'\n{name} teacher, {len(paths)} held-out images: keypoint error (view px, 64 px views) '
              f'after rotating the image, equivariant prediction vs "keypoints do not move":')
        for a, (e, s) in res.items():
            print(f'  {a:3d} deg: mapped-with-the-rotation {e:5.2f} px   not-moving {s:5.2f} px')


if __name__ == '__main__':
    main()
