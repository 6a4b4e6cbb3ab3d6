"""A licence-free stand-in for MANO and its datasets: a synthetic MANO-format hand, a z-buffer renderer, and
a writer of labelled synthetic hand sets in the FreiHAND v2 and HO3Dv2 layouts.

MANO (Romero et al. 2017), FreiHAND (Zimmermann et al. 2019) and HO3D (Hampali et al. 2020) are licensed,
so the quick start, the tests and CI run on what this file makes; every other file takes the real ones.
  1. `synthetic_mano()`: a procedural right hand in exactly the official MANO_RIGHT.pkl format.
  2. `rasterize` / `render_mesh`: a numpy z-buffer rasterizer with Lambert shading (also the demo overlays
     of evaluate.py and the picture below).
  3. `render_hand_poses`: the hand in five poses (the README's picture).
  4. `synth`: photo-like renders of random hands (PCA pose synergies, FreiHAND-like views, skin tones,
     backgrounds, occluders, blur, noise, JPEG) with full labels, in the FreiHAND or HO3D layout.
  5. `mano_model(name)`: what a `--mano` value stands for ('synthetic' or a file); `save_mano`.

Run:  python synthetic.py ./hands --n 2000 [--img_size 64] [--mano mano/MANO_RIGHT.pkl]   # FreiHAND layout
      python synthetic.py ./ho3d_synth --n 60 --layout ho3d
      python synthetic.py --render hand.png [--mano PATH]      # the hand in five poses
      python synthetic.py --write_model mano/SYNTH_RIGHT.pkl   # the synthetic hand as a MANO file

Shapes (README legend): S image side, V vertices, F faces, J = 21 joints; the rasterizer counts its (triangle,
row) spans, (triangle, pixel) fragments and covered pixels in words.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import pickletools
import sys
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from engine import atomic_open, option, run_cli, write_atomic
from mano import (FREIHAND_TO_MANO, MANO, OPENGL_TO_OPENCV, axis_angle_to_matrix, find_mano, load_mano,
                  matrix_to_axis_angle, rotate_axis_angle)


# ----------------------------------------------------------------------------------------------------
# 1. The synthetic MANO-format hand

def _unit(x):
    """Vectors along the last axis of x scaled to unit length."""
    return x / np.maximum(np.sqrt(np.einsum('...i,...i->...', x, x)), 1e-12)[..., None]

# A procedurally built right hand in exactly the official MANO file format.
#
# `synthetic_mano()` returns what `load_mano('MANO_RIGHT.pkl')` returns: the same keys, shapes,
# dtypes and 16-joint kinematic tree (plus 'tip_ids', its own fingertip vertices), so every code
# path written for the real model runs on it, and the quick start, tests and CI need no licensed
# file. Frame of the official right hand: metres, fingers along -x, thumb on the +z side, back of
# the hand +y (the palm faces -y), and a positive rotation about a finger's lateral axis (+z for a
# straight finger) flexes it toward the palm, as in the official curled `hands_mean`. The wrist
# joint is at the origin (the official one sits at (0.096, 0.006, 0.006); nothing depends on it).
#
# Construction:
#   1. Skeleton from adult anatomy: joint-to-joint segment lengths after Buryanov & Kotiuk 2010
#      ("Proportions of hand segments"); hand length 18.6 cm (wrist joint to middle tip), palm
#      breadth 8.6 cm, palm 3.2 cm and wrist 5.5 x 3.3 cm, PIP widths 15.5-19.6 mm: adult means.
#   2. Surface: a coarse closed control mesh (the palm a tube of 12-vertex rings capped at the
#      wrist, each digit a tube of hexagonal rings extruded from a face of the palm through a
#      short collar), one Catmull-Clark step, vertices pushed to the limit surface: a smooth
#      closed 2-manifold with outward (counter-clockwise) faces, V = 1128, F = 2252 (MANO: 778,
#      1538). Every joint bends 90 deg without a folded triangle.
#   3. Skinning: every vertex starts on the bone it lies on (cut at the joint planes; palm skin
#      past a knuckle shared between neighbouring fingers), then the weights are diffused over
#      the surface graph: they blend across joints but cannot leak from finger to finger.
#      J_regressor: a ring of vertices around each joint, non-negative weights that average
#      exactly to the joint centre.
#   4. shapedirs: ten interpretable fields (size, finger length, palm width, thickness, ...),
#      blended by the skinning weights and orthogonalised like PCA directions.
#   5. posedirs: a knuckle bulge and palmar crease growing with 1 - cos(flexion).
#   6. hands_components / hands_mean: PCA of a deterministic quasi-random sample of grasp-like
#      poses (a closure synergy, per-finger variation, an opposing thumb, joint limits).
#
# Deterministic (no random numbers; PCA signs fixed), built lazily on the first call (< 1 s).

# Hand frame of the official right hand: distal (wrist -> fingertips), dorsal, radial (thumb side).
_A, _U, _R = np.array([-1., 0, 0]), np.array([0., 1, 0]), np.array([0., 0, 1])
# Long fingers, radial to ulnar: MCP joint (distance along the hand from the wrist joint, lateral
# offset), fan angle (deg, toward the thumb), proximal / middle / distal lengths (joint to joint;
# the last one to the tip of the pad) and the half-width of the proximal phalanx. Metres.
_FINGERS = {'index': ((0.087, 0.025), 8.0, (0.041, 0.025, 0.021), 0.0098),
            'middle': ((0.092, 0.005), 0.0, (0.045, 0.028, 0.022), 0.0100),
            'ring': ((0.086, -0.014), -7.0, (0.042, 0.027, 0.021), 0.0094),
            'pinky': ((0.075, -0.031), -15.0, (0.034, 0.021, 0.019), 0.0082)}
# Thumb: CMC joint (along, dorsal, lateral), metacarpal / proximal / distal lengths, half-width.
_THUMB = ((0.026, -0.014, 0.024), (0.042, 0.031, 0.026), 0.0110)
_MANO_DIGITS = ('index', 'middle', 'pinky', 'ring', 'thumb')   # MANO's joint order 1-3, ..., 13-15
# Palm rings from the forearm cut to the distal palm: (along, half-width, back height, palm depth).
_PALM = ((-0.022, 0.027, 0.017, 0.017), (0.0, 0.028, 0.016, 0.018), (0.020, 0.035, 0.014, 0.019),
         (0.054, 0.041, 0.013, 0.018), (0.074, 0.042, 0.012, 0.015))
# Control rings of a digit beyond its collar: (joint, fraction of the next segment, width and
# thickness in half-widths); a wider knuckle ring, a small tip ring for a round fingertip.
_FINGER_RINGS = ((0, .78, .90, .86), (1, 0, 1.0, .86), (1, .5, .88, .78), (2, 0, .88, .76),
                 (2, .55, .86, .78), (2, .98, .60, .50))
_THUMB_RINGS = ((0, .88, 1.12, 1.0), (1, 0, 1.05, .90), (1, .5, .95, .82), (2, 0, .95, .80),
                (2, .55, .92, .80), (2, .98, .62, .52))


def _skeleton():
    """Per digit in MANO order: joints (4, 3) base..tip, bone axis d, dorsal (nail) axis e2 and
    flexion axis e1 = e2 x d (e1 x e2 = d: a positive rotation about e1 swings d toward -e2)."""
    digits = []
    for name in _MANO_DIGITS[:4]:
        (s, l), fan, lengths, hw = _FINGERS[name]
        d = math.cos(math.radians(fan)) * _A + math.sin(math.radians(fan)) * _R
        joints = s * _A + l * _R + np.cumsum([0, *lengths])[:, None] * d
        digits.append(dict(name=name, joints=joints, d=d, e1=np.cross(_U, d), e2=_U,
                           lengths=lengths, hw=hw))
    (s, h, l), lengths, hw = _THUMB
    # The thumb leaves the thenar ~37 deg radially, dipping toward the palm; it is pronated
    # relative to the fingers: its nail faces dorsal-radially, its pad the palm's centre.
    d = _unit(0.78 * _A + 0.58 * _R - 0.15 * _U)
    e2 = _unit(0.55 * _U + 0.85 * _unit(_R - (_R @ d) * d))
    e2 = _unit(e2 - (e2 @ d) * d)
    joints = s * _A + h * _U + l * _R + np.cumsum([0, *lengths])[:, None] * d
    digits.append(dict(name='thumb', joints=joints, d=d, e1=np.cross(e2, d), e2=e2,
                       lengths=lengths, hw=hw))
    return digits


def _digit_rings(f, base):
    """Control rings along digit f; ring vertex j at the angle of base vertex j around the axis
    (regularly spaced), so the tube leaves its base polygon without a twist."""
    off = base - base.mean(0)
    step = 2 * np.pi * np.arange(len(base)) / len(base)
    ang = step + np.angle(np.exp(1j * (np.arctan2(off @ f['e2'], off @ f['e1']) - step)).mean())
    grow = 1.22                                  # the limit surface lies inside its control polygon
    return [f['joints'][j] + frac * f['lengths'][j] * f['d']
            + grow * f['hw'] * (w * np.cos(ang)[:, None] * f['e1'] + t * np.sin(ang)[:, None] * f['e2'])
            for j, frac, w, t in (_THUMB_RINGS if f['name'] == 'thumb' else _FINGER_RINGS)]


def _control_mesh(digits):
    """Coarse closed polygon mesh: verts (N, 3), faces (vertex lists, counter-clockwise seen from
    outside), face labels (-1 palm, else digit). Palm ring layout: d0..d4 across the back (radial
    to ulnar), m4 ulnar side, p4..p0 across the palm, m0 radial side. Its distal end is tiled by the
    finger bases, hexagons (d_i, d_i+1, m_i+1, p_i+1, p_i, m_i): neighbours share d_i-m_i-p_i,
    which becomes the web; the wrist end by four such hexagons, reversed."""
    cols = [digits[i] for i in (0, 1, 3, 2)]                        # index, middle, ring, pinky
    base = np.array([f['joints'][0] + 0.008 * f['d'] for f in cols])
    hw = np.array([f['hw'] for f in cols])
    side = np.concatenate([base[:1] + 1.08 * hw[0] * cols[0]['e1'], (base[1:] + base[:-1]) / 2,
                           base[3:] - 1.08 * hw[3] * cols[3]['e1']])  # (5, 3) finger boundaries
    thick = np.interp(np.arange(5), [0, 1.5, 4], [hw[0], hw[1:3].mean(), hw[3]])[:, None]
    back = side + 0.95 * thick * _U - 0.004 * _A     # the back of a finger starts at the knuckle,
    front = side - 1.15 * thick * _U + 0.004 * _A    # its palmar skin a little further out
    rings = [np.concatenate([back, side[4:], front[::-1], side[:1]])]   # (12, 3) distal ring
    lat = (rings[0] - rings[0].mean(0)) @ _R
    lat = lat / np.abs(lat).max() * np.array([.9, 1, 1, 1, .9, 1, .9, 1, 1, 1, .9, 1])  # round edges
    pads = np.array([1.15, 1.05, 1.0, 1.1, 1.25])                   # hypothenar .. thenar (p4..p0)
    for s, half_width, top, bottom in _PALM[::-1]:
        arch = 1 - 0.25 * lat ** 2                                  # transverse arches
        under = bottom * arch[6:11] * (pads if s > 0.01 else 1)
        h = np.r_[top * arch[:5], 0, -under, 0] + 0.002
        rings.insert(0, s * _A + (half_width * lat + 0.002)[:, None] * _R + h[:, None] * _U)
    verts = list(np.concatenate(rings))                             # ring k, vertex j: 12 k + j
    thumb_gap = [(2, 9), (2, 10)]                                   # palmar-radial, rings 2-3
    faces = [[12 * k + j, 12 * k + (j + 1) % 12, 12 * k + 12 + (j + 1) % 12, 12 * k + 12 + j]
             for k in range(len(rings) - 1) for j in range(12) if (k, j) not in thumb_gap]
    labels = [-1] * len(faces)
    wrist_mid = (rings[0][[1, 2, 3]] + rings[0][[9, 8, 7]]) / 2 + 0.004 * _A
    webs = side[1:4] + 0.004 * _A
    mids = {}
    for r0, pts in ((0, wrist_mid), (12 * (len(rings) - 1), webs)):
        mids[r0] = [r0 + 11, len(verts), len(verts) + 1, len(verts) + 2, r0 + 5]   # m0..m4
        verts.extend(pts)

    def hexagon(r0, i):
        m = mids[r0]
        return [r0 + i, r0 + i + 1, m[i + 1], r0 + 9 - i, r0 + 10 - i, m[i]]

    def extrude(polygon, label):
        # A collar first: the base polygon shrunk and lifted along its normal (Newell), so the
        # digit leaves the palm cleanly (no slivers in the webs); then the digit's rings; a cap.
        pts = np.array([verts[i] for i in polygon])
        centre, normal = pts.mean(0), _unit(np.cross(pts, np.roll(pts, -1, axis=0)).sum(0))
        collar = centre + 0.8 * (pts - centre) + 0.012 * normal
        prev = polygon
        for r, ring in enumerate([collar] + _digit_rings(digits[label], pts)):
            ids = list(range(len(verts), len(verts) + len(ring)))
            verts.extend(ring)
            n = len(ids)
            faces.extend([prev[j], prev[(j + 1) % n], ids[(j + 1) % n], ids[j]] for j in range(n))
            labels.extend([label if r else -1] * n)    # the collar is skinned as palm
            prev = ids
        faces.append(prev)                             # fingertip cap
        labels.append(label)

    for i, label in enumerate((0, 1, 3, 2)):
        faces.append(hexagon(0, i)[::-1])
        labels.append(-1)
        extrude(hexagon(12 * (len(rings) - 1), i), label)
    extrude([24 + 9, 24 + 10, 24 + 11, 36 + 11, 36 + 10, 36 + 9], 4)   # thumb: the gap's hexagon
    return np.array(verts), faces, np.array(labels)


def _catmull_clark(v, faces):
    """One Catmull-Clark step of a closed polygon mesh -> vertices [moved old ones, edge points,
    face points], quads (one per corner of each old face, same orientation), their old face."""
    size = np.array([len(f) for f in faces])
    corner = np.concatenate(faces)                                  # (C,) vertex at each corner
    fid = np.repeat(np.arange(len(faces)), size)                    # (C,) its face
    start = np.repeat(np.cumsum(size) - size, size)
    pos = np.arange(len(corner)) - start
    nxt = corner[start + (pos + 1) % size[fid]]
    fpt = np.zeros((len(faces), 3))
    np.add.at(fpt, fid, v[corner])
    fpt /= size[:, None]
    nv = len(v)
    keys, eid = np.unique(np.minimum(corner, nxt) * nv + np.maximum(corner, nxt), return_inverse=True)
    efp = np.zeros((len(keys), 3))
    np.add.at(efp, eid, fpt[fid])                                   # the edge's two face points
    ept = (v[keys // nv] + v[keys % nv] + efp) / 4
    n = np.bincount(corner, minlength=nv)[:, None]                  # valence (closed: faces = edges)
    q, r = np.zeros_like(v), np.zeros_like(v)
    np.add.at(q, corner, fpt[fid])
    np.add.at(r, corner, (v[corner] + v[nxt]) / 2)
    vpt = (q / n + 2 * r / n + (n - 3) * v) / n                     # (Q + 2R + (n - 3)P) / n
    eprev = eid[start + (pos - 1) % size[fid]]
    quads = np.stack([corner, nv + eid, nv + len(keys) + fid, nv + eprev], 1)
    return np.concatenate([vpt, ept, fpt]), quads, fid


def _limit_positions(v, quads):
    """Catmull-Clark limit points of a quad mesh: (n^2 v + 4 sum edge-neighbours + sum diagonal
    neighbours) / (n (n + 5)), n the valence."""
    n = np.bincount(quads.ravel(), minlength=len(v))[:, None]
    e, d = np.zeros_like(v), np.zeros_like(v)
    for i in range(4):
        np.add.at(e, quads[:, i], (v[quads[:, (i + 1) % 4]] + v[quads[:, (i + 3) % 4]]) / 2)
        np.add.at(d, quads[:, i], v[quads[:, (i + 2) % 4]])
    return (n ** 2 * v + 4 * e + d) / (n * (n + 5))


def _skinning_weights(v, quads, face_label, digits, iters=9):
    """(V, 16) weights and each vertex's initial bone. Initial: a digit's vertices go to the
    bone they lie on (cut at the joint planes); palm skin past a knuckle goes to that finger
    (soft across the columns: a web to both neighbours), the thenar to the thumb metacarpal,
    the rest to the wrist. Then `iters` averaging steps over the mesh graph blend the joints
    (~1-2 cm) while fingers that touch only through the palm never share weight."""
    nv = len(v)
    digit, other = np.full(nv, -1), np.full(nv, 99)
    fl = np.repeat(face_label, 4)
    np.maximum.at(digit, quads.ravel(), fl)
    np.minimum.at(other, quads.ravel(), np.where(fl < 0, 99, fl))
    digit[other != np.maximum(digit, 0)] = -1             # on palm faces only, or on two digits
    w = np.zeros((nv, 16))
    w[:, 0] = 1
    lat = np.stack([(v - f['joints'][0]) @ f['e1'] for f in digits[:4]], 1)
    share = np.exp(-(lat / 0.008) ** 2)
    share /= share.sum(1, keepdims=True)                  # (V, 4) soft finger columns
    for k, f in enumerate(digits):
        t = (v - f['joints'][0]) @ f['d']                 # distance along the digit
        if k < 4:
            past = (digit == -1) & (t > 0)
            w[past, 0] -= share[past, k]
            w[past, 1 + 3 * k] += share[past, k]
        else:
            radial = np.linalg.norm(v - f['joints'][0] - t[:, None] * f['d'], axis=1)
            w[(digit == -1) & (t > 0) & (radial < 0.02)] = np.eye(16)[13]
        bone = 1 + 3 * k + np.searchsorted(np.cumsum(f['lengths'][:2]), t)
        w[digit == k] = np.eye(16)[bone[digit == k]]
    w = np.maximum(w, 0)                                  # rounding
    label = w.argmax(1)
    i, j = quads.ravel(), np.roll(quads, -1, axis=1).ravel()
    a = scipy.sparse.coo_matrix((np.ones(len(i)), (i, j)), (nv, nv)).tocsr()
    a = (a + a.T > 0) + scipy.sparse.identity(nv)
    step = scipy.sparse.diags(1 / np.asarray(a.sum(1)).ravel()) @ a   # average over the 1-ring
    for _ in range(iters):
        w = step @ w
    return w, label


def _joint_regressor(v, label, joints, digits):
    """(16, V) csc: for each joint the vertices of its two bones in a slab across the bone (a
    ring around a finger joint; the back and palm strips at a knuckle), weighted as uniformly as
    possible while averaging exactly to the joint centre (minimum-norm correction; a vertex that
    would need a negative weight is dropped)."""
    rows = []
    for j in range(16):
        k, i = (j - 1) // 3, (j - 1) % 3
        d = _A if j == 0 else digits[k]['d']
        off = v - joints[j]
        axial = off @ d
        radial = np.linalg.norm(off - axial[:, None] * d, axis=1)
        reach = 0.05 if j == 0 else 0.026 if i == 0 else 2.2 * digits[k]['hw']
        sel = (np.isin(label, [j, 0 if i == 0 else j - 1]) & (radial < reach)
               & (np.abs(axial) < (0.012 if i == 0 else 0.0065)))    # the palm is coarser
        if 0 < j < 13 and i == 0:                                    # a knuckle: its own column
            sel &= np.abs(off @ digits[k]['e1']) < digits[k]['hw']
        sel = np.flatnonzero(sel)
        for _ in range(10):
            a = np.vstack([v[sel].T, np.full(len(sel), 1e3)])       # (4, n), sum to one first
            u = np.full(len(sel), 1 / len(sel))
            wt = u + np.linalg.pinv(a) @ (np.append(joints[j], 1e3) - a @ u)   # pinv: flat rings
            if wt.min() >= 0:
                break
            sel = sel[wt > 0]
        rows.append(scipy.sparse.coo_matrix((wt / wt.sum(), (np.zeros_like(sel), sel)), (1, len(v))))
    return scipy.sparse.vstack(rows).tocsc()


def _shape_dirs(v, w, digits):
    """(V, 3, 10), the change for beta = +1 of: size, finger length, palm width, thickness,
    finger girth, palm length, thumb size, little-finger length, index:ring ratio, palmar
    padding. Digit-wise fields are blended by the skinning weights (smooth; the joints follow),
    made orthogonal in this order (Gram-Schmidt, like MANO's PCA directions: each one beyond
    size is a change of proportion) and scaled to move no vertex more than `largest` mm, so
    that betas drawn like MANO's (N(0, 1) within [-2, 2]) keep segments within ~20 %."""
    member = [w[:, 1 + 3 * k: 4 + 3 * k].sum(1, keepdims=True) for k in range(5)]   # (V, 1) each
    base = [f['joints'][0] for f in digits]
    stretch = [m * np.maximum((v - b) @ f['d'], 0)[:, None] * f['d']
               for m, b, f in zip(member, base, digits)]            # lengthen beyond the base
    girth = sum(m * ((v - b) - ((v - b) @ f['d'])[:, None] * f['d'])
                for m, b, f in zip(member, base, digits))
    w0 = w[:, :1]                                                   # digits move with their base
    lateral = w0 * (v @ _R)[:, None] + sum(m * (b @ _R) for m, b in zip(member, base))
    along = w0 * (v @ _A)[:, None] + sum(m * (b @ _A) for m, b in zip(member, base))
    fields = [v, sum(stretch[:4]) + 0.5 * stretch[4], lateral * _R, (v @ _U)[:, None] * _U, girth,
              along * _A, member[4] * (v - base[4]), stretch[2], stretch[0] - stretch[3],
              w0 * np.minimum(v @ _U, 0)[:, None] * _U]
    largest = (6.5, 2.5, 2.5, 2, 1, 2, 2, 1.5, 1.5, 1.2)   # mm at beta = 1 (size: 3.5 %)
    basis = []
    for f, mm in zip(fields, largest):
        f = f.ravel()
        for b in basis:
            f = f - (f @ b) / (b @ b) * b
        basis.append(f * mm / 1000 / np.linalg.norm(f.reshape(-1, 3), axis=1).max())
    return np.stack(basis, 1).reshape(len(v), 3, 10)


def _pose_dirs(v, w, joints, digits, bulge=0.003, crease=0.0015):
    """(V, 3, 135): at a bent joint the skin of the back bulges out by `bulge` and the palmar skin
    creases in by `crease` (metres at 90 deg), growing with 1 - cos(angle) = -trace(R - I) / 2,
    i.e. driven by the diagonal of that joint's 3x3 block of the pose feature R - I."""
    dirs = np.zeros((len(v), 3, 15, 9))
    for j in range(1, 16):
        f = digits[(j - 1) // 3]
        both = w[:, j] * w[:, 0 if (j - 1) % 3 == 0 else j - 1]
        near = (both / both.max()) ** 2                          # 1 on the joint's blend zone
        off = v - joints[j]
        out = _unit(off - (off @ f['d'])[:, None] * f['d'] + 1e-12)   # away from the bone
        back = out @ f['e2']
        amount = near * (bulge * np.maximum(back, 0) + crease * np.minimum(back, 0))
        dirs[:, :, j - 1, [0, 4, 8]] = -0.5 * (amount[:, None] * out)[:, :, None]
    return dirs.reshape(len(v), 3, 135)


def _quasi_random(n, dims):
    """(n, dims) Kronecker low-discrepancy points in [0, 1): frac(i sqrt(prime_k) + 1/2)."""
    primes = [p for p in range(2, 1000) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
    return (np.arange(1, n + 1)[:, None] * np.sqrt(primes[:dims]) + 0.5) % 1.0


def _pose_samples(digits, n=1554):
    """(n, 45) natural finger poses (absolute axis-angle, MANO order): one grasp closure drives
    every finger (ulnar fingers curl a little more), each finger varies around it, DIP follows
    PIP (~2/3), fingers spread only when open, the thumb opposes as the hand closes; joint
    limits clip; a small jitter of distinct size on all 45 values keeps every PCA axis defined."""
    q = _quasi_random(n, 68)
    close = q[:, 0] ** 1.8                                          # mostly relaxed, some fists
    spread = q[:, 1] * (1 - close)
    deg = np.radians
    rotvec = np.zeros((n, 15, 3))
    for k, f in enumerate(digits[:4]):
        c = np.clip(close * (1, 1.03, 1.09, 1.06)[k] + 0.5 * (q[:, 2 + k] - 0.5), 0, 1)
        noise = q[:, 6 + 3 * k: 9 + 3 * k] - 0.5
        mcp = np.clip(deg(70) * c + deg(30) * noise[:, 0], deg(-20), deg(90))
        pip = np.clip(deg(95) * c + deg(30) * noise[:, 1], 0, deg(110))
        dip = np.clip(0.65 * pip + deg(16) * noise[:, 2], deg(-5), deg(80))
        abduct = deg((12, 2, -18, -8)[k]) * spread                  # about the back's normal
        rotvec[:, 3 * k] = (Rotation.from_rotvec(abduct[:, None] * _U)
                            * Rotation.from_rotvec(mcp[:, None] * f['e1'])).as_rotvec()
        rotvec[:, 3 * k + 1] = pip[:, None] * f['e1']
        rotvec[:, 3 * k + 2] = dip[:, None] * f['e1']
    t = digits[4]
    oppose = np.clip(0.6 * close + 0.5 * (q[:, 18] - 0.3), 0, 1)
    ct = np.clip(close + 0.3 * (q[:, 19] - 0.5), 0, 1)
    rotvec[:, 12] = (Rotation.from_rotvec((deg(25) * (q[:, 20] - 0.5))[:, None] * t['e2'])
                     * Rotation.from_rotvec((deg(30) * oppose)[:, None] * t['e1'])).as_rotvec()
    rotvec[:, 13] = (deg(5) + deg(30) * ct + deg(10) * (q[:, 21] - 0.5))[:, None] * t['e1']
    rotvec[:, 14] = (deg(5) + deg(40) * ct + deg(16) * (q[:, 22] - 0.5))[:, None] * t['e1']
    return rotvec.reshape(n, 45) + deg(2 + 0.05 * np.arange(45)) * (q[:, 23:68] - 0.5)


def _pose_pca(samples):
    """Mean, principal axes as rows by decreasing variance (sign: largest entry positive), and
    the samples' coefficients."""
    mean = samples.mean(0)
    centred = samples - mean
    _, vecs = np.linalg.eigh(centred.T @ centred)                    # ascending eigenvalues
    vt = vecs[:, ::-1].T                                              # (45, 45) rows
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    return mean, vt, centred @ vt.T


@functools.lru_cache(maxsize=1)
def _build():
    digits = _skeleton()
    v, faces, labels = _control_mesh(digits)
    v, quads, coarse = _catmull_clark(v, faces)
    v = _limit_positions(v, quads)
    w, label = _skinning_weights(v, quads, labels[coarse], digits)
    joints = np.concatenate([np.zeros((1, 3))] + [f['joints'][:3] for f in digits])   # (16, 3)
    regressor = _joint_regressor(v, label, joints, digits)
    # Triangles: each quad split along its shorter diagonal.
    short = (np.linalg.norm(v[quads[:, 0]] - v[quads[:, 2]], axis=1)
             <= np.linalg.norm(v[quads[:, 1]] - v[quads[:, 3]], axis=1))
    q = np.where(short[:, None], quads, np.roll(quads, -1, axis=1))
    tris = np.concatenate([q[:, [0, 1, 2]], q[:, [0, 2, 3]]]).astype(np.uint32)    # (F, 3)
    mean, components, coeffs = _pose_pca(_pose_samples(digits))
    tips = []                 # thumb, index, middle, ring, pinky: farthest from the digit's base
    for k in (4, 0, 1, 3, 2):
        on = w[:, 1 + 3 * k: 4 + 3 * k].sum(1) > 0.5
        tips.append(int(np.where(on, np.linalg.norm(v - joints[1 + 3 * k], axis=1), -1).argmax()))
    parents = [4294967295, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]   # official: uint32 -1
    return {'v_template': v, 'f': tris, 'weights': w, 'J_regressor': regressor, 'J': regressor @ v,
            'kintree_table': np.array([parents, list(range(16))], dtype=np.int64),
            'shapedirs': _shape_dirs(v, w, digits), 'posedirs': _pose_dirs(v, w, joints, digits),
            'hands_components': components, 'hands_mean': mean, 'hands_coeffs': coeffs,
            'bs_style': 'lbs', 'bs_type': 'lrotmin', 'tip_ids': np.array(tips, dtype=np.int64)}


def synthetic_mano():
    """The synthetic right hand: a dict in the official MANO_RIGHT.pkl layout (fresh copies)."""
    return {k: v.copy() if hasattr(v, 'copy') else v for k, v in _build().items()}


# ----------------------------------------------------------------------------------------------------
# 2. A z-buffer rasterizer with Lambert shading (numpy, vectorized over (triangle, pixel) pairs)

def _reduce3(op, x):
    """op (np.minimum, np.maximum, np.add) over the 3 columns of x (N, 3): 7x faster than x.min(1) and co."""
    return op(op(x[:, 0], x[:, 1]), x[:, 2])


def project(points, K):
    """(..., N, 3) camera-frame points, (..., 3, 3) intrinsics -> (..., N, 2) pixels (numpy or torch)."""
    uvw = points @ K.swapaxes(-1, -2)
    return uvw[..., :2] / uvw[..., 2:]


def rasterize(verts, faces, K, size):
    """The triangle visible at each pixel centre of a pinhole image, and where on it: verts (V, 3) camera
    frame, faces (F, 3), K (3, 3), size (H, W) -> face (H, W) int64 (-1 = background), bary (H, W, 3)
    perspective-correct barycentric weights. Vectorized scanline: each (triangle, row) pair gets the x-span
    of pixel centres inside the triangle, spans expand into (triangle, pixel) fragments, and the nearest
    fragment of each pixel wins (the z-buffer as one sort). Triangles behind the camera are dropped."""
    H, W = size
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    z = v[:, 2]
    keep = np.nonzero((z[f] > 1e-6).all(1))[0]
    t = project(v, np.asarray(K, np.float64))[f[keep]]  # (F, 3, 2) pixel corners
    # Edge functions: the weight of corner i at pixel (x, y) is the signed area of (p, i+1, i+2) over
    # that of the triangle: an affine function a x + b y + c, zero on the edge opposite corner i.
    p1, p2 = t[:, [1, 2, 0]], t[:, [2, 0, 1]]  # (F, 3, 2) the two other corners of each corner
    abc = np.stack([p1[..., 1] - p2[..., 1], p2[..., 0] - p1[..., 0],
                    p1[..., 0] * p2[..., 1] - p2[..., 0] * p1[..., 1]], -1)  # (F, 3, 3)
    area = abc[:, 0, 0] * t[:, 0, 0] + abc[:, 0, 1] * t[:, 0, 1] + abc[:, 0, 2]  # (F,) twice signed area
    ok = np.abs(area) > 1e-9  # degenerate (edge-on) triangles cover nothing
    keep, t, coef = keep[ok], t[ok], abc[ok] / area[ok, None, None]
    # Rows: every pixel-centre row y crossing each triangle.
    ty = t[..., 1]
    y0 = np.ceil(_reduce3(np.minimum, ty)).clip(0, H).astype(np.int64)
    ny = np.maximum(np.floor(_reduce3(np.maximum, ty)).clip(-1, H - 1).astype(np.int64) - y0 + 1, 0)
    row_tri = np.repeat(np.arange(len(keep)), ny)                                      # (spans,)
    row_y = np.repeat(y0, ny) + np.arange(len(row_tri)) - np.repeat(np.cumsum(ny) - ny, ny)
    a, s = coef[row_tri, :, 0], coef[row_tri, :, 1] * row_y[:, None] + coef[row_tri, :, 2]  # (spans, 3)
    # Along a row w_i = a_i x + s_i >= 0: a lower bound on x where a_i > 0, an upper one where a_i < 0.
    with np.errstate(divide='ignore', invalid='ignore'):
        bound = -s / a
    lo = _reduce3(np.maximum, np.where(a > 0, bound, -np.inf))
    hi = _reduce3(np.minimum, np.where(a < 0, bound, np.inf))
    x0 = np.ceil(lo - 1e-7).clip(0, W).astype(np.int64)
    nx = np.maximum(np.floor(hi + 1e-7).clip(-1, W - 1).astype(np.int64) - x0 + 1, 0)
    nx[_reduce3(np.logical_or, (a == 0) & (s < 0))] = 0  # any horizontal edge (a_i = 0) that the row lies outside of
    # Fragments: every pixel of every span.
    frag_row = np.repeat(np.arange(len(row_tri)), nx)                                  # (fragments,)
    px = np.repeat(x0, nx) + np.arange(len(frag_row)) - np.repeat(np.cumsum(nx) - nx, nx)
    tri, py = row_tri[frag_row], row_y[frag_row]
    w = coef[tri, :, 0] * px[:, None] + coef[tri, :, 1] * py[:, None] + coef[tri, :, 2]  # (fragments, 3)
    inv_z = 1 / z[f[keep[tri]]]                                                         # (fragments, 3)
    depth = _reduce3(np.add, w * inv_z)  # 1/z, not z, is affine in screen space
    pix = py * W + px
    face, bary = np.full(H * W, -1, np.int64), np.zeros((H * W, 3))
    if len(pix):
        # Nearest first within each pixel, one sort: pixel id + a fraction that grows with depth.
        order = np.argsort(pix + 0.5 * (1 - depth / depth.max()))
        first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]]
        face[pix[first]] = keep[tri[first]]
        b = w[first] * inv_z[first]  # perspective correction: weights w_i / z_i, renormalized
        bary[pix[first]] = b / _reduce3(np.add, b)[:, None]
    return face.reshape(H, W), bary.reshape(H, W, 3)


def vertex_normals(verts, faces):
    """(V, 3) unit normals: the area-weighted sum of the adjacent face normals."""
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # (F, 3), length = 2 x area
    vn = np.zeros_like(v)
    np.add.at(vn, f, fn[:, None].repeat(3, 1))  # each face adds its normal to its 3 corners
    return _unit(vn)


def _interp(attr, corners, b):
    """(V, C) per-vertex attribute -> (pixels, C) at pixels with corner ids (pixels, 3) and weights b (pixels, 3)."""
    return attr[corners[:, 0]] * b[:, :1] + attr[corners[:, 1]] * b[:, 1:2] + attr[corners[:, 2]] * b[:, 2:]


def _smooth(x):
    """[1, 2, 1] / 4 filter along both image axes (edge pixels replicated)."""
    x = np.concatenate([x[:1], x, x[-1:]], 0)
    x = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
    x = np.concatenate([x[:, :1], x, x[:, -1:]], 1)
    return (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4


def render_mesh(verts, faces, K, image=None, size=None, color=(0.85, 0.66, 0.56), light=(0.4, -0.5, -1.0),
                ambient=0.35, specular=0.1, antialias=True, return_mask=False):
    """Shade a mesh over `image` ((H, W, 3) uint8; black of `size` (H, W) when None) -> (H, W, 3) uint8
    (and the (H, W) bool coverage with return_mask). Lambert: albedo (ambient + (1 - ambient) max(0, n.l))
    plus a small Blinn-Phong highlight, n the interpolated vertex normal turned towards the camera (the face
    winding does not matter), `light` from surface to light, `color` (3,) or (V, 3) per vertex."""
    H, W = image.shape[:2] if image is not None else size
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    face, bary = rasterize(v, f, K, (H, W))
    m = face >= 0
    corners, b = f[face[m]], bary[m]                      # (covered, 3) corner ids and weights
    n = _unit(_interp(vertex_normals(v, f), corners, b))  # (covered, 3)
    ray = _unit(_interp(v, corners, b))                   # (covered, 3) surface point = camera ray
    n[np.einsum('ij,ij->i', n, ray) > 0] *= -1
    l = np.asarray(light, np.float64) / np.linalg.norm(light)
    half = _unit(l - ray)                                 # Blinn-Phong half vector
    color = np.asarray(color, np.float64)
    albedo = _interp(color, corners, b) if color.ndim == 2 else color
    shade = ambient + (1 - ambient) * np.clip(n @ l, 0, None)
    rgb = albedo * shade[:, None] + specular * np.clip(np.einsum('ij,ij->i', n, half), 0, None)[:, None] ** 32
    layer, alpha = np.zeros((H, W, 3)), m.astype(np.float64)
    layer[m] = np.clip(rgb, 0, 1)
    if antialias:  # premultiplied colour and coverage, filtered together: no dark halo
        layer, alpha = _smooth(layer), _smooth(alpha)
    bg = np.zeros((H, W, 3)) if image is None else np.asarray(image, np.float64) / 255
    out = np.rint(255 * (layer + (1 - alpha)[..., None] * bg)).clip(0, 255).astype(np.uint8)
    return (out, m) if return_mask else out


# ----------------------------------------------------------------------------------------------------
# 3. A picture of the hand in five poses

def _palm_frame(J):
    """Unit vectors (up, palm normal) from the rest skeleton (16, 3). For a right hand in any
    right-handed frame, (index1 - wrist) x (pinky1 - wrist) points out of the palm."""
    normal = torch.linalg.cross(J[1] - J[0], J[7] - J[0])
    normal = normal / normal.norm()
    up = J[4] - J[0]                                          # wrist -> middle finger base
    up = up - (up @ normal) * normal
    return up / up.norm(), normal


def demo_poses(mano):
    """(5, 48) poses built from the rest skeleton, so they suit any MANO-format model: flat, mean
    (the PCA origin), fist, pointing, spread. A finger joint flexes about bone x palm normal (which
    turns the bone toward the palm); spreading turns the finger bases about the palm normal."""
    J = (mano.J_regressor @ mano.v_template).double().cpu()   # (16, 3)
    _, normal = _palm_frame(J)
    flex_axis, spread_axis = torch.zeros(16, 3, dtype=J.dtype), torch.zeros(16, 3, dtype=J.dtype)
    for j in range(1, 16):  # MANO order: fingers are joints 1-3, 4-6, ..., 13-15 (thumb), base to tip
        bone = J[j + 1] - J[j] if j % 3 else J[j] - J[j - 1]
        axis = torch.linalg.cross(bone, normal)
        flex_axis[j] = axis / axis.norm()
        if j % 3 == 1 and j != 4:  # bases other than the middle finger move away from the middle one
            away = torch.linalg.cross(normal, bone) @ (J[j] - J[4])
            spread_axis[j] = normal * torch.sign(away)

    def deg(*angles):  # angles of joints 1-15 in degrees -> (16, 1) radians, wrist first
        return torch.tensor((0.,) + angles, dtype=J.dtype)[:, None] * torch.pi / 180

    fist, tuck = deg(*[75, 85, 55] * 4, 20, 30, 45), deg(*[0] * 12, -40, 0, 0)  # tuck: thumb over the palm
    point = fist.clone()
    point[1:4] = 0                                            # the index finger stays straight
    spread = deg(15, 0, 0, 0, 0, 0, 30, 0, 0, 15, 0, 0, 25, 0, 0)
    poses = [0 * flex_axis, fist * flex_axis + tuck * spread_axis, point * flex_axis + tuck * spread_axis,
             spread * spread_axis]                            # (16, 3) each
    poses.insert(1, torch.cat([torch.zeros(1, 3, dtype=J.dtype), mano.hands_mean.double().cpu().view(15, 3)]))
    return torch.stack(poses).flatten(1)                      # (5, 48)


def render_hand_poses(mano, path, size=256):
    """Draw the hand in the `demo_poses`, side by side, from a three-quarter palm view, with `render_mesh`
    (the README's picture of the synthetic hand)."""
    names = ['flat', 'mean pose', 'fist', 'pointing', 'spread']
    with torch.no_grad():
        verts = mano(demo_poses(mano)).vertices.double().cpu()     # (5, V, 3)
        up, normal = _palm_frame((mano.J_regressor @ mano.v_template).double().cpu())
        M = torch.stack([torch.linalg.cross(up, normal), -up, -normal])  # palm to camera, fingers up
        M = axis_angle_to_matrix(torch.tensor([0.35, -0.6, 0.0], dtype=M.dtype)) @ M
        verts = (verts @ M.T).numpy()
    lo, hi = verts.min(1), verts.max(1)                              # (5, 3) per-panel boxes
    S, f = 2 * size, 100.0 * size                                    # 2x supersampled, a long lens
    z = f * (hi - lo)[:, :2].max() / (0.88 * S)                      # the largest hand spans 88% of a panel
    K = np.array([[f, 0, (S - 1) / 2], [0, f, (S - 1) / 2], [0, 0, 1]])
    canvas = Image.new('RGB', (size * len(names), size + 22), 'white')
    for k, name in enumerate(names):
        v = verts[k] - (lo[k] + hi[k]) / 2 + [0, 0, z]
        panel = render_mesh(v, mano.faces.cpu().numpy(), K, image=np.full((S, S, 3), 255, np.uint8),
                            color=(0.89, 0.71, 0.59), light=(0.3, -0.4, -1.0))
        canvas.paste(Image.fromarray(panel).resize((size, size), Image.LANCZOS), (k * size, 0))
        ImageDraw.Draw(canvas).text((k * size + size // 2 - 3 * len(name), size + 4), name, fill='black')
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------
# 4. Synthetic hand sets in the FreiHAND v2 (or HO3Dv2) layout

SKIN_TONES = np.array([[255, 224, 196], [241, 194, 161], [224, 172, 135], [198, 140, 102],
                       [161, 110, 76], [120, 80, 55], [92, 62, 45]]) / 255
FOCAL_RANGE = (400.0, 650.0)  # px for a 224 crop: our estimate of FreiHAND's range (hand ~0.4-0.8 m away)


def _random_color(rng):
    """RGB in [0, 1] from muted to saturated, dark to light: value U(0.15, 1), saturation U(0, 0.8)."""
    s = rng.uniform(0, 0.8)
    return rng.uniform(0.15, 1) * (1 - s + s * rng.random(3))


def procedural_background(rng, h, w):
    """(h, w, 3) uint8: a gradient, smooth noise, stripes or blobs in random colours, plus fine grain."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(a) + yy * np.sin(a)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        t = (along - along.min()) / max(np.ptp(along), 1e-6)
    elif kind == 1:  # value noise: random grids of a few cells, upsampled bicubically, two octaves
        t = sum(np.asarray(Image.fromarray((rng.random((c, c)) * 255).astype(np.uint8)).resize(
            (w, h), Image.BICUBIC), np.float64) / 255 * wgt for c, wgt in ((3, 0.6), (9, 0.4)))
    elif kind == 2:  # stripes, soft or hard, of lower contrast too
        t = np.clip(0.5 + rng.uniform(0.5, 4) * np.sin(2 * np.pi * rng.uniform(2, 12) * along), 0, 1)
        t = t * rng.uniform(0.3, 1)
    else:  # blobs: overlapping ellipses, blurred
        t = np.zeros((h, w))
        for _ in range(rng.integers(4, 12)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * max(h, w)
            t = np.where((xx * max(h, w) - cx) ** 2 + (yy * max(h, w) - cy) ** 2 < r * r, rng.random(), t)
    c1, c2 = _random_color(rng), _random_color(rng)
    bg = c1 + t[..., None] * (c2 - c1) + rng.normal(0, rng.uniform(0.005, 0.04), (h, w, 1))
    img = Image.fromarray((255 * bg.clip(0, 1)).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(2)) if kind == 3 else img)


def add_occluders(img, rng, box, count):
    """Paint `count` opaque shaded objects (ball, box, cylinder) over the hand box [x0, y0, x1, y1].
    Shapes are analytic in a rotated frame (u along, v across), edges anti-aliased by their distance."""
    h, w = img.shape[:2]
    out = img.astype(np.float64) / 255
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    side = max(box[2] - box[0], box[3] - box[1])
    for _ in range(count):
        cx, cy = rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])
        ang, r = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3) * side
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        kind = rng.integers(3)
        if kind == 0:  # ball: radial shading
            a, b = r, r * rng.uniform(0.6, 1)
            d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            alpha, shade = np.clip((1 - d) * b + 0.5, 0, 1), 1 - 0.5 * np.clip(d, 0, 1) ** 2
        else:  # box (flat) or cylinder (cos shading across its axis)
            a, b = r * rng.uniform(1, 3 if kind == 2 else 1.5), r * rng.uniform(0.3, 0.8)
            alpha = np.clip(np.minimum(a - np.abs(u), b - np.abs(v)) + 0.5, 0, 1)
            shade = 0.45 + 0.55 * np.cos(np.clip(v / b, -1, 1) * 1.3) if kind == 2 else 0.8 + 0.2 * u / a
        rgb = _random_color(rng)[None, None] * shade[..., None]
        out = out * (1 - alpha[..., None]) + rgb * alpha[..., None]
    return np.rint(255 * out.clip(0, 1)).astype(np.uint8)


def pose_prior(model):
    """A MANO dict's PCA pose prior: mean (45,), components (45, 45) as rows, per-component std (from the
    official file's hands_coeffs; unit variance without them)."""
    coeffs = model.get('hands_coeffs')
    std = np.asarray(coeffs, np.float64).std(0) if coeffs is not None and len(coeffs) > 1 else np.ones(45)
    return dict(mean=np.asarray(model['hands_mean'], np.float64),
                components=np.asarray(model['hands_components'], np.float64), std=std)


def rest_frame(joints):
    """(3, 3) rotation whose columns are the rest hand's finger direction (wrist -> middle MCP), its
    across-palm direction (pinky MCP -> index MCP, made orthogonal) and palm normal, from (21, 3) joints."""
    axis = _unit(joints[9] - joints[0])
    side = joints[5] - joints[17]
    side = _unit(side - (side @ axis) * axis)
    return np.stack([axis, side, np.cross(axis, side)], 1)


def _rotation(axis, angle):
    """Rotation matrix (3, 3) by `angle` rad about the unit `axis` (Rodrigues)."""
    return axis_angle_to_matrix(torch.as_tensor(np.asarray(axis, np.float64) * angle)).numpy()


def sample_view(rng, frame, roll=math.radians(60), tilt=0.45, max_tilt=1.1):
    """A FreiHAND-like camera-frame global rotation (3, 3) of a hand whose rest pose has `rest_frame` `frame`.

    FreiHAND's hands mostly show the palm or the back to the camera, fingers roughly up, with a moderate
    tilt: the hand is turned so its fingers point up the image (-y) and its palm normal along -z or +z
    (even odds), then tilted about the image x and y axes by N(0, tilt) rad (clipped to max_tilt) and rolled
    in the image plane by U(-roll, roll) (training adds +-30 degrees of roll by augmentation). Rotations
    drawn over the whole sphere are unlike real hand data sets and show many hands edge-on, where the
    finger pose is hard to see."""
    facing = 1.0 if rng.random() < 0.5 else -1.0
    up, normal = np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, facing])
    target = np.stack([up, np.cross(normal, up), normal], 1)  # same handedness as `frame`'s columns
    tx, ty = np.clip(rng.normal(0, tilt, 2), -max_tilt, max_tilt)
    R = _rotation([1, 0, 0], tx) @ _rotation([0, 1, 0], ty) @ target @ frame.T
    return _rotation([0, 0, 1], rng.uniform(-roll, roll)) @ R


@dataclass
class HandSampler:
    """How synthetic hands are drawn (each field is a `python synthetic.py` flag).

    Fingers: the first `pose_components` axes of the model's PCA pose prior with their own spread (natural
    hand poses are strongly synergistic: 6 axes hold 95% of the synthetic prior's variance), then independent
    N(0, pose_noise) rad on each of the 45 values, then each joint's angle limited to `max_angle` rad. View:
    `sample_view` with `roll` degrees and `tilt` rad. `occlusion`: chance of occluding objects on an image.
    Reference PA-MPVPE of these defaults (README, Results): mean hand 11.5 mm, the first component right
    6.6 mm, the true fingers with zero betas 1.9 mm; 45 components with 0.08 rad noise: 12.8, 8.5, 1.9 mm."""
    pose_components: int = 6
    pose_noise: float = 0.02
    max_angle: float = 1.6
    roll: float = 60.0
    tilt: float = 0.45
    occlusion: float = 0.3


def sample_hand(rng, prior, frame, sampler=HandSampler()):
    """Random right hand: (48,) absolute pose and (10,) betas ~ N(0, 1) clipped to [-2, 2], drawn as
    `sampler` says (PCA synergies plus small noise; palm or back towards the camera, moderate tilt and
    roll) for a hand whose rest pose has `rest_frame` `frame`."""
    k = sampler.pose_components
    coeffs = rng.normal(size=45) * prior['std']
    fingers = prior['mean'] + coeffs[:k] @ prior['components'][:k]
    fingers = (fingers + rng.normal(0, sampler.pose_noise, 45)).reshape(15, 3)
    angle = np.linalg.norm(fingers, axis=1, keepdims=True)
    fingers = fingers * np.minimum(1, sampler.max_angle / np.maximum(angle, 1e-9))  # (15, 3) angle-limited
    R = sample_view(rng, frame, roll=math.radians(sampler.roll), tilt=sampler.tilt)
    glob = matrix_to_axis_angle(torch.as_tensor(R)).numpy()
    return np.concatenate([glob, fingers.reshape(45)]), np.clip(rng.normal(size=10), -2, 2)


def render_hand(rng, verts, faces, K, size, occlude_p=0.3):
    """One photo-like image of a posed hand: procedural background, skin-toned Lambert shading with a
    random light, occluders on some images, then blur and noise. Returns (H, W, 3) uint8 and the
    (H, W) bool hand silhouette (amodal: occluders do not cut it)."""
    H, W = size
    tone = np.clip(SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.08, 3), 0, 1)
    light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), -rng.uniform(0.3, 1.5)])
    img, mask = render_mesh(verts, faces, K, image=procedural_background(rng, H, W), color=tone, light=light,
                            ambient=rng.uniform(0.25, 0.5), specular=rng.uniform(0, 0.15), return_mask=True)
    if rng.random() < occlude_p and mask.any():
        ys, xs = np.nonzero(mask)
        img = add_occluders(img, rng, (xs.min(), ys.min(), xs.max(), ys.max()), rng.integers(1, 3))
    pil = Image.fromarray(img)
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    img = np.asarray(pil, np.float64)
    if rng.random() < 0.5:
        img = img + rng.uniform(1, 6) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.rint(img).clip(0, 255).astype(np.uint8), mask


class _JsonList:
    """A JSON list written one entry at a time (memory stays flat for any n) through engine.atomic_open:
    an interrupted run never leaves a truncated annotation file. Entered as a context manager."""

    def __init__(self, path):
        self.opened, self.sep = atomic_open(path, 'w'), '['

    def __enter__(self):
        self.f = self.opened.__enter__()
        return self

    def append(self, obj):
        self.f.write(self.sep + json.dumps(obj, separators=(',', ':')))  # dumps: C encoder, dump: Python
        self.sep = ','

    def __exit__(self, *exc):
        if exc[0] is None:
            self.f.write('[]' if self.sep == '[' else ']')
        return self.opened.__exit__(*exc)


def _r(a, d=7):
    """Nested lists for JSON, rounded to 7 decimals (0.1 micrometre): smaller files, far below label noise."""
    return np.round(np.asarray(a, np.float64), d).tolist()


def _scenes(layer, prior, count, seed, code, size, focal, hand_px, spread=0.0, batch=64,
            sampler=HandSampler()):
    """`count` random hands, each seen by its own random camera with image size (H, W): yields (i, rng, pose
    (48,), betas (10,), J0 (3,), verts (V, 3), joints (21, 3), K (3, 3)), camera frame. Sample i draws only
    from the generator seeded [seed, code, i], so batching and order do not change the set. The hand spans
    ~hand_px px, up to `spread` x the image size off-centre; J0 is its wrist before the translation."""
    H, W = size
    frame = rest_frame(layer(torch.zeros(1, 48)).joints[0].double().numpy())
    for start in range(0, count, batch):
        ids = range(start, min(count, start + batch))
        rngs = [np.random.default_rng([seed, code, i]) for i in ids]
        poses, betas = (np.stack(x) for x in zip(*[sample_hand(rng, prior, frame, sampler) for rng in rngs]))
        out = layer(torch.as_tensor(poses, dtype=torch.float32), torch.as_tensor(betas, dtype=torch.float32))
        verts, joints = out.vertices.double().numpy(), out.joints.double().numpy()  # (B, V, 3), (B, 21, 3)
        for b, (i, rng) in enumerate(zip(ids, rngs)):
            f = rng.uniform(*focal)
            c = (np.array([W, H]) - 1) / 2 + rng.uniform(-8, 8, 2)  # principal point near the centre
            K = np.array([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1]])
            # the hand's box centre on the optical axis, at the depth where it spans 55-85% of hand_px
            lo, hi = verts[b].min(0), verts[b].max(0)
            extent = max(hi[:2] - lo[:2])
            z = max(f * extent / (rng.uniform(0.55, 0.85) * hand_px), (hi[2] - lo[2]) / 2 + 0.1)  # z > 0
            t = -(lo + hi) / 2 + np.array([*rng.normal(0, 0.04 * extent, 2), z])
            t[:2] += rng.uniform(-spread, spread, 2) * np.array([W, H]) * z / f  # pixels -> metres at depth z
            yield i, rng, poses[b], betas[b], joints[b, 0], verts[b] + t, joints[b] + t, K


def freihand_mano_to_mesh(mano61, K, layer):
    """FreiHAND's 61 values (B, 61) and K (B, 3, 3) -> verts (B, V, 3), joints (B, 21, 3), absolute pose
    (B, 48), camera frame. As the official toolbox (utils/model.py): pose[3:] is relative to hands_mean;
    uv_root is the pixel projection of keypoint 9 (middle MCP) and the last value s = f / z of it, so it
    back-projects to xyz_root = ((u - px) / s, (v - py) / s, f / s) with f = (fx + fy) / 2; the posed
    mesh is translated so that its keypoint 9 lands there."""
    mano61, K = torch.as_tensor(mano61, dtype=torch.float64), torch.as_tensor(K, dtype=torch.float64)
    pose = mano61[:, :48].clone()
    pose[:, 3:] += layer.hands_mean.double()
    out = layer(pose.float(), mano61[:, 48:58].float())
    s = mano61[:, 60:61]
    f = 0.5 * (K[:, 0, 0] + K[:, 1, 1])[:, None]
    xyz_root = torch.cat([(mano61[:, 58:60] - K[:, :2, 2]) / s, f / s], 1)  # (B, 3)
    t = (xyz_root - out.joints[:, 9].double())[:, None]                      # (B, 1, 3)
    return out.vertices.double() + t, out.joints.double() + t, pose


def mesh_to_freihand_mano(pose, betas, joints, K, hands_mean):
    """FreiHAND's (61,) MANO vector of a hand: (48,) absolute pose, (10,) betas, camera-frame joints (21, 3)
    and K (the inverse of `freihand_mano_to_mesh`). Exact when fx == fy (FreiHAND's own approximation)."""
    f = 0.5 * (K[0, 0] + K[1, 1])
    uv_root = project(joints[9:10], K)[0]
    return np.concatenate([pose[:3], pose[3:] - hands_mean, betas, uv_root, [f / joints[9, 2]]])


def _synth_freihand(out, layer, prior, n, n_eval, seed, versions, size, sampler):
    """FreiHAND v2 layout: rgb (+ mask) jpgs and the training_* / evaluation_* JSON files."""
    faces, hands_mean = layer.faces.numpy(), layer.hands_mean.double().numpy()
    for code, (split, count, n_versions) in enumerate((('training', n, versions), ('evaluation', n_eval, 1))):
        for sub in ('rgb', 'mask'):
            os.makedirs(os.path.join(out, split, sub), exist_ok=True)
        scenes = _scenes(layer, prior, count, seed, code, (size, size), FOCAL_RANGE, size, sampler=sampler)
        with contextlib.ExitStack() as files:
            labels = {k: files.enter_context(_JsonList(os.path.join(out, f'{split}_{k}.json')))
                      for k in ('K', 'mano', 'xyz', 'verts', 'scale')}
            for i, rng, pose, betas, _, v, j, K in tqdm(scenes, total=count, desc=f'synth {split}', unit='hand'):
                for version in range(n_versions):
                    look = np.random.default_rng([seed, code, i, version])  # appearance of this version
                    img, mask = render_hand(look, v, faces, K, (size, size), sampler.occlusion)
                    Image.fromarray(img).save(os.path.join(out, split, 'rgb', '%08d.jpg' % (i + version * count)),
                                              quality=int(look.integers(60, 96)))
                Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out, split, 'mask', '%08d.jpg' % i),
                                                                  quality=95)
                labels['K'].append(_r(K))
                labels['mano'].append([_r(mesh_to_freihand_mano(pose, betas, j, K, hands_mean))])
                labels['xyz'].append(_r(j))
                labels['verts'].append(_r(v))
                labels['scale'].append(float(np.linalg.norm(j[9] - j[10])))


def _synth_ho3d(out, layer, prior, n, n_eval, seed, sampler, size=(480, 640), per_seq=20):
    """HO3Dv2 layout: {train,evaluation}/<seq>/{rgb/<id>.png, meta/<id>.pkl}, train.txt, evaluation.txt.
    Annotations in the OpenGL frame and MANO+tips order, as HO3D stores them; the evaluation meta has
    only the wrist and the hand box. evaluation_{xyz,verts}.json (same frame and order) are our own GT."""
    C = OPENGL_TO_OPENCV
    with _JsonList(os.path.join(out, 'evaluation_xyz.json')) as gt_xyz, \
            _JsonList(os.path.join(out, 'evaluation_verts.json')) as gt_verts:
        for code, (split, count) in enumerate((('train', n), ('evaluation', n_eval)), start=2):
            names = []
            scenes = _scenes(layer, prior, count, seed, code, size, (580, 640), 180, spread=0.25,  # hand ~180 px
                             sampler=sampler)
            for i, rng, pose, betas, J0, v, j, K in tqdm(scenes, total=count, desc=f'synth ho3d {split}', unit='img'):
                seq, fid = 'SYN%02d' % (i // per_seq), '%04d' % (i % per_seq)
                img, _ = render_hand(rng, v, layer.faces.numpy(), K, size, occlude_p=0.6)  # hands holding objects
                for sub in ('rgb', 'meta'):
                    os.makedirs(os.path.join(out, split, seq, sub), exist_ok=True)
                Image.fromarray(img).save(os.path.join(out, split, seq, 'rgb', fid + '.png'), compress_level=1)
                # The same hand in the OpenGL frame: C is a rotation, so MANO(pose_gl, betas) + trans_gl = C x
                # with R_gl = C R and trans_gl = C (J0 + t) - J0 = C j[0] - J0 (the rotation pivots about J0).
                pose_gl = np.concatenate([rotate_axis_angle(C, pose[:3]), pose[3:]])
                joints_gl = (j @ C)[FREIHAND_TO_MANO]
                if split == 'train':
                    meta = dict(handPose=pose_gl, handBeta=betas, handTrans=C @ j[0] - J0, handJoints3D=joints_gl,
                                camMat=K)
                else:
                    uv = project(v, K)
                    meta = dict(handJoints3D=joints_gl[0], camMat=K,
                                handBoundingBox=np.concatenate([uv.min(0), uv.max(0)]).round())
                    gt_xyz.append(_r(joints_gl))
                    gt_verts.append(_r(v @ C))
                with open(os.path.join(out, split, seq, 'meta', fid + '.pkl'), 'wb') as fh:
                    pickle.dump(meta, fh, protocol=2)
                names.append(f'{seq}/{fid}')
            with open(os.path.join(out, f'{split}.txt'), 'w') as fh:
                fh.write('\n'.join(names) + '\n')


def synth(out, n, mano='synthetic', layout='freihand', seed=0, n_eval=-1, versions=1, img_size=224, **sampler):
    """Render a synthetic labelled hand set into `out`; `sampler`: `HandSampler` fields. Returns `out`."""
    if layout not in ('freihand', 'ho3d'):
        raise ValueError(f"layout must be 'freihand' or 'ho3d', got {layout!r}")
    if n < 1 or versions < 1:
        raise ValueError(f'--n and --versions must be at least 1 (got {n}, {versions})')
    n_eval = max(1, n // 10) if n_eval < 0 else n_eval
    model = mano_model(mano)
    layer, prior, sampler = MANO(model), pose_prior(model), HandSampler(**sampler)
    os.makedirs(out, exist_ok=True)
    settings = dict(out=os.fspath(out), n=n, n_eval=n_eval, layout=layout, mano=mano, seed=seed, versions=versions,
                    img_size=img_size, **dataclasses.asdict(sampler))
    write_atomic(os.path.join(out, 'synth_config.json'), json.dumps(settings))  # data.resolve_mano reads `mano`
    with torch.no_grad():
        if layout == 'freihand':
            _synth_freihand(out, layer, prior, n, n_eval, seed, versions, img_size, sampler)
        else:
            _synth_ho3d(out, layer, prior, n, n_eval, seed, sampler)
    return out


# ----------------------------------------------------------------------------------------------------
# 5. MANO files: the synthetic hand written as one, and the model a --mano name stands for

def mano_model(name='synthetic'):
    """The MANO dict a `--mano` value stands for: 'synthetic' (this file's hand), or a MANO_RIGHT.pkl / .npz
    path or folder (mano.find_mano: also $MANO_DIR and ./mano/MANO_RIGHT.pkl when None)."""
    return synthetic_mano() if str(name) == 'synthetic' else load_mano(find_mano(name))


def save_mano(d, path):
    """Write a MANO dict as .npz (no pickle involved) or as a plain .pkl of numpy arrays and a scipy.sparse
    J_regressor, the layout that smplx/manopth read (engine.atomic_open)."""
    with atomic_open(str(path)) as f:
        if str(path).endswith('.npz'):
            np.savez(f, **{k: v.toarray() if scipy.sparse.issparse(v) else np.asarray(v) for k, v in d.items()})
        else:
            f.write(_portable_pickle(dict(d)))



def _portable_pickle(obj):
    """Protocol 2 (as the official file) with the module names that numpy 1 and old scipy also know.

    numpy 2 pickles arrays through its private `numpy._core` and scipy >= 1.8 sparse matrices through
    `scipy.sparse._csc`; older versions (the ones chumpy-era MANO libraries pin) lack those modules,
    while new versions still accept `numpy.core` and `scipy.sparse.csc`. Protocol 2 names globals with
    a text GLOBAL opcode, so the names are rewritten at exactly those opcodes (found with pickletools).
    """
    data = pickle.dumps(obj, protocol=2)
    renames = (('numpy._core.', 'numpy.core.'), ('scipy.sparse._csc', 'scipy.sparse.csc'))
    out, last = [], 0
    for op, arg, pos in pickletools.genops(data):
        if op.name != 'GLOBAL':
            continue
        module, name = arg.split(' ', 1)
        renamed = next((new + module[len(old):] for old, new in renames if module.startswith(old)), module)
        if renamed != module:                       # the opcode is b'c' module b'\n' name b'\n'
            out += [data[last:pos], f'c{renamed}\n{name}\n'.encode('ascii')]
            last = pos + len(module) + len(name) + 3
    return b''.join(out + [data[last:]])


# ----------------------------------------------------------------------------------------------------
# 6. Command line

@dataclass
class SynthConfig:
    """Render synthetic hands in the FreiHAND v2 (or HO3Dv2) layout; or draw the hand; or write it as a MANO file."""
    out: str = option('', 'output folder of the synthetic set', positional=True)
    n: int = option(2000, 'training samples')
    n_eval: int = option(-1, 'held-out evaluation samples (-1: n // 10, at least 1)')
    layout: str = option('freihand', 'FreiHAND v2 or HO3Dv2 layout', choices=['freihand', 'ho3d'])
    mano: str = option('synthetic', "MANO model: 'synthetic' or a MANO_RIGHT.pkl path")
    seed: int = option(0, 'random seed (sample i draws from the seeds [seed, split, i])')
    versions: int = option(1, 'FreiHAND training versions: re-renderings with new looks')
    img_size: int = option(224, 'FreiHAND image side (FreiHAND: 224)')
    pose_components: int = option(HandSampler.pose_components, 'PCA pose components sampled (45 = all); the '
                                                               'others stay at the mean')
    pose_noise: float = option(HandSampler.pose_noise, 'independent N(0, this) rad on each of the 45 finger values')
    max_angle: float = option(HandSampler.max_angle, "each finger joint's angle limit, rad")
    roll: float = option(HandSampler.roll, 'in-plane roll U(-roll, roll), degrees')
    tilt: float = option(HandSampler.tilt, 'out-of-plane tilt N(0, tilt) rad about x and y')
    occlusion: float = option(HandSampler.occlusion, 'chance of occluding objects on a FreiHAND-layout image '
                                                     '(HO3D layout: 0.6)')
    render: str = option('', 'instead: draw the hand (--mano) in five poses into this PNG')
    write_model: str = option('', 'instead: write the synthetic hand as a MANO-format .pkl (or .npz) file')


def run(cfg):
    if cfg.write_model:
        save_mano(synthetic_mano(), cfg.write_model)
        print(f'wrote the synthetic MANO model to {cfg.write_model}')
    if cfg.render:
        render_hand_poses(MANO(mano_model(cfg.mano)), cfg.render)
        print(f'wrote {cfg.render}')
    if cfg.out:
        print(json.dumps(dataclasses.asdict(cfg)))
        synth(**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ('render', 'write_model')})
    elif not (cfg.render or cfg.write_model):
        raise ValueError('nothing to do: give an output folder (python synthetic.py ./hands --n 2000), '
                         '--render hand.png or --write_model mano/SYNTH_RIGHT.pkl')


def main(argv=None):
    return run_cli(SynthConfig, run, argv)


if __name__ == '__main__':
    sys.exit(main())
