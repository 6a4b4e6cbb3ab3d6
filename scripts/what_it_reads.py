"""What a fine-tuned network has learned to read, on the validation split of its own training set.

  per PCA axis   the predicted finger pose projected onto the MANO model's PCA pose axes (synthetic.py draws
                 the first --pose_components of them): the spread of the true and the predicted coefficient
                 and their correlation (1 = the axis is read, 0 = not at all)
  2D joints      mean L1 (crop coordinates in [-1, 1]) of the regressor's 2D joints and of the argmax of its
                 heat maps, next to the same for the mean 2D joint positions of the training labels
Together with `python scripts/synth_reference.py` (what reading the first axis alone would score) this tells
whether the error is in the image features (joints not placed) or in the regressor.

Needs MANO labels on the training set (synthetic.py's sets, FreiHAND, HO3Dv2's train split).

Run:  python scripts/what_it_reads.py runs/quickstart/finetune               # finetune.py's output folder
"""
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune  # noqa: E402
from engine import option, run_cli  # noqa: E402
from evaluate import load_finetuned  # noqa: E402
from mano import matrix_to_axis_angle  # noqa: E402


@dataclass
class ReadsConfig:
    """PCA-axis correlations and 2D joint errors of a fine-tuned model on its validation split."""
    run: str = option('runs/quickstart/finetune', "finetune.py's --output_dir (its best.pth)", positional=True)
    n: int = option(400, 'validation hands scored (the first n of the split)')
    axes: int = option(6, 'PCA axes reported')
    batch_size: int = option(50, 'images per forward pass')


def pca_coefficients(fingers, mean, components):
    """Coordinates (B, K) of finger poses (B, 45) on the PCA axes (K, 45) around `mean` (45,): least squares,
    so the axes need not be orthonormal."""
    return torch.linalg.lstsq(components.T.double(), (fingers - mean).double().T).solution.T  # (B, K)


def heatmap_argmax(logits, crop_size):
    """Peak of each heat map (B, J, h, w) -> (B, J, 2) in crop pixels: finetune.heatmap_loss's map inverted."""
    B, J, h, w = logits.shape
    idx = logits.flatten(2).argmax(-1)                                          # (B, J)
    uv = torch.stack([idx % w, idx // w], -1).to(logits.dtype)                  # (B, J, 2) map px
    return (uv + 0.5) * (crop_size / torch.tensor([w, h], dtype=logits.dtype)) - 0.5


def correlation(a, b):
    """Pearson correlation of the columns of a and b (B, K) -> (K,)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp(min=1e-12)


@torch.no_grad()
def what_it_reads(cfg):
    """{'axes': [{'axis', 'true_std', 'pred_std', 'corr'}], 'j2d_l1', 'heatmap_l1', 'mean_j2d_l1'}."""
    model, ft = load_finetuned(os.path.join(cfg.run, 'best.pth'))
    fields = {f.name for f in dataclasses.fields(finetune.FinetuneConfig)}
    train, val = finetune.make_datasets(finetune.FinetuneConfig(**{k: v for k, v in ft.items() if k in fields}))
    val = torch.utils.data.Subset(val, range(min(cfg.n, len(val))))
    mano, K = model.mano, cfg.axes
    components, mean = mano.hands_components[:K], mano.hands_mean                # (K, 45), (45,)
    pred, true, j2d, hm, gt2d = [], [], [], [], []
    for b in torch.utils.data.DataLoader(val, batch_size=cfg.batch_size):
        S = b['image'].shape[-1]
        out = model(b['image'])[-1]
        fingers = matrix_to_axis_angle(out['rotmat'][:, 1:]).flatten(1)         # (B, 45)
        pred.append(pca_coefficients(fingers, mean, components))
        true.append(pca_coefficients(b['pose'][:, 3:], mean, components))
        uv = b['joints2d'] * (2.0 / S) - 1.0                                    # (B, J, 2) in [-1, 1]
        gt2d.append(uv)
        j2d.append((out['joints2d'] - uv).abs().mean((1, 2)))
        if 'heatmaps' in out:
            peak = heatmap_argmax(out['heatmaps'].float(), S)                     # (B, J, 2) px
            hm.append((peak * (2.0 / S) - 1.0 - uv).abs().mean((1, 2)))
    pred, true, gt2d = torch.cat(pred), torch.cat(true), torch.cat(gt2d)
    mean2d = torch.stack([train.dataset[i]['joints2d'] for i in train.indices[:cfg.n]]).mean(0)
    mean2d = mean2d * (2.0 / ft['img_size']) - 1.0                              # (J, 2)
    corr = correlation(pred, true)
    return dict(axes=[dict(axis=k, true_std=float(true[:, k].std()), pred_std=float(pred[:, k].std()),
                           corr=float(corr[k])) for k in range(K)],
                j2d_l1=float(torch.cat(j2d).mean()), heatmap_l1=float(torch.cat(hm).mean()) if hm else None,
                mean_j2d_l1=float((gt2d - mean2d).abs().mean()))


def report(cfg):
    r = what_it_reads(cfg)
    print(json.dumps(dataclasses.asdict(cfg)))
    for a in r['axes']:
        print(f"PCA axis {a['axis']}: true std {a['true_std']:.3f}  predicted std {a['pred_std']:.3f}  "
              f"correlation {a['corr']:+.2f}")
    hm = 'none' if r['heatmap_l1'] is None else f"{r['heatmap_l1']:.3f}"
    print(f"2D joints L1 (crop units): regressor {r['j2d_l1']:.3f}  heat-map argmax {hm}  "
          f"mean 2D joints of the training labels {r['mean_j2d_l1']:.3f}")


if __name__ == '__main__':
    sys.exit(run_cli(ReadsConfig, report))
