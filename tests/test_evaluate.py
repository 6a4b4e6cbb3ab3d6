"""Tests of evaluate.py: the official FreiHAND/HO3D metrics, submission files and the scoring CLI.

The reference below re-implements the official per-sample scorers (lmb-freiburg/freihand eval.py +
utils/eval_util.py, shreyashampali/ho3d eval.py) the way they are written: one sample at a time,
scipy's orthogonal_procrustes, brute-force nearest neighbours, an EvalUtil with per-keypoint lists,
np.trapezoid. The batched implementation must agree with it on random data.

Shapes: B samples, N points per set.
"""
import json
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

import data
import evaluate
import synthetic

U = 2.0 ** -7   # 7.8125 mm: sums, differences, squares and square roots of small multiples stay exact
# HO3D (MANO + tips) order from FreiHAND order, as listed in the research notes (not computed from mano.py)
FREIHAND_TO_HO3D = [0, 5, 6, 7, 9, 10, 11, 17, 18, 19, 13, 14, 15, 1, 2, 3, 4, 8, 12, 16, 20]
OPENGL = np.array([1.0, -1.0, -1.0])


# ----------------------------------------------------------------------------------------------------
# Reference: the official scorer, one sample at a time

def ref_align_w_scale(mtx1, mtx2, return_trafo=False):
    t1, t2 = mtx1.mean(0), mtx2.mean(0)
    mtx1_t, mtx2_t = mtx1 - t1, mtx2 - t2
    s1 = np.linalg.norm(mtx1_t) + 1e-8
    mtx1_t /= s1
    s2 = np.linalg.norm(mtx2_t) + 1e-8
    mtx2_t /= s2
    R, s = orthogonal_procrustes(mtx1_t, mtx2_t)
    mtx2_t = np.dot(mtx2_t, R.T) * s
    mtx2_t = mtx2_t * s1 + t1
    return (R, s, s1, t1 - t2) if return_trafo else mtx2_t


def ref_align_by_trafo(mtx, trafo):
    t2 = mtx.mean(0)
    R, s, s1, t1 = trafo
    return np.dot(mtx - t2, R.T) * s * s1 + t1 + t2


def ref_align_sc_tr(mtx1, mtx2):   # HO3D order: joint 4 is the middle MCP
    pred = mtx2.copy()
    s = np.sqrt(np.sum(np.square(pred[4] - pred[0])))
    if s > 0:
        pred = pred / s
    pred = pred * np.sqrt(np.sum(np.square(mtx1[4] - mtx1[0])))
    return pred - pred[0:1, :] + mtx1[0:1, :]


def ref_fscore(gt, pr, th):
    dist = np.sqrt(np.sum(np.square(gt[:, None] - pr[None]), -1))   # brute force, (N_gt, N_pr)
    d1, d2 = dist.min(1), dist.min(0)
    recall = float(sum(d < th for d in d2)) / float(len(d2))
    precision = float(sum(d < th for d in d1)) / float(len(d1))
    return 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0


class RefEvalUtil:
    def __init__(self, num_kp=21):
        self.num_kp, self.data = num_kp, [[] for _ in range(num_kp)]

    def feed(self, gt, pred):
        d = np.sqrt(np.sum(np.square(gt - pred), axis=1))
        for i in range(self.num_kp):
            self.data[i].append(d[i])

    def get_measures(self, val_min, val_max, steps):
        thresholds = np.linspace(val_min, val_max, steps)
        norm_factor = np.trapezoid(np.ones_like(thresholds), thresholds)
        means, aucs = [], []
        for k in range(self.num_kp):
            data = np.array(self.data[k])
            means.append(np.mean(data))
            pck = np.array([np.mean((data <= t).astype('float')) for t in thresholds])
            aucs.append(np.trapezoid(pck, thresholds) / norm_factor)
        return np.mean(np.array(means)), np.mean(np.array(aucs))


def ref_score(pred_xyz, pred_verts, gt_xyz, gt_verts):
    """HO3D eval.py main() (a superset of FreiHAND's) on HO3D-ordered arrays."""
    ev = {k: RefEvalUtil() for k in ('xyz', 'xyz_pa', 'xyz_st')}
    ev.update(mesh=RefEvalUtil(gt_verts.shape[1]), mesh_pa=RefEvalUtil(gt_verts.shape[1]))
    f, f_al = [], []
    shape_is_mano = pred_verts.shape[1] == gt_verts.shape[1]
    for xyz, verts, xyz_pred, verts_pred in zip(gt_xyz, gt_verts, pred_xyz, pred_verts):
        ev['xyz'].feed(xyz, xyz_pred)
        if shape_is_mano:
            ev['mesh'].feed(verts, verts_pred)
        ev['xyz_st'].feed(xyz, ref_align_sc_tr(xyz, xyz_pred))
        ev['xyz_pa'].feed(xyz, ref_align_w_scale(xyz, xyz_pred))
        if shape_is_mano:
            verts_al = ref_align_w_scale(verts, verts_pred)
            ev['mesh_pa'].feed(verts, verts_al)
        else:
            verts_al = ref_align_by_trafo(verts_pred, ref_align_w_scale(xyz, xyz_pred, return_trafo=True))
        f.append([ref_fscore(verts, verts_pred, t) for t in (0.005, 0.015)])
        f_al.append([ref_fscore(verts, verts_al, t) for t in (0.005, 0.015)])
    out = {}
    for name, key in (('xyz', 'j'), ('xyz_pa', 'j'), ('xyz_st', 'j'), ('mesh', 'v'), ('mesh_pa', 'v')):
        if name.startswith('mesh') and not shape_is_mano:
            continue
        prefix = {'xyz': '', 'xyz_pa': 'pa_', 'xyz_st': 'st_', 'mesh': '', 'mesh_pa': 'pa_'}[name]
        mean, auc = ev[name].get_measures(0.0, 0.05, 100)
        out[prefix + ('mpjpe' if key == 'j' else 'mpvpe')], out[f'{prefix}auc_{key}'] = mean, auc
    f, f_al = np.array(f).T, np.array(f_al).T
    out.update(f5=f[0].mean(), f15=f[1].mean(), pa_f5=f_al[0].mean(), pa_f15=f_al[1].mean())
    return out


# ----------------------------------------------------------------------------------------------------
# Helpers

def random_rotations(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    return q * np.sign(np.linalg.det(q))[:, None, None]   # det +1


def random_similarity(rng, x):
    """Apply a random rotation, scale in [0.5, 2] and translation to each sample of (B,N,3)."""
    R = random_rotations(rng, len(x))
    s, t = rng.uniform(0.5, 2.0, (len(x), 1, 1)), rng.normal(size=(len(x), 1, 3))
    return s * x @ R.transpose(0, 2, 1) + t


def random_hands(rng, b, n_verts=40):
    """Hand-sized random point sets 0.5 m in front of the camera: joints (B,21,3), vertices (B,V,3)."""
    xyz = rng.normal(size=(b, 21, 3)) * 0.03 + [0, 0, 0.5]
    verts = rng.normal(size=(b, n_verts, 3)) * 0.03 + [0, 0, 0.5]
    return xyz, verts


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f)


# ----------------------------------------------------------------------------------------------------
# Metrics

def test_similarity_transformed_gt_scores_zero_aligned():
    rng = np.random.default_rng(1)
    gt_xyz, gt_verts = random_hands(rng, 6)
    pred_xyz, pred_verts = random_similarity(rng, gt_xyz), random_similarity(rng, gt_verts)
    m = evaluate.score(pred_xyz, pred_verts, gt_xyz, gt_verts)
    # not exactly 0: the official +1e-8 in the normalisers shrinks the aligned set by ~2e-8 / its norm
    assert m['pa_mpjpe'] < 1e-8 and m['pa_mpvpe'] < 1e-8          # metres: 1e-5 mm
    assert m['pa_f5'] == 1.0 and m['pa_f15'] == 1.0
    assert m['mpjpe'] > 0.1 and m['f15'] < 0.5          # unaligned, the transform is visible
    # tiny nonzero errors: pck(0) = 0 and pck = 1 elsewhere, so AUC = 1 - 1/(2 * 99) (see auc_pck)
    assert 1 - 1 / 198 - 1e-12 <= m['pa_auc_j'] <= 1 and 1 - 1 / 198 - 1e-12 <= m['pa_auc_v'] <= 1


def test_reflected_prediction_is_aligned_like_the_official_scorer():
    # align_w_scale has no det(R) = +1 correction: a mirror image (x negated), then moved by a similarity,
    # is aligned perfectly. A rotation-only Procrustes could not do it: the optimal R here has det -1.
    rng = np.random.default_rng(2)
    gt = rng.normal(size=(4, 50, 3)) * 0.03               # non-planar, so a mirror is no rotation
    pred = random_similarity(rng, gt * [-1.0, 1.0, 1.0])
    aligned = evaluate.procrustes(pred, gt)
    assert np.abs(aligned - gt).max() < 1e-8
    for g, p in zip(gt, pred):
        R, _ = orthogonal_procrustes(g - g.mean(0), p - p.mean(0))
        assert np.linalg.det(R) < 0
        np.testing.assert_allclose(ref_align_w_scale(g, p), evaluate.procrustes(p[None], g[None])[0], atol=1e-12)


def test_hand_computed_three_samples():
    # Unit u = 2^-7 m = 7.8125 mm. GT of every sample: a planar cross (u,0,0), (-u,0,0), (0,u,0), (0,-u,0).
    gt = np.tile(np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0]], float) * U, (3, 1, 1))
    pred = np.stack([
        # S1: x stretched x2. Centred and normalised: gt/2u, pred/(sqrt(10) u); gt_n^T pred_n =
        #     diag(2, 1, 0)/sqrt(10) -> R = I, s = 3/sqrt(10); aligned = pred/(sqrt10 u) * 3/sqrt10 * 2u = 0.6 pred
        np.array([[2, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0]], float) * U,
        # S2: GT rotated 90 deg about z ((x,y) -> (-y,x)) and lifted by u: Procrustes undoes it exactly
        np.array([[0, 1, 1], [0, -1, 1], [-1, 0, 1], [1, 0, 1]], float) * U,
        # S3: all zeros: pred_n = 0, s = 0, every aligned point lands on the GT mean = the origin
        np.zeros((4, 3))])

    aligned = evaluate.procrustes(pred, gt)
    # (up to the official +1e-8 in the normalisers: a relative 1e-8 / |points| = 1e-6 here)
    np.testing.assert_allclose(aligned[0], 0.6 * pred[0], atol=1e-5 * U)
    np.testing.assert_allclose(aligned[1], gt[1], atol=1e-5 * U)
    np.testing.assert_allclose(aligned[2], 0.0, atol=1e-12)

    # Unaligned errors: S1 [u, u, 0, 0], S2 4 x sqrt(3) u, S3 4 x u -> mean (6 + 4 sqrt 3) u / 12
    err = evaluate.point_errors(pred, gt)
    assert evaluate.mean_error(err) == pytest.approx((0.5 + np.sqrt(3) / 3) * U, rel=1e-12)
    # Aligned errors: S1 [0.2, 0.2, 0.4, 0.4] u, S2 zeros, S3 4 x u -> mean 5.2 u / 12 = 13 u / 30
    assert evaluate.mean_error(evaluate.point_errors(aligned, gt)) == pytest.approx(13 * U / 30, rel=1e-5)

    # F-scores, thresholds 5 and 15 mm (u = 7.8 mm):
    #   S1 unaligned: NN distances pred->GT [u, u, 0, 0], GT->pred [u, u, 0, 0] -> P = R = 1/2: F@5 = 1/2, F@15 = 1
    #   S2 unaligned: every NN distance is u (the lift) -> F@5 = 0, F@15 = 1
    #   S3 unaligned: every NN distance is u -> F@5 = 0 (P + R = 0), F@15 = 1
    np.testing.assert_array_equal(evaluate.f_score(pred, gt), [[0.5, 1], [0, 1], [0, 1]])
    #   aligned: S1 NN distances 0.2u, 0.4u (< 3.2 mm) -> 1, 1; S2 exact -> 1, 1; S3 all u -> 0, 1
    np.testing.assert_array_equal(evaluate.f_score(aligned, gt), [[1, 1], [1, 1], [0, 1]])

    # AUC of the unaligned errors over thresholds 0, u, 2u, 3u, 4u (exact), PCK with `<=`:
    #   points 0, 1: errors (u, sqrt3 u, u): pck = (0, 2/3, 1, 1, 1) -> (0/2 + 2/3 + 1 + 1 + 1/2)/4 = 19/24
    #   points 2, 3: errors (0, sqrt3 u, u): pck = (1/3, 2/3, 1, 1, 1) -> (1/6 + 2/3 + 1 + 1 + 1/2)/4 = 20/24
    #   mean 13/16 (a strict `<` would give (15 + 15 + 17 + 17)/96 = 2/3)
    assert evaluate.auc_pck(err, 0.0, 4 * U, 5) == pytest.approx(13 / 16, rel=1e-12)


def test_f_score_is_strict_at_the_threshold():
    # sqrt(x * x) == x in IEEE arithmetic, so these NN distances are exactly 0.005 (the official threshold)
    assert np.sqrt(0.005 * 0.005) == 0.005
    # one prediction exactly 0.005 from its GT point, one exact: d_pred = d_gt = (0.005, 0) -> P = R = 1/2
    gt = np.array([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    at = gt + [[0.005, 0.0, 0.0], [0.0, 0.0, 0.0]]
    below = gt + [[np.nextafter(0.005, 0.0), 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert evaluate.f_score(at, gt, 0.005)[0] == 0.5        # d == t is not a match (`<=` on either side: 2/3)
    assert evaluate.f_score(below, gt, 0.005)[0] == 1.0
    np.testing.assert_array_equal(evaluate.f_score(at, gt), [[0.5, 1.0]])
    # and with a power-of-two grid and threshold
    grid = np.stack(np.meshgrid(*[np.arange(3.0)] * 3), -1).reshape(1, -1, 3) * 4 * U   # 27 points 4u apart
    assert evaluate.f_score(grid + [0, U, 0], grid, U)[0] == 0.0
    assert evaluate.f_score(grid + [0, U, 0], grid, np.nextafter(U, 1.0))[0] == 1.0


def test_pck_counts_errors_equal_to_the_threshold():
    t = np.linspace(0.0, 0.05, 100)
    err = np.full((1, 1), t[37])               # exactly the 38th threshold
    # pck = 0 for t_0..t_36, 1 for t_37..t_99: AUC = (63 - 1/2) / 99; a strict `<` would give (62 - 1/2) / 99
    assert evaluate.auc_pck(err) == pytest.approx(62.5 / 99, rel=1e-12)
    np.testing.assert_array_equal(evaluate.pck_curve(err, t[36:39])[0], [0.0, 1.0, 1.0])


@pytest.mark.parametrize('n_pred_verts', [40, 33])
def test_batched_score_matches_official_loop(n_pred_verts):
    rng = np.random.default_rng(3)
    gt_xyz, gt_verts = random_hands(rng, 12, n_verts=40)
    pred_xyz = gt_xyz + rng.normal(size=gt_xyz.shape) * 0.008
    pred_verts = gt_verts[:, :n_pred_verts] + rng.normal(size=(12, n_pred_verts, 3)) * 0.004
    pred_xyz[1] = gt_xyz[1] * [-1, 1, 1]                   # a mirrored sample
    pred_verts[2] = 0.0                                    # a zero sample (degenerate Procrustes)
    pred_xyz[3, 9] = pred_xyz[3, 0]                        # zero-length ST bone (not divided by)
    pred_verts[4] = random_similarity(rng, pred_verts[4:5])[0]
    mine = evaluate.score(pred_xyz, pred_verts, gt_xyz, gt_verts)
    # the reference runs in HO3D's convention (MANO+tips order, OpenGL): the metrics do not depend on it
    ref = ref_score(pred_xyz[:, FREIHAND_TO_HO3D] * OPENGL, pred_verts * OPENGL,
                    gt_xyz[:, FREIHAND_TO_HO3D] * OPENGL, gt_verts * OPENGL)
    assert 0 < mine['pa_f5'] < 1 and 0 < mine['f15'] < 1   # non-trivial values
    for k, v in ref.items():
        assert mine[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    if n_pred_verts != 40:   # the official scorer skips mesh errors for another vertex count
        assert set(mine) - set(ref) == {'mpvpe', 'pa_mpvpe', 'auc_v', 'pa_auc_v'}
        assert np.isnan(mine['pa_mpvpe'])


def test_procrustes_on_torch_tensors_matches_numpy():
    rng = np.random.default_rng(4)
    gt, pred = rng.normal(size=(5, 21, 3)), rng.normal(size=(5, 21, 3))
    out = evaluate.procrustes(torch.tensor(pred, dtype=torch.float32), torch.tensor(gt, dtype=torch.float32))
    assert torch.is_tensor(out) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), evaluate.procrustes(pred, gt), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Submission files and the scoring CLI

def test_freihand_submission_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    xyz, verts = random_hands(rng, 5)
    path = evaluate.write_submission(torch.tensor(xyz), verts, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['pred.json', 'pred.zip']
    with zipfile.ZipFile(tmp_path / 'pred.zip') as z, open(path) as f:
        assert z.namelist() == ['pred.json'] and z.read('pred.json').decode() == f.read()
    for p in (path, str(tmp_path / 'pred.zip')):
        x, v = evaluate.load_prediction(p)
        np.testing.assert_allclose(x, xyz, atol=1e-9)
        np.testing.assert_allclose(v, verts, atol=1e-9)


def test_ho3d_submission_layout(tmp_path):
    rng = np.random.default_rng(6)
    xyz, verts = random_hands(rng, 3)
    root = rng.normal(size=(3, 3)) * 0.05 + [0, 0, 0.6]
    evaluate.write_submission(xyz, verts, str(tmp_path), layout='ho3d', root=root)
    x, v = evaluate.load_prediction(str(tmp_path / 'pred.json'))
    shift = (root - xyz[:, 0])[:, None]                   # predictions moved so their wrist is `root`
    np.testing.assert_allclose(x, (xyz + shift)[:, FREIHAND_TO_HO3D] * OPENGL, atol=1e-9)
    np.testing.assert_allclose(v, (verts + shift) * OPENGL, atol=1e-9)
    np.testing.assert_allclose(x[:, 0], root * OPENGL, atol=1e-9)
    assert (x[..., 2] < 0).all()                          # OpenGL: the hand is in front along -z
    np.testing.assert_allclose(x[:, 4], (xyz + shift)[:, 9] * OPENGL, atol=1e-9)   # middle MCP
    with pytest.raises(ValueError, match='OpenGL'):          # already flipped: HO3D pred.py's check
        evaluate.write_submission(xyz * OPENGL, verts * OPENGL, str(tmp_path / 'twice'), layout='ho3d')


def test_write_submission_rejects_bad_input_and_writes_nothing(tmp_path):
    xyz, verts = random_hands(np.random.default_rng(7), 2)
    xyz[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        evaluate.write_submission(xyz, verts, str(tmp_path))
    with pytest.raises(ValueError, match=r'\(N, 21, 3\)'):
        evaluate.write_submission(verts, verts, str(tmp_path))
    assert os.listdir(tmp_path) == []


def make_freihand_gt(root, rng, n=6):
    xyz, verts = random_hands(rng, n)
    os.makedirs(root, exist_ok=True)
    write_json(os.path.join(root, 'evaluation_xyz.json'), xyz.tolist())
    write_json(os.path.join(root, 'evaluation_verts.json'), verts.tolist())
    return xyz, verts


def test_cli_scores_gt_as_prediction_zero(tmp_path, capsys):
    xyz, verts = make_freihand_gt(tmp_path / 'fh', np.random.default_rng(8))
    pred = evaluate.write_submission(xyz, verts, str(tmp_path / 'sub'))
    for p in (pred, str(tmp_path / 'sub' / 'pred.zip')):
        assert evaluate.main(['--score', p, '--gt', str(tmp_path / 'fh')]) == 0
        scores = json.loads((tmp_path / 'sub' / 'scores.json').read_text())
        m = scores['metrics']
        assert scores['layout'] == 'freihand' and scores['num_samples'] == 6
        assert max(m['mpjpe'], m['pa_mpjpe'], m['mpvpe'], m['pa_mpvpe'], m['st_mpjpe']) < 1e-8   # 1 nm rounding
        assert m['f5'] == m['f15'] == m['pa_f5'] == m['pa_f15'] == 1.0
        assert scores['official']['xyz_al_mean3d'] == pytest.approx(100 * m['pa_mpjpe'])   # cm
        assert set(scores['official']) == {   # the names of the official FreiHAND scores.txt
            'xyz_mean3d', 'xyz_auc3d', 'xyz_al_mean3d', 'xyz_al_auc3d', 'mesh_mean3d', 'mesh_auc3d',
            'mesh_al_mean3d', 'mesh_al_auc3d', 'f_score_5', 'f_al_score_5', 'f_score_15', 'f_al_score_15'}
    assert 'PA-MPVPE (mm)' in capsys.readouterr().out


def test_cli_scores_ho3d_layout(tmp_path):
    rng = np.random.default_rng(9)
    xyz, verts = random_hands(rng, 4)
    gt_dir = tmp_path / 'ho3d'
    os.makedirs(gt_dir)
    (gt_dir / 'evaluation.txt').write_text(''.join(f'SEQ/{i:04d}\n' for i in range(4)))
    write_json(gt_dir / 'evaluation_xyz.json', (xyz[:, FREIHAND_TO_HO3D] * OPENGL).tolist())
    write_json(gt_dir / 'evaluation_verts.json', (verts * OPENGL).tolist())
    # a root-relative prediction, put back in place with the wrist of the "evaluation meta"
    pred = evaluate.write_submission(xyz - xyz[:, :1], verts - xyz[:, :1], str(tmp_path / 'sub'),
                                     layout='ho3d', root=xyz[:, 0])
    assert evaluate.main(['--score', pred, '--gt', str(gt_dir)]) == 0
    scores = json.loads((tmp_path / 'sub' / 'scores.json').read_text())
    assert scores['layout'] == 'ho3d'
    assert max(scores['metrics'][k] for k in ('mpjpe', 'pa_mpjpe', 'st_mpjpe', 'mpvpe', 'pa_mpvpe')) < 1e-8
    assert scores['official']['xyz_scale_trans_al_mean3d'] < 1e-6
    assert {'xyz_procrustes_al_mean3d', 'xyz_procrustes_al_auc3d', 'xyz_scale_trans_al_auc3d'} < set(scores['official'])
    # a folder holding pred.json is accepted too
    assert evaluate.main(['--score', os.path.dirname(pred), '--gt', str(gt_dir)]) == 0


@pytest.mark.parametrize('problem, message', [
    ('count', 'has 5 samples but the ground truth'),
    ('joints', r'\(N, 21, 3\)'),
    ('nan', 'NaN'),
    ('ragged', 'not a regular array'),
    ('format', r'\[xyz_list, verts_list\]'),
    ('not_json', 'not valid JSON'),
    ('missing_gt', 'evaluation_verts.json is missing'),
])
def test_cli_bad_input_exits_2_and_keeps_old_scores(tmp_path, capsys, problem, message):
    xyz, verts = make_freihand_gt(tmp_path / 'fh', np.random.default_rng(10))
    sub = tmp_path / 'sub'
    pred_path = evaluate.write_submission(xyz, verts, str(sub))
    pred = [xyz.tolist(), verts.tolist()]
    if problem == 'count':
        pred = [xyz[:5].tolist(), verts[:5].tolist()]
    elif problem == 'joints':
        pred = [xyz[:, :20].tolist(), verts.tolist()]
    elif problem == 'nan':
        pred[1][2][3][1] = float('nan')
    elif problem == 'ragged':
        pred[1][2] = pred[1][2][:-1]
    elif problem == 'format':
        pred = {'xyz': pred[0]}
    elif problem == 'missing_gt':
        os.remove(tmp_path / 'fh' / 'evaluation_verts.json')
    if problem == 'not_json':
        (sub / 'pred.json').write_text('[[1, 2], ')
    else:
        write_json(pred_path, pred)
    (sub / 'scores.json').write_text('old')
    assert evaluate.main(['--score', pred_path, '--gt', str(tmp_path / 'fh')]) == 2
    assert (sub / 'scores.json').read_text() == 'old'
    err = capsys.readouterr().err
    assert err.startswith('error: ') and re.search(message, err), err


def test_submissions_of_the_synthetic_sets_score_zero(tmp_path):
    # data.py's synthetic FreiHAND and HO3D sets store their evaluation GT like the benchmarks do; the GT,
    # read through the datasets (HO3D: only the wrist of the evaluation meta) and written as a submission,
    # must score 0 against it. The stored GT is rounded to 0.1 micrometre, the datasets give float32.
    for layout in evaluate.LAYOUTS:
        root = synthetic.synth(str(tmp_path / layout), n=1, n_eval=3, layout=layout)
        if layout == 'freihand':
            samples = [data.FreiHAND(root, 'evaluation')[i] for i in range(3)]
            xyz, verts = (torch.stack([s[k] for s in samples]) for k in ('joints3d', 'verts'))
            pred = evaluate.write_submission(xyz, verts, str(tmp_path / 'sub_fh'))
        else:   # a root-relative prediction put in place with the wrist of the evaluation meta
            wrist = torch.stack([data.HO3D(root, 'evaluation')[i]['root'] for i in range(3)])
            xyz, verts = evaluate.from_layout(*evaluate.load_ground_truth(root, 'ho3d'), 'ho3d')
            pred = evaluate.write_submission(xyz - xyz[:, :1], verts - xyz[:, :1], str(tmp_path / 'sub_ho3d'),
                                             layout='ho3d', root=wrist)
        assert evaluate.main(['--score', pred, '--gt', root]) == 0
        scores = json.loads(open(os.path.join(os.path.dirname(pred), 'scores.json')).read())
        assert scores['layout'] == layout and scores['num_samples'] == 3
        m = scores['metrics']
        assert max(m[k] for k in ('mpjpe', 'pa_mpjpe', 'st_mpjpe', 'mpvpe', 'pa_mpvpe')) < 1e-6, m
        assert m['f5'] == m['pa_f5'] == 1.0


@pytest.mark.parametrize('layout', evaluate.LAYOUTS)
def test_evaluation_command_round_trips_through_score_to_the_python_api(tmp_path, layout):
    """`evaluate.py --data --checkpoint --out` writes pred.json / pred.zip of the evaluation split and scores it;
    the scores equal those of predict + score in Python. `--mean_hand` writes the baseline the same way."""
    from data import FreiHAND, HO3D, resolve_mano
    from engine import save_checkpoint
    from model import build_regressor
    root = synthetic.synth(str(tmp_path / 'set'), n=1, n_eval=3, layout=layout, img_size=64)
    net = dict(arch='vit_tiny', depth=1, img_size=32, patch_size=8, n_iter=3, head_width=16, mano='synthetic')
    ckpt = str(tmp_path / 'best.pth')
    save_checkpoint(dict(model=build_regressor(net, resolve_mano('synthetic')).state_dict(), config=net), ckpt)
    out = tmp_path / 'sub'
    assert evaluate.main(['--data', root, '--checkpoint', ckpt, '--out', str(out), '--workers', '0']) == 0
    assert {'pred.json', 'pred.zip', 'scores.json', 'errors.png'} <= set(os.listdir(out))
    written = json.loads((out / 'scores.json').read_text())['metrics']

    model, _ = evaluate.load_finetuned(ckpt)
    split = (FreiHAND if layout == 'freihand' else HO3D)(root, 'evaluation', 32, mano=model.mano)
    xyz, verts, wrist = evaluate.predict(model, torch.utils.data.DataLoader(split, batch_size=2), with_root=True)
    if layout == 'ho3d':   # HO3D scores absolute positions: the prediction is put at the meta's wrist
        shift = wrist[:, None] - xyz[:, :1]
        xyz, verts = xyz + shift, verts + shift
    gt = evaluate.from_layout(*evaluate.load_ground_truth(root, layout), layout)
    api = evaluate.score(xyz, verts, *gt)
    for k in ('pa_mpjpe', 'pa_mpvpe', 'mpjpe', 'st_mpjpe', 'pa_f5', 'pa_f15'):
        assert written[k] == pytest.approx(api[k], abs=1e-6), k

    assert evaluate.main(['--data', root, '--mean_hand', '--out', str(tmp_path / 'mean'), '--workers', '0']) == 0
    mean = json.loads((tmp_path / 'mean' / 'scores.json').read_text())['metrics']
    layer = resolve_mano('synthetic')
    with torch.no_grad():
        m = layer(torch.cat([torch.zeros(1, 3), layer.hands_mean[None]], 1))
    tile = lambda a: np.repeat(a.numpy(), 3, axis=0)
    assert mean['pa_mpvpe'] == pytest.approx(evaluate.score(tile(m.joints), tile(m.vertices), *gt)['pa_mpvpe'], abs=1e-6)


def test_evaluation_command_needs_its_inputs_and_writes_nothing_without(tmp_path, capsys):
    out = tmp_path / 'sub'
    assert evaluate.main(['--data', str(tmp_path / 'nowhere'), '--mean_hand', '--out', str(out)]) == 2
    assert evaluate.main(['--data', str(tmp_path), '--out', str(out)]) == 2      # neither checkpoint nor mean hand
    assert 'Traceback' not in capsys.readouterr().err and not out.exists()
