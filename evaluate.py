"""Official FreiHAND / HO3Dv2 hand-mesh metrics, official submission files, inference and a demo.

HandMIM (Liu et al., arXiv 2307.16061) reports PA-MPVPE 6.29 mm on FreiHAND and 8.00 mm on HO3Dv2, as
computed by the benchmarks' own scorers: lmb-freiburg/freihand `eval.py` + `utils/eval_util.py` and
shreyashampali/ho3d `eval.py`. This file re-implements those scorers as batched numpy/torch code and
keeps every convention of theirs, quirks included:

  procrustes   `align_w_scale`: centre both sets, divide each by its Frobenius norm (+1e-8), rotation
               from the SVD of gt^T pred WITHOUT the det(R) = +1 correction (a mirrored prediction is
               aligned perfectly), scale = sum of singular values. Joints and vertices separately.
  MPJPE/MPVPE  per point: mean over samples; then mean over points (`EvalUtil.get_measures`).
  AUC          per point: PCK curve with `<=` on linspace(0, 50 mm, 100), trapezoid integral divided by the
               trapezoid integral of 1; then mean over points.
  F@5, F@15    nearest-neighbour distances both ways (Open3D in the official code, a KD-tree here),
               strict `<`, F = 2PR / (P + R) (0 if P + R = 0); mean over samples.
  ST-MPJPE     HO3D's `align_sc_tr`: scale the prediction so its wrist -> middle-MCP bone has the GT length,
               then move its wrist onto the GT wrist.

Files: a submission is `pred.json` = [xyz_list, verts_list] in metres (+ `pred.zip` holding it). FreiHAND:
FreiHAND joint order, OpenCV camera frame, 3960 samples. HO3Dv2: MANO+tips joint order, OpenGL frame (y, z
negated), absolute positions (wrist from the evaluation meta), 11524 samples. Ground truth is read from a
dataset folder's evaluation_xyz.json / evaluation_verts.json in the same convention as its submissions
(FreiHAND ships them; for HO3D the official GT release and data.py's synthetic HO3D sets). Everything in
this file works in the internal convention (FreiHAND order, OpenCV) and converts at the file boundary.

Run:
    python evaluate.py --data FreiHAND_pub_v2 --checkpoint runs/finetune/best.pth --out out/   # submission
        (HO3Dv2: --data HO3D_v2; `--mean_hand` instead of a checkpoint: the mean-hand baseline); scored
        (scores.json, errors.png) when the evaluation ground truth is in the folder
    python evaluate.py --score out/pred.json --gt FreiHAND_pub_v2     # or pred.zip; --layout ho3d
    python evaluate.py --images DIR --checkpoint CKPT --out DIR [--left] [--side] [--focal 2.34]
        demo (see the DEMO section): per hand crop a picture, an OBJ mesh and the MANO fit (.npz)
    python evaluate.py --plot runs/finetune                           # training curves of a run
In Python: `score(pred_xyz, pred_verts, gt_xyz, gt_verts)` -> dict in metres; `write_submission(...)`;
`load_finetuned(path)` and `predict(model, loader)`: a fine-tuned network and its camera-frame meshes.
The Procrustes alignment itself is `engine.procrustes` (fine-tuning validates with it too).

Shapes (README legend): B samples, J = 21 joints (internal FreiHAND order unless a name says HO3D), V vertices;
here n points of a set (J or V), m points of the other set, T thresholds.
"""
import dataclasses
import json
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from data import HO3D, FreiHAND, resolve_mano
from engine import (as_f64, atomic_open, autocast, load_checkpoint, option, procrustes, procrustes_params, run_cli,
                    read_json, write_atomic)
from mano import FREIHAND_TO_MANO, MANO_TO_FREIHAND
from model import build_regressor, camera_translation
from plot import plot_errors, plot_run, run_demo

F_THRESHOLDS = (0.005, 0.015)     # metres: the official `f_threshs`
AUC_RANGE = (0.0, 0.05, 100)      # metres: the official `get_measures(0.0, 0.05, 100)`
ST_BONE = (0, 9)                  # wrist, middle MCP (internal order) = joints 0 and 4 of HO3D's order
OPENGL = np.array([1.0, -1.0, -1.0])  # HO3D's OpenGL camera frame = OpenCV with y and z negated
LAYOUTS = ('freihand', 'ho3d')


# ----------------------------------------------------------------------------------------------------
# METRICS (pure functions, metres)

def _align_by_keypoint_transform(verts, pred_xyz, gt_xyz):
    """Official `align_by_trafo`: vertices aligned with the transform estimated from the joints.

    The official scorer uses it only when the predicted mesh has a different vertex count than the GT
    (it then also skips the mesh errors). Replicated verbatim, quirks included: it computes
        (v - mean(v)) R^T s |gt_xyz_c| + mean(gt_xyz) - mean(pred_xyz) + mean(v)
    where the joint transform would be (v - mean(pred_xyz)) / |pred_xyz_c| R^T s |gt_xyz_c| + mean(gt_xyz)."""
    _, R, s, gt_norm, gt_mean, pred_mean = procrustes_params(*map(torch.from_numpy, (pred_xyz, gt_xyz)))
    v = torch.from_numpy(verts)
    v_mean = v.mean(1, keepdim=True)
    return ((v - v_mean) @ R.transpose(1, 2) * s * gt_norm + (gt_mean - pred_mean) + v_mean).numpy()


def align_scale_translation(pred, gt, bone=ST_BONE):
    """HO3D's `align_sc_tr` on (B,J,3): rescale so |pred[b1] - pred[b0]| = |gt[b1] - gt[b0]|, then put
    pred[b0] on gt[b0]. A zero-length predicted bone is not divided by (as the official code)."""
    b0, b1 = bone
    s = np.sqrt(np.sum(np.square(pred[:, b1] - pred[:, b0]), -1))[:, None, None]  # (B, 1, 1)
    s_gt = np.sqrt(np.sum(np.square(gt[:, b1] - gt[:, b0]), -1))[:, None, None]
    pred = pred / np.where(s > 0, s, 1.0) * s_gt
    return pred - pred[:, b0:b0 + 1] + gt[:, b0:b0 + 1]


def point_errors(pred, gt):
    """(B,n,3) x 2 -> (B,n) Euclidean distances, as `EvalUtil.feed`."""
    return np.sqrt(np.sum(np.square(gt - pred), axis=-1))


def mean_error(err):
    """`EvalUtil` mean: per point over samples, then over points (B,n) -> float."""
    return float(np.mean(err.mean(0)))


def _trapezoid(y, x):
    """np.trapz(y, x) along the last axis, written out: sum of dx * (y_i + y_{i+1}) / 2."""
    return (np.diff(x) * (y[..., 1:] + y[..., :-1]) / 2.0).sum(-1)


def pck_curve(err, thresholds):
    """(B,n) errors -> (n,T): per point, the fraction of samples with error `<=` each threshold."""
    srt = np.sort(err, axis=0)                                                  # (B, n)
    # searchsorted 'right' counts the values <= t: the official `np.mean(data <= t)` per point
    counts = np.stack([np.searchsorted(srt[:, n], thresholds, side='right') for n in range(err.shape[1])])
    return counts / err.shape[0]                                                # (n, T)


def auc_pck(err, lo=AUC_RANGE[0], hi=AUC_RANGE[1], steps=AUC_RANGE[2]):
    """Official AUC of the PCK curve: per point trapz(pck, t) / trapz(1, t), then mean over points.

    With uniform thresholds t_k = lo + k h, h = (hi - lo)/(T - 1), the normaliser is (T - 1) h = hi - lo and
        AUC_n = (sum_k pck_n(t_k) - (pck_n(t_0) + pck_n(t_{T-1})) / 2) / (T - 1),
    so even a perfect prediction with tiny nonzero errors gets 1 - 1/(2(T - 1)) = 0.99495 (pck_n(0) = 0)."""
    t = np.linspace(lo, hi, steps)
    auc = _trapezoid(pck_curve(err, t), t) / _trapezoid(np.ones_like(t), t)      # (n,)
    return float(np.mean(auc))


def nn_distances(src, dst, bound=np.inf, workers=None):
    """(B,n,3), (B,m,3) -> (B,n): per sample, distance from each src point to its nearest dst point.

    What Open3D's compute_point_cloud_to_point_cloud_distance returns in the official scorer. Distances
    beyond `bound` come back as inf (the KD-tree prunes those searches). One small KD-tree per sample;
    the samples are split over `workers` threads (default: the CPU count, at most 8), as cKDTree releases
    the GIL while it builds and searches."""
    workers = workers or min(os.cpu_count() or 1, 8)

    def run(ids):
        return [cKDTree(dst[i]).query(src[i], k=1, distance_upper_bound=bound)[0] for i in ids]
    with ThreadPoolExecutor(workers) as pool:
        chunks = pool.map(run, np.array_split(np.arange(len(src)), workers))
    return np.stack([d for chunk in chunks for d in chunk])                     # (B, n)


def f_score(pred, gt, thresh=F_THRESHOLDS):
    """Official `calculate_fscore` per sample: (B,n,3), (B,m,3) -> (B,T), or (B,) for a scalar `thresh`."""
    t = np.asarray(thresh, dtype=np.float64)
    ts = np.atleast_1d(t)                                                       # (T,)
    bound = 1.5 * ts.max()        # any bound above the largest threshold keeps every `d < t` exact; tight prunes
    d_gt = nn_distances(as_f64(gt), as_f64(pred), bound)       # official d1: GT point -> nearest prediction
    d_pred = nn_distances(as_f64(pred), as_f64(gt), bound)     # official d2: prediction -> nearest GT point
    recall = (d_pred[..., None] < ts).mean(1)  # (B, T); the official names are swapped w.r.t. the usual ones,
    precision = (d_gt[..., None] < ts).mean(1)  # harmless since F is symmetric in P and R
    denom = recall + precision
    f = np.where(denom > 0, 2 * recall * precision / np.where(denom > 0, denom, 1.0), 0.0)
    return f if t.ndim else f[:, 0]


def score(pred_xyz, pred_verts, gt_xyz, gt_verts, f_thresholds=F_THRESHOLDS):
    """All official metrics of predictions against GT (numpy or torch, internal joint order) -> dict:
    mpjpe, pa_mpjpe, st_mpjpe, mpvpe, pa_mpvpe (metres), auc_j, pa_auc_j, st_auc_j, auc_v, pa_auc_v,
    f5, f15, pa_f5, pa_f15 (in [0, 1]); `pa_` = Procrustes-aligned (what papers report), `st_` = HO3D's
    scale-translation alignment. pred_xyz/gt_xyz (B,21,3); pred_verts (B,V',3), gt_verts (B,V,3). If
    V' != V it behaves as the official scorer: vertices aligned with the joints' transform, and no
    mesh errors (NaN here)."""
    pred_xyz, pred_verts, gt_xyz, gt_verts = (as_f64(x) for x in (pred_xyz, pred_verts, gt_xyz, gt_verts))
    same_mesh = pred_verts.shape[1] == gt_verts.shape[1]
    xyz_pa = procrustes(pred_xyz, gt_xyz)
    verts_pa = (procrustes(pred_verts, gt_verts) if same_mesh
                else _align_by_keypoint_transform(pred_verts, pred_xyz, gt_xyz))
    err_j, err_j_pa = point_errors(pred_xyz, gt_xyz), point_errors(xyz_pa, gt_xyz)   # (B, J)
    err_j_st = point_errors(align_scale_translation(pred_xyz, gt_xyz), gt_xyz)
    m = dict(mpjpe=mean_error(err_j), pa_mpjpe=mean_error(err_j_pa), st_mpjpe=mean_error(err_j_st),
             auc_j=auc_pck(err_j), pa_auc_j=auc_pck(err_j_pa), st_auc_j=auc_pck(err_j_st))
    if same_mesh:
        err_v, err_v_pa = point_errors(pred_verts, gt_verts), point_errors(verts_pa, gt_verts)  # (B, V)
        m.update(mpvpe=mean_error(err_v), pa_mpvpe=mean_error(err_v_pa),
                 auc_v=auc_pck(err_v), pa_auc_v=auc_pck(err_v_pa))
    else:
        m.update(mpvpe=float('nan'), pa_mpvpe=float('nan'), auc_v=float('nan'), pa_auc_v=float('nan'))
    f, f_pa = f_score(pred_verts, gt_verts, f_thresholds), f_score(verts_pa, gt_verts, f_thresholds)  # (B, T)
    for i, t in enumerate(f_thresholds):
        m[f'f{round(t * 1000)}'], m[f'pa_f{round(t * 1000)}'] = float(f[:, i].mean()), float(f_pa[:, i].mean())
    return m


def error_profile(pred_xyz, pred_verts, gt_xyz, gt_verts):
    """Where the aligned error is: mean error per joint (mm, (21,)), and the PCK curves behind pa_auc_j and
    pa_auc_v on the official thresholds (vertices only when the meshes have the same vertex count)."""
    pred_xyz, pred_verts, gt_xyz, gt_verts = (as_f64(x) for x in (pred_xyz, pred_verts, gt_xyz, gt_verts))
    t = np.linspace(*AUC_RANGE)
    err_j = point_errors(procrustes(pred_xyz, gt_xyz), gt_xyz)                          # (B, J)
    out = dict(joint_mm=1000 * err_j.mean(0), thresholds_mm=1000 * t, pck_j=pck_curve(err_j, t).mean(0),
               auc_j=auc_pck(err_j), pck_v=None)
    if pred_verts.shape[1] == gt_verts.shape[1]:
        err_v = point_errors(procrustes(pred_verts, gt_verts), gt_verts)
        out.update(pck_v=pck_curve(err_v, t).mean(0), auc_v=auc_pck(err_v))
    return out


def official_scores(m, layout):
    """The metrics under the names and units of the official scores.txt (errors in cm; NaN -> None)."""
    al = 'xyz_procrustes_al' if layout == 'ho3d' else 'xyz_al'
    out = {'xyz_mean3d': 100 * m['mpjpe'], 'xyz_auc3d': m['auc_j'],
           f'{al}_mean3d': 100 * m['pa_mpjpe'], f'{al}_auc3d': m['pa_auc_j']}
    if layout == 'ho3d':
        out.update(xyz_scale_trans_al_mean3d=100 * m['st_mpjpe'], xyz_scale_trans_al_auc3d=m['st_auc_j'])
    out.update(mesh_mean3d=100 * m['mpvpe'], mesh_auc3d=m['auc_v'],
               mesh_al_mean3d=100 * m['pa_mpvpe'], mesh_al_auc3d=m['pa_auc_v'])
    for k in [k for k in m if k.startswith('f')]:                              # 'f5', 'f15'
        out[f'f_score_{k[1:]}'], out[f'f_al_score_{k[1:]}'] = m[k], m['pa_' + k]
    return _nan_to_none(out)


def _nan_to_none(d):
    """JSON has no NaN: missing metrics (mesh errors of a mesh with another vertex count) become null."""
    return {k: (None if np.isnan(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------------
# SUBMISSION FILES

def to_layout(xyz, verts, layout):
    """Internal (FreiHAND order, OpenCV frame) -> a benchmark's file convention. FreiHAND: unchanged;
    HO3D: joints in MANO+tips order, both sets in the OpenGL frame (y, z negated)."""
    if layout == 'ho3d':
        return xyz[:, FREIHAND_TO_MANO] * OPENGL, verts * OPENGL
    return xyz, verts


def from_layout(xyz, verts, layout):
    """Inverse of `to_layout`: a benchmark file's convention -> internal order, OpenCV frame."""
    if layout == 'ho3d':
        return xyz[:, MANO_TO_FREIHAND] * OPENGL, verts * OPENGL
    return xyz, verts


def _check_sets(xyz, verts, what):
    """Clear ValueErrors for wrong shapes, counts or non-finite values of (B,21,3) / (B,V,3) arrays."""
    if xyz.ndim != 3 or xyz.shape[1:] != (21, 3):
        raise ValueError(f'{what}: joints must have shape (N, 21, 3), got {xyz.shape}')
    if verts.ndim != 3 or verts.shape[2] != 3 or verts.shape[1] == 0:
        raise ValueError(f'{what}: vertices must have shape (N, V, 3), got {verts.shape}')
    if len(xyz) != len(verts) or len(xyz) == 0:
        raise ValueError(f'{what}: {len(xyz)} joint sets but {len(verts)} vertex sets (need the same, > 0)')
    for name, a in (('joints', xyz), ('vertices', verts)):
        bad = ~np.isfinite(a).all(axis=(1, 2))
        if bad.any():
            raise ValueError(f'{what}: {bad.sum()} samples have NaN/inf {name} (first: sample {bad.argmax()})')


def write_submission(xyz, verts, out_dir, layout='freihand', root=None):
    """Write the official `pred.json` = [xyz_list, verts_list] (metres) and `pred.zip` into `out_dir`.

    xyz (B,21,3), verts (B,V,3): internal order, OpenCV camera frame, metres (numpy or torch). `root`
    (B,3), optional: the camera-frame wrist to translate each prediction to (HO3D: the wrist of the
    evaluation meta, since HO3D scores absolute positions and only gives the wrist). FreiHAND's evaluation
    split has 3960 samples, HO3Dv2's 11524, in the order of the split. Returns the path of pred.json."""
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
    xyz, verts = as_f64(xyz), as_f64(verts)
    _check_sets(xyz, verts, 'write_submission')
    if root is not None:
        shift = as_f64(root).reshape(-1, 1, 3) - xyz[:, :1]                    # (B, 1, 3)
        xyz, verts = xyz + shift, verts + shift
    xyz, verts = to_layout(xyz, verts, layout)
    if layout == 'ho3d':   # the check of HO3D's pred.py: hands are in front of an OpenGL camera (z < 0)
        bad = (xyz[..., 2] > 0).all(1) | (verts[..., 2] > 0).all(1)
        if bad.any():
            raise ValueError(f'write_submission: {bad.sum()} samples lie behind the OpenGL camera (all z > 0, '
                             f'first: sample {bad.argmax()}); give camera-frame OpenCV coordinates (they are '
                             f'converted here), not coordinates already in OpenGL')
    # 1 nm rounding: ~35% smaller files, a million times below the resolution of any metric
    text = json.dumps([np.round(xyz, 9).tolist(), np.round(verts, 9).tolist()])
    os.makedirs(out_dir, exist_ok=True)
    json_path, zip_path = os.path.join(out_dir, 'pred.json'), os.path.join(out_dir, 'pred.zip')
    write_atomic(json_path, text)
    with atomic_open(zip_path) as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr('pred.json', text)                                          # = `zip -j pred.zip pred.json`
    return json_path


def _to_array(lists, what):
    try:
        return np.asarray(lists, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f'{what}: not a regular array of numbers (entries of different shapes, '
                         f'or non-numeric values)') from None


def load_prediction(path):
    """pred.json / pred.zip -> (xyz (B,21,3), verts (B,V,3)) as stored in the file (no conversion)."""
    data = read_json(path)
    if not isinstance(data, list) or len(data) != 2:
        raise ValueError(f'{path}: expected the official format [xyz_list, verts_list], got a '
                         f'{type(data).__name__}' + (f' of length {len(data)}' if isinstance(data, list) else ''))
    xyz, verts = _to_array(data[0], f'{path} joints'), _to_array(data[1], f'{path} vertices')
    _check_sets(xyz, verts, path)
    return xyz, verts


def detect_layout(gt_dir):
    """'ho3d' for a folder with HO3D's evaluation.txt, else 'freihand'."""
    return 'ho3d' if os.path.isfile(os.path.join(gt_dir, 'evaluation.txt')) else 'freihand'


def load_ground_truth(gt_dir, layout):
    """evaluation_xyz.json / evaluation_verts.json of a dataset folder, in the benchmark's convention.

    FreiHAND ships them (metres, camera frame, FreiHAND order). HO3D's are in HO3D's convention
    (MANO+tips order, OpenGL frame): the official GT release and our synthetic HO3D sets alike."""
    arrays = []
    for name in ('evaluation_xyz.json', 'evaluation_verts.json'):
        path = os.path.join(gt_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'ground truth file {path} is missing: a {layout} evaluation folder needs '
                                    f'evaluation_xyz.json and evaluation_verts.json (lists of per-sample '
                                    f'point lists in metres)')
        arrays.append(_to_array(read_json(path), path))
    _check_sets(arrays[0], arrays[1], f'ground truth in {gt_dir}')
    return arrays[0], arrays[1]


def score_files(pred_path, gt_dir, layout='auto'):
    """Score a submission file against a dataset folder's GT -> (metrics dict, layout, the four arrays
    (pred xyz, pred verts, GT xyz, GT verts) in the internal convention)."""
    layout = detect_layout(gt_dir) if layout == 'auto' else layout
    gt_xyz, gt_verts = load_ground_truth(gt_dir, layout)
    xyz, verts = load_prediction(pred_path)
    if len(xyz) != len(gt_xyz):
        raise ValueError(f'{pred_path} has {len(xyz)} samples but the ground truth in {gt_dir} has '
                         f'{len(gt_xyz)} (real evaluation splits: FreiHAND 3960, HO3Dv2 11524)')
    xyz, verts = from_layout(xyz, verts, layout)
    gt_xyz, gt_verts = from_layout(gt_xyz, gt_verts, layout)
    return score(xyz, verts, gt_xyz, gt_verts), layout, (xyz, verts, gt_xyz, gt_verts)


def format_table(m):
    """The metrics as a printable table, errors in mm."""
    mm = lambda k: f'{1000 * m[k]:8.2f}'
    rows = [('PA-MPJPE (mm)', mm('pa_mpjpe')), ('PA-MPVPE (mm)', mm('pa_mpvpe')),
            ('F@5 (aligned)', f"{m['pa_f5']:8.3f}"), ('F@15 (aligned)', f"{m['pa_f15']:8.3f}"),
            ('AUC_J (aligned, 0-50 mm)', f"{m['pa_auc_j']:8.3f}"),
            ('AUC_V (aligned, 0-50 mm)', f"{m['pa_auc_v']:8.3f}"),
            ('ST-MPJPE (mm, HO3D scale-translation)', mm('st_mpjpe')),
            ('MPJPE (mm, unaligned)', mm('mpjpe')), ('MPVPE (mm, unaligned)', mm('mpvpe')),
            ('F@5 / F@15 (unaligned)', f"{m['f5']:8.3f} / {m['f15']:.3f}")]
    return '\n'.join(f'{name:40s}{value}' for name, value in rows)


# ----------------------------------------------------------------------------------------------------
# INFERENCE: a fine-tuned network (finetune.py's best.pth or checkpoint.pth) and its camera-frame meshes

def load_finetuned(path, device='cpu', mano=None):
    """(model in eval mode, config dict) from a finetune.py checkpoint.pth or best.pth. `mano` overrides
    the MANO model stored in the config (e.g. MANO_RIGHT.pkl at another path on this machine)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.get('config')
    if not isinstance(ckpt.get('model'), dict) or not isinstance(cfg, dict) or 'n_iter' not in cfg:
        raise ValueError(f'{path} is not a finetune.py checkpoint (expected "model" and a "config" with the '
                         f'regressor settings; found keys {sorted(ckpt)[:6]})')
    model = build_regressor(cfg, resolve_mano(mano or cfg['mano'], cfg.get('data')))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # a MANO model with another vertex count, or edited weights
        raise ValueError(f'{path} does not fit the network its config describes: {str(e)[:300]}') from None
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict(model, loader, device='cpu', amp='off', with_root=False):
    """Camera-frame predictions of the last iteration in the loader's order -> (xyz (B, J, 3), verts
    (B, V, 3)) float32 numpy arrays in metres, B = all samples: the MANO-frame mesh moved by
    `model.camera_translation`; with `with_root` also the samples' labelled wrists (B, 3) (HO3D's evaluation
    meta has them)."""
    model.eval()
    xyz, verts, roots = [], [], []
    for batch in tqdm(loader, desc='predict', unit='batch'):
        roots.append(batch['root'])
        images, K = batch['image'].to(device), batch['K'].to(device).float()
        with autocast(device, amp):
            out = model(images)[-1]
        T = camera_translation(out['cam'].float(), K, images.shape[-1])[:, None]  # (B, 1, 3)
        xyz.append((out['joints'].float() + T).cpu())
        verts.append((out['vertices'].float() + T).cpu())
    out = torch.cat(xyz).numpy(), torch.cat(verts).numpy()
    return (*out, torch.cat(roots).numpy()) if with_root else out


# ----------------------------------------------------------------------------------------------------
# COMMANDS: submissions of a dataset's evaluation split, scoring, curves

def _device(name):
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda was asked for but torch sees no GPU; use --device cpu')
    return torch.device('cuda' if name == 'cuda' or (name == 'auto' and torch.cuda.is_available()) else 'cpu')


def run_predict(cfg):
    """The official submission of cfg.data's evaluation split: pred.json and pred.zip in cfg.out, predicted by
    cfg.checkpoint in batches (or, with --mean_hand, the MANO mean hand for every sample). Scored too
    (scores.json, errors.png, the table) when the split's ground truth is there. Everything is checked
    before anything is written."""
    if not cfg.out:
        raise ValueError('--data needs --out DIR (pred.json and pred.zip go there)')
    if not (cfg.checkpoint or cfg.mean_hand):
        raise ValueError('--data needs --checkpoint CKPT (finetune.py best.pth) or --mean_hand')
    layout = detect_layout(cfg.data) if cfg.dataset == 'auto' else cfg.dataset
    device = _device(cfg.device)
    model, net = load_finetuned(cfg.checkpoint, device, cfg.mano or None) if cfg.checkpoint else (None, {})
    layer = model.mano if model is not None else resolve_mano(cfg.mano or None, cfg.data)
    Split = FreiHAND if layout == 'freihand' else HO3D
    split = Split(cfg.data, 'evaluation', net.get('img_size', 64), mano=layer)
    if model is not None:
        loader = torch.utils.data.DataLoader(split, cfg.batch_size, num_workers=cfg.workers)
        xyz, verts, roots = predict(model, loader, device, cfg.amp, with_root=True)
    else:  # identity global rotation: the aligned metrics find the best one
        with torch.no_grad():
            mean = layer.cpu()(torch.cat([torch.zeros(1, 3), layer.hands_mean[None].float().cpu()], 1))
        xyz, verts = (np.repeat(a.numpy(), len(split), axis=0) for a in (mean.joints, mean.vertices))
        roots = np.stack([split.wrist(i) for i in range(len(split))]) if layout == 'ho3d' else None
    path = write_submission(xyz, verts, cfg.out, layout, root=roots if layout == 'ho3d' else None)
    print(f'{len(xyz)} {layout} evaluation samples predicted: {path} and pred.zip written')
    try:
        load_ground_truth(cfg.data, layout)
    except FileNotFoundError:
        print(f'{cfg.data} has no evaluation ground truth: upload pred.zip to the benchmark server to score it')
        return None
    return run_score(dataclasses.replace(cfg, score=path, gt=cfg.data, layout=layout))


def run_score(cfg):
    """Score, print the table, write scores.json and errors.png next to the prediction (only if it worked)."""
    if not cfg.gt:
        raise ValueError('--score needs --gt DIR, the dataset folder with the evaluation ground truth')
    pred = os.path.join(cfg.score, 'pred.json') if os.path.isdir(cfg.score) else cfg.score
    metrics, layout, arrays = score_files(pred, cfg.gt, cfg.layout)
    print(f'{len(arrays[0])} samples, {layout} layout\n' + format_table(metrics))
    result = dict(config=asdict(cfg), layout=layout, num_samples=len(arrays[0]), metrics=_nan_to_none(metrics),
                  official=official_scores(metrics, layout))   # the config is saved here, not beside pred.json
    out = os.path.join(os.path.dirname(pred), 'scores.json')  # beside pred.json, as the user named it
    write_atomic(out, json.dumps(result, indent=1))
    png = plot_errors(error_profile(*arrays), os.path.join(os.path.dirname(pred), 'errors.png'))
    print(f'scores written to {out}, error per joint and PCK curves to {png}')
    return result


@dataclass
class EvalConfig:
    """Official submissions and scores of a fine-tuned network, the demo on hand crops, training curves."""
    data: str = option('', 'dataset root (FreiHAND v2 or HO3Dv2 layout): predict its evaluation split')
    dataset: str = option('auto', 'layout of --data; auto: ho3d if it has evaluation.txt', choices=['auto', *LAYOUTS])
    checkpoint: str = option('', 'fine-tuned network (finetune.py best.pth) for --data or --images')
    mean_hand: bool = option(False, 'with --data: submit the MANO mean hand for every sample (a baseline)')
    out: str = option('', 'output folder: pred.json, pred.zip, scores.json, errors.png; or the demo pictures')
    score: str = option('', 'instead: score this pred.json / pred.zip (or folder with pred.json) against --gt')
    gt: str = option('', 'with --score: dataset folder with evaluation_xyz.json and evaluation_verts.json')
    layout: str = option('auto', "with --score: the files' convention; auto: ho3d if --gt has evaluation.txt",
                         choices=['auto', *LAYOUTS])
    images: str = option('', 'demo: folder of hand crops (with --checkpoint and --out)')
    left: bool = option(False, 'demo: the images show left hands (mirrored for the network, the mesh mirrored back)')
    side: bool = option(False, 'demo: add a third panel, the mesh turned 90 degrees (a side view)')
    focal: float = option(2.34, 'demo: assumed focal length in units of the crop side (f px / crop px; FreiHAND '
                                '~ 525 / 224); for a known camera: its focal in px / min(width, height)')
    overlay_size: int = option(384, 'demo: side of each panel of the demo pictures in px')
    plot: str = option('', 'instead: draw the training curves (curves.png) of this pretrain.py / finetune.py run')
    mano: str = option('', "MANO model ('synthetic' or MANO_RIGHT.pkl) instead of the checkpoint's or the set's")
    device: str = option('auto', 'where the network runs', choices=['auto', 'cpu', 'cuda'])
    amp: str = option('off', 'mixed precision of the predictions', choices=['off', 'bf16', 'fp16'])
    batch_size: int = option(64, 'images per batch of --data predictions')
    workers: int = option(2, 'data-loading worker processes of --data predictions')


def run(cfg):
    print(json.dumps(asdict(cfg)))
    if cfg.plot:
        print(f'training curves written to {plot_run(cfg.plot)}')
    elif cfg.score:
        run_score(cfg)
    elif cfg.images:
        run_demo(cfg, lambda path: load_finetuned(path, _device(cfg.device), cfg.mano or None))
    elif cfg.data:
        run_predict(cfg)
    else:
        raise ValueError('nothing to do: give --data DIR --checkpoint CKPT --out DIR (a submission), --score '
                         'PRED --gt DIR, --images DIR --checkpoint CKPT --out DIR (the demo) or --plot RUN_DIR')


def main(argv=None):
    """CLI entry point -> exit code (2 with a one-line message for bad input, nothing written)."""
    return run_cli(EvalConfig, run, argv)


if __name__ == '__main__':
    sys.exit(main())
