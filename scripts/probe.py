"""Linear probe of frozen backbones: how much of the hand their features carry, without fine-tuning.

Ridge regression from a frozen ViT's patch tokens (all N of them, concatenated, so that the probe can use where a
feature sits) to two targets on a labelled set in the FreiHAND layout:
  closure    the finger pose's coefficient on the MANO model's first PCA axis (the hand opening and closing;
             synthetic.py draws its poses from the first PCA axes): held-out Pearson correlation
  joints 2D  the 21 joints in crop coordinates: held-out R^2 (1 = placed exactly, 0 = the mean placement)
The ridge is fitted on --n_fit training images from --start on, its strength chosen on the next --n_choose and
the score read on the --n_test after those. Every backbone sees the same images, so the rows compare: a random ViT
(`random`), a HandMIM backbone.pth or checkpoint.pth (pretrain.py's teacher), the ViT of a fine-tuned best.pth.
The standard self-supervised check (DINO and iBOT report linear probes), here aimed at what the mesh regressor
needs.
Each row also gives every block's mean attention distance on the test images (ViT, Dosovitskiy et al. 2021, Fig. 7):
how far, in pixels, a patch gathers from. Masked-image pretraining is meant to give a plain ViT the locality a CNN
has built in (Xie et al. 2023, "Revealing the dark secrets of masked image modeling"); attention spread evenly over
the patches is the reference.

Run:  python scripts/probe.py runs/quickstart/hands random runs/quickstart/pretrain/backbone.pth
"""
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from data import FreiHAND, resolve_mano  # noqa: E402
from engine import load_checkpoint, option, run_cli  # noqa: E402
from evaluate import load_finetuned  # noqa: E402
from what_it_reads import correlation, pca_coefficients  # noqa: E402


@dataclasses.dataclass
class ProbeConfig:
    """Ridge probes of frozen ViT features: hand closure and 2D joints on held-out images."""
    data: str = option('runs/quickstart/hands', 'a labelled set in the FreiHAND layout (its training split)',
                       positional=True)
    backbones: tuple = option(('random',), "'random', a backbone.pth, a pretrain.py checkpoint.pth (its teacher) "
                              "or a finetune.py best.pth, one row each", positional=True)
    start: int = option(0, 'first training image used (e.g. past the images a fine-tuned row was trained on)')
    n_fit: int = option(2000, 'images the ridge is fitted on')
    n_choose: int = option(500, 'images the ridge strength is chosen on (next after the fit images)')
    n_test: int = option(1000, 'images the probe is scored on (after those)')
    arch: str = option('vit_tiny', 'ViT of a random or backbone.pth row (the tiny preset)', choices=list(M.ARCHS))
    depth: int = option(6, 'ViT blocks of those rows')
    img_size: int = option(64, 'crop side of those rows (px)')
    patch_size: int = option(8, 'ViT patch size of those rows')
    seed: int = option(0, 'initialisation of the random row')
    batch_size: int = option(100, 'images per forward pass')


def load_vit(name, cfg):
    """The frozen ViT of one row and its crop size."""
    ckpt = None if name == 'random' else load_checkpoint(name)
    if isinstance(ckpt, dict) and isinstance(ckpt.get('config'), dict) and 'teacher' not in ckpt:  # finetune.py's
        model, ft = load_finetuned(name)
        return model.vit, ft['img_size']
    torch.manual_seed(cfg.seed)
    vit = M.ARCHS[cfg.arch](img_size=cfg.img_size, patch_size=cfg.patch_size, depth=cfg.depth)
    if ckpt is not None:
        _, missing, _ = vit.load_pretrained(ckpt)
        if [k for k in missing if k != 'mask_token']:
            raise ValueError(f'{name} does not fit {cfg.arch} depth {cfg.depth} patch {cfg.patch_size} at '
                             f'{cfg.img_size} px (missing {missing[:4]}): give --arch/--depth/--patch_size')
    return vit.eval(), cfg.img_size


def labelled_images(data, size, start, n, mano, batch_size):
    """Images (n, 3, S, S) of training samples start .. start + n - 1 and their targets: closure (n,) and 2D
    joints (n, 2J) in crop units [-1, 1]."""
    dataset = FreiHAND(data, 'training', size, versions=1, mano=mano)
    if len(dataset) < start + n:
        raise ValueError(f'{data} has {len(dataset)} training images, fewer than --start + --n_fit + --n_choose + '
                         f'--n_test = {start + n}')
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, start + n)), batch_size)
    images, pose, j2d = (torch.cat(x) for x in zip(*[(b['image'], b['pose'], b['joints2d']) for b in loader]))
    closure = pca_coefficients(pose[:, 3:], mano.hands_mean, mano.hands_components[:1])[:, 0]   # (n,)
    return images, closure, (j2d.double() * (2.0 / size) - 1.0).flatten(1)         # (n, 2J)


@torch.no_grad()
def features(vit, images, batch_size):
    """Concatenated patch tokens (n, N*D) of images (n, 3, S, S)."""
    return torch.cat([vit(x)[:, 1:].flatten(1) for x in images.split(batch_size)])   # (n, N*D)


@torch.no_grad()
def attention_maps(vit, images):
    """Softmax attention (B, H, T, T) of every block of `vit` on images (B, 3, S, S), [CLS] first: the blocks' own
    query and key projections, caught on their way through the forward pass (the fused kernel never forms them)."""
    qkvs = []
    hooks = [block.attn.qkv.register_forward_hook(lambda m, i, out: qkvs.append(out)) for block in vit.blocks]
    try:
        vit(images)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for qkv in qkvs:
        B, T, _ = qkv.shape
        q, k, _ = qkv.reshape(B, T, 3, vit.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)   # 3 x (B, H, T, d)
        maps.append((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1))            # (B, H, T, T)
    return maps


def attention_distance(attn, grid, patch_size):
    """Mean attention distance per head (H,) in pixels: the distance between a patch query and each patch key,
    weighted by the query's attention and averaged over queries and images. attn (B, H, T, T) with [CLS] first;
    the [CLS] query and key are left out and each query's weights over the patches renormalized."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    centres = torch.stack([xs, ys], -1).flatten(0, 1).double() * patch_size      # (N, 2) px
    a = attn[:, :, 1:, 1:].double()                                               # (B, H, N, N)
    a = a / a.sum(-1, keepdim=True)
    return (a * torch.cdist(centres, centres)).sum(-1).mean((0, 2))               # (H,)


def mean_attention_distance(vit, images, batch_size):
    """Per block, the mean attention distance (px) over its heads and the images (n, 3, S, S)."""
    sums = [torch.stack([attention_distance(a, vit.grid, vit.patch_size) for a in attention_maps(vit, x)]) * len(x)
            for x in images.split(batch_size)]                                   # per batch (L, H)
    return (sum(sums) / len(images)).mean(1).tolist()


def ridge(X, X_new):
    """Ridge regression with intercept on the rows of X, in its dual form (n samples << features) -> predict(Y,
    lam): predictions for X_new of the ridge fitted to (X, Y). One eigendecomposition of the Gram matrix serves
    every target and strength."""
    mx = X.mean(0)
    Xc = X - mx
    e, U = torch.linalg.eigh(Xc @ Xc.T)                                           # (n,), (n, n)
    KU = (X_new - mx) @ Xc.T @ U                                                  # (m, n)
    return lambda Y, lam: KU @ (U.T @ (Y - Y.mean(0)) / (e.clamp(min=0) + lam)[:, None]) + Y.mean(0)


def r2(pred, true):
    """Coefficient of determination over all columns together."""
    return 1 - float(((pred - true) ** 2).sum() / ((true - true.mean(0)) ** 2).sum())


def corr(a, b):
    return float(correlation(a[:, None], b[:, None])[0])


def probe(X, targets, n_fit, n_choose):
    """Per target (n, T): fit on the first n_fit rows, choose the strength on the next n_choose, refit on both and
    predict the rest -> [(pred, lam)]. Strengths are relative to the mean squared feature norm, so one grid
    serves every backbone."""
    X, a, b = X.double(), n_fit, n_fit + n_choose
    scale = float(((X[:a] - X[:a].mean(0)) ** 2).sum(1).mean())
    on_choose, on_test, out = ridge(X[:a], X[a:b]), ridge(X[:b], X[b:]), []
    for Y in targets:
        best = max((scale * 10.0 ** k for k in range(-4, 6)), key=lambda lam: r2(on_choose(Y[:a], lam), Y[a:b]))
        out.append((on_test(Y[:b], best), best / scale))
    return out


def probe_backbones(cfg):
    """One row per backbone: {'backbone', 'closure_corr', 'joints2d_r2', 'lam_closure', 'lam_joints2d',
    'attention_px' (per block), 'uniform_px' (attention spread evenly)}."""
    n, mano, sets, rows = cfg.n_fit + cfg.n_choose + cfg.n_test, resolve_mano(None, cfg.data), {}, []
    print(json.dumps(dataclasses.asdict(cfg)))
    for name in cfg.backbones:
        vit, size = load_vit(name, cfg)
        if size not in sets:  # one read of the images per crop size
            sets[size] = labelled_images(cfg.data, size, cfg.start, n, mano, cfg.batch_size)
        images, closure, j2d = sets[size]
        X, test = features(vit, images, cfg.batch_size), slice(cfg.n_fit + cfg.n_choose, n)
        (pred_c, lam_c), (pred_j, lam_j) = probe(X, [closure[:, None], j2d], cfg.n_fit, cfg.n_choose)
        distance = mean_attention_distance(vit, images[test], cfg.batch_size)
        T = 1 + vit.grid[0] * vit.grid[1]
        uniform = float(attention_distance(torch.ones(1, 1, T, T), vit.grid, vit.patch_size)[0])
        rows.append(dict(backbone=name, closure_corr=corr(pred_c[:, 0], closure[test]),
                         joints2d_r2=r2(pred_j, j2d[test]), lam_closure=lam_c, lam_joints2d=lam_j,
                         attention_px=distance, uniform_px=uniform))
        print(f"{name}: closure correlation {rows[-1]['closure_corr']:+.3f}  2D joints R^2 "
              f"{rows[-1]['joints2d_r2']:+.3f}  (ridge {lam_c:g}, {lam_j:g} x mean squared feature norm)\n"
              f"  mean attention distance per block: {' '.join(f'{d:.1f}' for d in distance)} px "
              f"(uniform {uniform:.1f})", flush=True)
    return rows


if __name__ == '__main__':
    sys.exit(run_cli(ProbeConfig, lambda cfg: probe_backbones(cfg) and 0))
