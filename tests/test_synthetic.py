"""Tests of synthetic.py: the synthetic stand-in MANO hand, the rasterizer, the picture and the writer of
synthetic sets.

The hand is posed here with an independent, deliberately naive numpy LBS (Rodrigues, a
joint-by-joint kinematic chain, linear blend skinning), so these tests check the model's arrays
without trusting the MANO layer; one test also runs it through `mano.MANO`.
Run: python -m pytest -q tests/test_synthetic.py
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import torch

import synthetic
from mano import MANO
from synthetic import synthetic_mano

PARENTS = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
# MANO joint ids of each digit's base joint; tip_ids are in the order thumb, index, middle, ring, pinky.
BASE = {'thumb': 13, 'index': 1, 'middle': 4, 'ring': 10, 'pinky': 7}
DIGITS = ['thumb', 'index', 'middle', 'ring', 'pinky']
# Joint-centre segment lengths of adult hands in metres (last: DIP/IP joint to the tip of the pad),
# wide enough for sex and size variation (Buryanov & Kotiuk 2010; Hamilton & Dunsmuir 2002).
RANGES = {'thumb': [(0.036, 0.050), (0.025, 0.037), (0.020, 0.032)],
          'index': [(0.036, 0.049), (0.020, 0.030), (0.016, 0.026)],
          'middle': [(0.039, 0.053), (0.023, 0.034), (0.017, 0.027)],
          'ring': [(0.036, 0.050), (0.022, 0.033), (0.016, 0.026)],
          'pinky': [(0.028, 0.040), (0.016, 0.026), (0.014, 0.024)]}


@pytest.fixture(scope='module')
def hand():
    return synthetic_mano()


def rodrigues(r):
    """(3,) axis-angle -> (3, 3), textbook formula."""
    angle = np.linalg.norm(r)
    if angle < 1e-12:
        return np.eye(3)
    k = r / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def naive_lbs(m, pose, betas=None):
    """Pose the model joint by joint: returns posed vertices (V, 3), joints (16, 3), transforms."""
    v = m['v_template'] + (m['shapedirs'] @ betas if betas is not None else 0)
    joints = m['J_regressor'] @ v
    rot = [rodrigues(p) for p in np.asarray(pose).reshape(16, 3)]
    v = v + m['posedirs'] @ np.concatenate([(r - np.eye(3)).ravel() for r in rot[1:]])
    world = []
    for i in range(16):
        local = np.eye(4)
        local[:3, :3] = rot[i]
        local[:3, 3] = joints[i] - (joints[PARENTS[i]] if i else 0)
        world.append(local if i == 0 else world[PARENTS[i]] @ local)
    skin = []
    for i, g in enumerate(world):               # transforms relative to the rest pose
        g = g.copy()
        g[:3, 3] -= g[:3, :3] @ joints[i]
        skin.append(g)
    blend = np.einsum('vj,jab->vab', m['weights'], np.stack(skin))
    posed = np.einsum('vab,vb->va', blend[:, :3, :3], v) + blend[:, :3, 3]
    return posed, np.stack([g[:3, 3] for g in world]), blend[:, :3, :3]


def face_normals(v, f):
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def winding_number(points, v, f):
    """Generalized winding number (Van Oosterom & Strackee solid angles): 1 inside, 0 outside."""
    a, b, c = (v[f[:, i]][None] - points[:, None] for i in range(3))   # (P, F, 3)
    la, lb, lc = (np.linalg.norm(x, axis=2) for x in (a, b, c))
    num = np.einsum('pfi,pfi->pf', a, np.cross(b, c))
    den = la * lb * lc + (a * b).sum(2) * lc + (b * c).sum(2) * la + (c * a).sum(2) * lb
    return (2 * np.arctan2(num, den)).sum(1) / (4 * np.pi)


def flexion_axes(joints):
    """Per finger joint the axis of a flexion toward the palm, from the skeleton alone: the
    official right hand has its palm toward -y, so the axis is y x (bone direction) (+z for a
    finger pointing along -x, matching the official model's curled mean pose)."""
    axes = np.zeros((16, 3))
    for j in range(1, 16):
        child = j + 1 if j % 3 else None        # j = 3, 6, ... are the last joints of a digit
        bone = joints[child] - joints[j] if child else joints[j] - joints[j - 1]
        axis = np.cross([0, 1, 0], bone)
        axes[j] = axis / np.linalg.norm(axis)
    return axes


def chains(m, v=None, joints=None):
    v = m['v_template'] if v is None else v
    joints = m['J_regressor'] @ v if joints is None else joints
    return {d: [joints[BASE[d]], joints[BASE[d] + 1], joints[BASE[d] + 2], v[m['tip_ids'][i]]]
            for i, d in enumerate(DIGITS)}


def segment_lengths(m, v=None, joints=None):
    return {d: [np.linalg.norm(c[i + 1] - c[i]) for i in range(3)]
            for d, c in chains(m, v, joints).items()}


def test_format_matches_official_mano(hand):
    v = hand['v_template']
    nv = len(v)
    assert 600 <= nv <= 1200 and v.shape == (nv, 3) and v.dtype == np.float64
    assert hand['shapedirs'].shape == (nv, 3, 10) and hand['posedirs'].shape == (nv, 3, 135)
    reg = hand['J_regressor']
    assert scipy.sparse.issparse(reg) and reg.format == 'csc' and reg.shape == (16, nv)
    assert hand['weights'].shape == (nv, 16)
    assert hand['f'].dtype == np.uint32 and hand['f'].shape[1] == 3 and hand['f'].max() < nv
    kt = hand['kintree_table']
    assert kt.shape == (2, 16) and kt[0, 0] == 4294967295 and list(kt[0, 1:]) == PARENTS[1:]
    assert list(kt[1]) == list(range(16))
    assert hand['hands_components'].shape == (45, 45) and hand['hands_mean'].shape == (45,)
    assert hand['tip_ids'].shape == (5,) and len(set(hand['tip_ids'].tolist())) == 5
    assert hand['bs_style'] == 'lbs' and hand['bs_type'] == 'lrotmin'
    np.testing.assert_allclose(hand['J'], hand['J_regressor'] @ v)


def test_deterministic_and_copies(hand):
    again = synthetic_mano()
    for key, value in hand.items():
        value2 = again[key]
        if scipy.sparse.issparse(value):
            value, value2 = value.toarray(), value2.toarray()
        assert np.array_equal(value, value2), key
    again['v_template'][:] = 0                 # callers get copies, the cache stays intact
    assert np.array_equal(synthetic_mano()['v_template'], hand['v_template'])


def test_closed_oriented_manifold(hand):
    f = hand['f'].astype(np.int64)
    nv = len(hand['v_template'])
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    keys = directed[:, 0] * nv + directed[:, 1]
    assert len(np.unique(keys)) == len(keys), 'a directed edge is used twice (orientation flip)'
    reverse = directed[:, 1] * nv + directed[:, 0]
    assert np.isin(reverse, keys).all(), 'an edge has no opposite half-edge (hole)'
    assert len(np.unique(f)) == nv, 'unused vertices'
    assert nv - len(keys) // 2 + len(f) == 2, 'Euler characteristic of a sphere'
    v = hand['v_template']
    volume = np.einsum('fi,fi->f', v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
    assert 2e-4 < volume < 8e-4, volume      # adult hands: ~300-500 ml (this one: ~300)
    area = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    assert area.min() > 1e-8


def test_proportions_are_anatomical(hand):
    v = hand['v_template']
    for digit, lengths in segment_lengths(hand).items():
        for length, (lo, hi) in zip(lengths, RANGES[digit]):
            assert lo <= length <= hi, (digit, lengths)
    joints = hand['J_regressor'] @ v
    hand_length = np.linalg.norm(v[hand['tip_ids'][2]] - joints[0])
    assert 0.175 <= hand_length <= 0.195
    thumb = hand['weights'][:, 13:].sum(1) > 0.3
    palm = ~thumb & (np.abs(v[:, 0] - joints[[1, 4, 7, 10], 0].mean()) < 0.02)
    assert 0.078 <= np.ptp(v[palm, 2]) <= 0.092     # palm breadth at the knuckles
    # Official frame: fingers along -x, thumb on +z, pinky on -z, back of the hand +y.
    tips = v[hand['tip_ids']]
    assert (tips[1:, 0] < joints[0, 0] - 0.13).all() and tips[0, 2] > tips[4, 2] + 0.05


def test_skinning_weights(hand):
    w = hand['weights']
    np.testing.assert_allclose(w.sum(1), 1, atol=1e-12)
    assert w.min() >= 0
    f = hand['f'].astype(np.int64)
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    assert np.abs(w[edges[:, 0]] - w[edges[:, 1]]).max() < 0.35, 'weights jump across an edge'
    for j in range(1, 16):                      # a real blend zone at every joint
        parent = PARENTS[j]
        assert ((w[:, j] > 0.2) & (w[:, j] < 0.8) & (w[:, parent] > 0.2)).sum() >= 6, j


def test_joints_inside_at_the_knuckles(hand):
    v, f = hand['v_template'], hand['f'].astype(np.int64)
    reg = hand['J_regressor']
    assert reg.min() >= 0 and np.allclose(np.asarray(reg.sum(1)).ravel(), 1)
    assert (np.diff(reg.tocsr().indptr) >= 8).all(), 'each joint averages a ring of vertices'
    joints = reg @ v
    np.testing.assert_allclose(winding_number(joints, v, f), 1, atol=0.02)
    for digit, chain in chains(hand).items():
        d = chain[3] - chain[0]
        along = [(p - chain[0]) @ d for p in chain]
        assert np.all(np.diff(along) > 0), digit   # base -> tip in order
        # knuckles: within a finger's radius of the surface, not buried in the palm
        for p in chain[1:3]:
            assert np.linalg.norm(v - p, axis=1).min() < 0.012, digit


def test_fingertips_are_farthest_points(hand):
    v, w = hand['v_template'], hand['weights']
    joints = hand['J_regressor'] @ v
    for i, digit in enumerate(DIGITS):
        b = BASE[digit]
        finger = np.flatnonzero(w[:, b:b + 3].sum(1) > 0.5)
        dist = np.linalg.norm(v[finger] - joints[b], axis=1)
        assert finger[dist.argmax()] == hand['tip_ids'][i], digit
        assert np.linalg.norm(v[hand['tip_ids'][i]] - joints[b + 2]) > 0.015


def test_positive_rotation_about_z_flexes_like_official_mano(hand):
    pose = np.zeros(48)
    pose[3 * 1 + 2] = np.pi / 2                 # index MCP, +90 deg about +z
    posed, _, _ = naive_lbs(hand, pose)
    tip = hand['tip_ids'][1]
    assert posed[tip, 1] < hand['v_template'][tip, 1] - 0.05    # toward the palm (-y)


# A fist (every finger joint of all five digits at 90 deg), and each joint alone at 90 deg.
FIST = {j: 90 for j in range(1, 16)}
SINGLE = [{j: 90} for j in range(1, 16)]


@pytest.mark.parametrize('angles', [FIST] + SINGLE, ids=['fist'] + [f'joint{j}' for j in range(1, 16)])
def test_flexing_does_not_tear(hand, angles):
    v, f = hand['v_template'], hand['f'].astype(np.int64)
    axes = flexion_axes(hand['J_regressor'] @ v)
    pose = np.zeros(48)
    for j, degrees in angles.items():
        pose[3 * j: 3 * j + 3] = np.radians(degrees) * axes[j]
    posed, _, blend_rot = naive_lbs(hand, pose)
    # Each triangle's normal must follow the blended rotation of its vertices (no fold-over):
    # not the rest normal itself, which a legitimately curled fingertip turns by 180+ deg.
    expected = np.einsum('fab,fb->fa', blend_rot[f].mean(1), face_normals(v, f))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    cos = np.einsum('fi,fi->f', expected, face_normals(posed, f))
    assert cos.min() > np.cos(np.radians(120)), np.degrees(np.arccos(cos.min()))
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]]])
    rest_len = np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1)
    posed_len = np.linalg.norm(posed[edges[:, 0]] - posed[edges[:, 1]], axis=1)
    assert (posed_len < 2 * rest_len + 0.005).all()   # stretched like skin, not torn apart
    # Bent digits go to the palm side: their tips move to -y (the palm faces -y) or, curled all
    # the way round, get closer to a point 2 cm in front of the palm.
    joints = hand['J_regressor'] @ v
    palm = joints[[0, 1, 4, 7, 10]].mean(0) + [0, -0.02, 0]
    tips = hand['tip_ids'][[i for i, d in enumerate(DIGITS)
                            if any(BASE[d] <= j < BASE[d] + 3 for j in angles)]]
    before, after = (np.linalg.norm(x[tips] - palm, axis=1) for x in (v, posed))
    assert ((posed[tips, 1] < v[tips, 1] - 0.005) | (after < before - 0.005)).all()


@pytest.mark.parametrize('k', range(10))
def test_shape_components_stay_plausible(hand, k):
    sd = hand['shapedirs'].reshape(-1, 10)
    gram = sd.T @ sd
    cos = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    assert np.diag(gram)[k] > 0 and (np.abs(cos[k] - np.eye(10)[k]) < 0.05).all()
    rest = segment_lengths(hand)
    f = hand['f'].astype(np.int64)
    for sign in (-2, 2):
        betas = np.zeros(10)
        betas[k] = sign
        v, _, _ = naive_lbs(hand, np.zeros(48), betas)
        for digit, lengths in segment_lengths(hand, v).items():
            for length, length0, (lo, hi) in zip(lengths, rest[digit], RANGES[digit]):
                assert 0.8 < length / length0 < 1.2 and lo <= length <= hi, (k, sign, digit)
        cos_n = np.einsum('fi,fi->f', face_normals(v, f), face_normals(hand['v_template'], f))
        assert cos_n.min() > 0.5, (k, sign)     # smooth deformation: no folded triangles
        vol = np.einsum('fi,fi->f', v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6
        assert 1.5e-4 < vol < 1e-3


def test_random_shapes_stay_plausible(hand):
    """Betas drawn like MANO's (standard normal, clipped to [-2, 2]): every segment within 25 %
    of the template's, hand length 16-21 cm, no folded triangle."""
    rng = np.random.default_rng(0)
    rest = np.concatenate(list(segment_lengths(hand).values()))
    f = hand['f'].astype(np.int64)
    n0 = face_normals(hand['v_template'], f)
    for betas in np.clip(rng.normal(0, 1, (100, 10)), -2, 2):
        v = hand['v_template'] + hand['shapedirs'] @ betas
        ratio = np.concatenate(list(segment_lengths(hand, v).values())) / rest
        assert 0.75 < ratio.min() and ratio.max() < 1.25, betas
        joints = hand['J_regressor'] @ v
        assert 0.16 < np.linalg.norm(v[hand['tip_ids'][2]] - joints[0]) < 0.21
        assert np.einsum('fi,fi->f', face_normals(v, f), n0).min() > 0.3


def test_shape_components_mean_what_they_say(hand):
    sd = hand['shapedirs']
    v0 = hand['v_template']
    j0 = hand['J_regressor'] @ v0
    def effect(k):
        v = v0 + sd[:, :, k]
        return v, hand['J_regressor'] @ v
    v, j = effect(0)                           # 0: size, all lengths by the same factor
    ratios = np.concatenate(list(segment_lengths(hand, v, j).values())) / np.concatenate(
        list(segment_lengths(hand).values()))
    assert ratios.min() > 1.03 and np.ptp(ratios) < 0.01
    v, j = effect(1)                           # 1: finger length, more than palm length
    finger = np.linalg.norm(v[hand['tip_ids'][2]] - j[4]) / np.linalg.norm(
        v0[hand['tip_ids'][2]] - j0[4])
    palm = np.linalg.norm(j[4] - j[0]) / np.linalg.norm(j0[4] - j0[0])
    assert finger > palm + 0.03
    v, _ = effect(2)                           # 2: palm width
    assert np.ptp(v[:, 2]) > np.ptp(v0[:, 2]) + 0.003
    v, _ = effect(3)                           # 3: thickness
    assert np.ptp(v[:, 1]) > np.ptp(v0[:, 1]) + 0.001


def test_pose_correctives_are_small_and_local(hand):
    pd = hand['posedirs'].reshape(len(hand['v_template']), 3, 15, 9)
    joints = hand['J_regressor'] @ hand['v_template']
    angle = np.pi / 2
    for j in range(1, 16):
        feature = np.zeros((15, 9))
        axis = flexion_axes(joints)[j]
        feature[j - 1] = (rodrigues(angle * axis) - np.eye(3)).ravel()
        disp = np.linalg.norm(np.einsum('vcjk,jk->vc', pd, feature), axis=1)
        assert 0.001 < disp.max() < 0.005, j   # a few millimetres
        w = hand['weights']
        blend_zone = (w[:, j] > 0.01) & (w[:, PARENTS[j]] > 0.01)
        assert disp[~blend_zone].max() < 5e-5, j   # < 0.05 mm outside the bones' blend zone


def test_pose_pca(hand):
    comps, mean = hand['hands_components'], hand['hands_mean']
    np.testing.assert_allclose(comps @ comps.T, np.eye(45), atol=1e-10)
    coeffs = hand['hands_coeffs']
    var = coeffs.var(0)
    assert np.all(np.diff(var) <= 1e-12) and var[0] > 5 * var[10]     # a few synergies dominate
    np.testing.assert_allclose(coeffs.mean(0), 0, atol=1e-10)
    # Mean: a relaxed, slightly curled hand: every finger joint flexed 5-60 deg toward the palm.
    axes = flexion_axes(hand['J_regressor'] @ hand['v_template'])
    flex = np.degrees(np.einsum('ji,ji->j', mean.reshape(15, 3), axes[1:]))
    assert (flex > 5).all() and (flex < 60).all(), flex
    # The first component is the grasp synergy: all finger joints flex together.
    first = np.einsum('ji,ji->j', comps[0].reshape(15, 3), axes[1:])
    assert (np.sign(first[:12]) == np.sign(first[0])).all()


def digest(m):
    import hashlib
    arrays = [m[k] for k in ('v_template', 'f', 'weights', 'shapedirs', 'posedirs',
                             'hands_components', 'hands_mean')] + [m['J_regressor'].toarray()]
    return hashlib.sha256(b''.join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def test_lazy_fast_and_same_in_a_fresh_process(hand):
    """Nothing is built at import; the build is fast; another process (another hash seed)
    builds bit-identical arrays."""
    code = ('import time, synthetic as s, test_synthetic as t; '
            'assert s._build.cache_info().currsize == 0; '
            't0 = time.time(); m = s.synthetic_mano(); print(time.time() - t0, t.digest(m))')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, 'tests')]),
               PYTHONHASHSEED='123')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=root, env=env)
    seconds, fingerprint = out.stdout.split()
    assert float(seconds) < 3.0         # ~0.1 s on an idle machine; slack for a busy CI box
    assert fingerprint == digest(hand)


def test_through_the_mano_layer(hand):
    mano = pytest.importorskip('mano')
    if not hasattr(mano, 'MANO'):
        pytest.skip('mano.MANO not written yet')
    import torch
    layer = mano.MANO(synthetic_mano(), dtype=torch.float64)
    rng = np.random.default_rng(0)
    pose = rng.normal(0, 0.4, (3, 48))
    betas = rng.normal(0, 1, (3, 10))
    out = layer(torch.tensor(pose), torch.tensor(betas))
    for b in range(3):
        verts, joints, _ = naive_lbs(hand, pose[b], betas[b])
        np.testing.assert_allclose(out.vertices[b].detach().numpy(), verts, atol=1e-9)
        tips = verts[hand['tip_ids']]
        internal = np.concatenate([joints, tips])[mano.MANO_TO_FREIHAND]
        np.testing.assert_allclose(out.joints[b].detach().numpy(), internal, atol=1e-9)
    # PCA pose input: zero coefficients give the mean pose, hands_mean.
    pca = mano.MANO(synthetic_mano(), ncomps=6, dtype=torch.float64)
    out = pca(torch.zeros(1, 9))
    verts, _, _ = naive_lbs(hand, np.concatenate([np.zeros(3), hand['hands_mean']]))
    np.testing.assert_allclose(out.vertices[0].numpy(), verts, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# Rasterizer against analytic cases
# ----------------------------------------------------------------------------------------------------

def _square(x0, x1, y0, y1, z, f):
    """A camera-facing square whose image is [x0, x1] x [y0, y1] (pixels) at depth z (K: focal f, pp 0)."""
    return np.array([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]], np.float64) * [z / f, z / f, z]


def test_rasterize_square_covers_exactly_its_projection():
    f = 100.0
    K = np.array([[f, 0, 0], [0, f, 0], [0, 0, 1]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    face, bary = synthetic.rasterize(_square(10.5, 50.5, 20.5, 40.5, 2.0, f), faces, K, (64, 64))
    covered = face >= 0
    assert covered.sum() == 40 * 20                               # pixel centres 11..50 x 21..40
    assert covered[21:41, 11:51].all()
    assert np.allclose(bary[covered].sum(1), 1) and (bary[covered] >= -1e-9).all()
    # A square with random sub-pixel bounds: the count matches the area within the perimeter.
    rng = np.random.default_rng(0)
    for _ in range(5):
        x0, y0 = rng.uniform(0, 20, 2)
        x1, y1 = x0 + rng.uniform(10, 40), y0 + rng.uniform(10, 40)
        face, _ = synthetic.rasterize(_square(x0, x1, y0, y1, rng.uniform(0.5, 3), f), faces[:, ::-1], K, (64, 64))
        expected = (np.floor(x1) - np.ceil(x0) + 1) * (np.floor(y1) - np.ceil(y0) + 1)
        assert (face >= 0).sum() == expected


def test_rasterize_matches_brute_force():
    """Scanline spans vs testing every pixel centre against every triangle, on random triangles (some
    with horizontal edges and vertices exactly on pixel rows)."""
    rng = np.random.default_rng(0)
    K = np.array([[20.0, 0, 11.5], [0, 20.0, 11.5], [0, 0, 1]])
    uv = rng.uniform(-4, 28, (60, 2))
    uv[:20, 1] = np.round(uv[:20, 1])                    # vertices on pixel-centre rows
    uv[20:30, 1] = uv[30:40, 1]                          # shared y: horizontal edges
    z = rng.uniform(1, 3, 60)
    verts = np.c_[(uv - 11.5) / 20 * z[:, None], z]
    faces = rng.integers(0, 60, (40, 3))
    faces[:10] = np.c_[np.arange(20, 30), np.arange(30, 40), rng.integers(0, 20, 10)]
    face, _ = synthetic.rasterize(verts, faces, K, (24, 24))
    ys, xs = np.mgrid[0:24, 0:24]
    p = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)      # (576, 2)
    best, best_depth, margin = np.full(576, -1), np.zeros(576), np.full(576, np.inf)
    for k, (a, b, c) in enumerate(faces):
        T = np.array([uv[b] - uv[a], uv[c] - uv[a]]).T
        if abs(np.linalg.det(T)) < 1e-6:
            continue
        l12 = np.linalg.solve(T, (p - uv[a]).T).T                 # (576, 2) barycentric of b and c
        w = np.c_[1 - l12.sum(1), l12]
        inside = (w >= -1e-9).all(1)
        depth = w @ (1 / z[[a, b, c]])
        near = inside & (depth > best_depth)
        margin = np.where(inside, np.minimum(margin, np.abs(depth - best_depth)), margin)
        best, best_depth = np.where(near, k, best), np.where(near, depth, best_depth)
    clear = margin > 1e-6                                         # no depth tie between two triangles
    assert clear.sum() > 300
    assert (face.ravel()[clear] == best[clear]).all()


def test_rasterize_depth_order_and_perspective_interpolation():
    f = 100.0
    K = np.array([[f, 0, 32], [0, f, 32], [0, 0, 1]])
    far = _square(-20.5, 10.5, -20.5, 10.5, 3.0, f)
    near = _square(-5.5, 20.5, -5.5, 20.5, 1.0, f)
    for order in ((far, near), (near, far)):  # the nearer square wins whatever the face order
        verts = np.concatenate(order)
        faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
        face, _ = synthetic.rasterize(verts, faces, K, (64, 64))
        near_ids = {0, 1} if order[0] is near else {2, 3}
        assert face[40, 40] in near_ids and face[30, 30] in near_ids
        assert face[15, 15] not in near_ids and face[15, 15] >= 0
    # A tilted plane: the depth interpolated with the perspective-correct weights equals the ray hit.
    verts = np.array([[-0.5, -0.5, 1.0], [0.5, -0.5, 2.0], [0.5, 0.5, 2.0], [-0.5, 0.5, 1.0]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    face, bary = synthetic.rasterize(verts, faces, K, (64, 64))
    ys, xs = np.nonzero(face >= 0)
    z = (verts[faces[face[ys, xs]]][..., 2] * bary[ys, xs]).sum(1)
    # plane z = 1.5 + x, ray (x, y, 1) t with x = (u - 32) / f t  ->  t = 1.5 / (1 - (u - 32) / f)
    assert np.allclose(z, 1.5 / (1 - (xs - 32) / f))


def test_render_mesh_lambert_shading():
    f = 100.0
    K = np.array([[f, 0, 32], [0, f, 32], [0, 0, 1]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    for tilt in (0.0, 0.6):  # a square rotated about the y axis by `tilt`
        c, s = math.cos(tilt), math.sin(tilt)
        corners = np.array([[-0.2, -0.2, 0], [0.2, -0.2, 0], [0.2, 0.2, 0], [-0.2, 0.2, 0]])
        verts = corners @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]).T + [0, 0, 1.0]
        img, mask = synthetic.render_mesh(verts, faces, K, size=(64, 64), color=(1.0, 0.5, 0.25), light=(0, 0, -1),
                                     ambient=0.3, specular=0.0, antialias=False, return_mask=True)
        expected = np.rint(255 * np.array([1.0, 0.5, 0.25]) * (0.3 + 0.7 * c))
        assert np.abs(img[32, 32].astype(int) - expected).max() <= 1
        assert (img[~mask] == 0).all()
    bg = np.full((64, 64, 3), 77, np.uint8)
    out = synthetic.render_mesh(verts, faces, K, image=bg)
    assert (out[0, 0] == 77).all() and not (out[32, 32] == 77).all()


# ----------------------------------------------------------------------------------------------------
# The picture and the writer of synthetic sets

def test_render_and_cli(tmp_path, monkeypatch):
    from PIL import Image
    layer = MANO(synthetic.synthetic_mano())
    synthetic.render_hand_poses(layer, tmp_path / 'hands.png', size=64)
    assert Image.open(tmp_path / 'hands.png').size == (5 * 64, 64 + 22)
    assert layer.v_template.dtype == torch.float32                      # the caller's layer is untouched
    monkeypatch.delenv('MANO_DIR', raising=False)
    assert synthetic.main(['--render', str(tmp_path / 'x.png'), '--mano', str(tmp_path / 'missing.pkl')]) == 2


def test_synth_is_deterministic_and_cli(tmp_path, capsys):
    a, b, c = (str(tmp_path / x) for x in 'abc')
    assert synthetic.main([a, '--n', '2', '--n_eval', '1', '--seed', '5']) == 0
    assert synthetic.main([b, '--n', '2', '--n_eval', '1', '--seed', '5']) == 0
    synthetic.synth(c, 2, n_eval=1, seed=6)
    read = lambda root, p: open(os.path.join(root, p), 'rb').read()
    for p in ('training/rgb/00000001.jpg', 'training_mano.json', 'evaluation_verts.json'):
        assert read(a, p) == read(b, p) and read(a, p) != read(c, p)
    with pytest.raises(SystemExit) as e:
        synthetic.main([str(tmp_path / 'd'), '--n', '2', '--layout', 'coco'])
    assert e.value.code == 2 and 'layout' in capsys.readouterr().err


def test_synth_samples_do_not_depend_on_batching(layer):
    """Sample i draws only from its own generator: batches of 1 or 64 give the same hands and cameras."""
    prior = synthetic.pose_prior(synthetic.synthetic_mano())
    with torch.no_grad():
        one, all_ = (list(synthetic._scenes(layer, prior, 5, 3, 0, (224, 224), synthetic.FOCAL_RANGE, 224, batch=b))
                     for b in (1, 64))
    for a, b in zip(one, all_):
        assert a[0] == b[0] and all(np.allclose(x, y, atol=1e-6) for x, y in zip(a[2:], b[2:]))
    assert not np.allclose(one[0][5], one[1][5])


def test_sampled_views_are_freihand_like_rotations():
    # sample_view turns the rest hand so that its fingers point up the image (-y) and its palm normal
    # faces the camera (+-z), then tilts and rolls it: check it on the synthetic hand's own rest frame.
    layer = MANO(synthetic.synthetic_mano())
    frame = synthetic.rest_frame(layer(torch.zeros(1, 48)).joints[0].double().numpy())
    assert np.allclose(frame.T @ frame, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(frame), 1)
    rng = np.random.default_rng(0)
    views = np.stack([synthetic.sample_view(rng, frame) for _ in range(300)])      # (300, 3, 3)
    assert np.allclose(views.transpose(0, 2, 1) @ views, np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(views), 1)
    fingers, normal = views @ frame[:, 0], views @ frame[:, 2]                # (300, 3) camera frame
    assert fingers[:, 1].mean() < -0.6                                        # mostly up the image
    assert np.abs(normal[:, 2]).mean() > 0.7                                  # palm or back to the camera
    assert 0.3 < (normal[:, 2] > 0).mean() < 0.7                              # both sides, even odds
    # no tilt and no roll: exactly fingers up, palm normal along the optical axis
    R = synthetic.sample_view(np.random.default_rng(1), frame, roll=0.0, tilt=0.0)
    assert np.allclose(R @ frame[:, 0], [0, -1, 0], atol=1e-9)
    assert np.allclose(np.abs(R @ frame[:, 2]), [0, 0, 1], atol=1e-9)


def test_reference_scores_of_the_sampler_are_ordered():
    """scripts/synth_reference.py: each ideal partial prediction that knows more of the true hand scores better;
    fewer PCA components with less noise leave less beyond the first component."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import synth_reference
    few = synth_reference.reference_scores(synth_reference.ReferenceConfig(n=60))
    assert list(few) == ['mean hand', 'first component', 'first five', 'true fingers, zero betas']
    values = list(few.values())
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 0.5    # the shape is still wrong
    many = synth_reference.reference_scores(synth_reference.ReferenceConfig(n=60, pose_components=45,
                                                                            pose_noise=0.08))
    assert many['first five'] > few['first five'] + 1
