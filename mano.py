"""MANO hand model in plain PyTorch: a chumpy-free loader and a fast, differentiable layer.

MANO (Romero, Tzionas & Black, "Embodied Hands", SIGGRAPH Asia 2017) is SMPL's hand: a template
mesh deformed by shape and pose blend shapes, then posed by linear blend skinning (LBS) over a
16-joint kinematic tree. We use the right hand only. This file holds:

  * `load_mano(path)`: the official MANO_RIGHT.pkl read WITHOUT chumpy, through a restricted
    unpickler that admits only numpy, scipy.sparse and inert stand-ins for chumpy classes (a pickle
    naming anything else is refused before any of it runs); also `.npz` copies (`save_mano`).
  * `MANO(nn.Module)`: pose (axis-angle, rotation matrices or PCA coefficients) + betas + translation
    -> vertices (B, V, 3) and 21 joints (B, 21, 3) in the internal FreiHAND order, metres. The maths
    is that of smplx `lbs.py` and manopth; the kinematic chain runs level by level (all five fingers
    at once), the rigid transforms of the skeleton are kept as rotation + translation.
  * `axis_angle_to_matrix` / `matrix_to_axis_angle` and the MANO <-> FreiHAND joint permutations.

Run:  python mano.py --render hand.png [--mano PATH|synthetic]     # a picture of the hand in 5 poses
      python mano.py --write-synthetic mano/SYNTH_RIGHT.pkl        # the stand-in model as a MANO .pkl
Shapes: B batch, V vertices (778 for MANO), J = 16 skeleton joints, L = 10 betas, F faces.
"""
import argparse
import functools
import math
import os
import pickle
import pickletools
import sys
from typing import NamedTuple

import numpy as np
import scipy.sparse
import torch
import torch.nn as nn
from scipy.spatial.transform import Rotation

# MANO's joint order plus fingertips is: wrist, index1-3, middle1-3, pinky1-3, ring1-3, thumb1-3,
# tips (thumb, index, middle, ring, pinky). internal = mano_plus_tips[MANO_TO_FREIHAND] gives the
# FreiHAND/OpenPose order: wrist, thumb, index, middle, ring, pinky, each base -> tip.
MANO_TO_FREIHAND = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]
FREIHAND_TO_MANO = [0, 5, 6, 7, 9, 10, 11, 17, 18, 19, 13, 14, 15, 1, 2, 3, 4, 8, 12, 16, 20]
# Fingertip vertices of the official 778-vertex mesh (manopth's choice; smplx and the FreiHAND toolbox
# use slightly different ids, see the README). Thumb, index, middle, ring, pinky.
MANO_TIP_IDS = [745, 317, 444, 556, 673]


# ----------------------------------------------------------------------------------------------------
# Rotations
# ----------------------------------------------------------------------------------------------------

def axis_angle_to_matrix(aa):
    """Rodrigues' formula, (..., 3) -> (..., 3, 3); exact and with finite gradients at angle 0.

    R = I + sin(t)/t K + (1 - cos t)/t^2 K^2 with K = [aa]_x and t = |aa|. Writing the coefficients
    as sin(t)/t = torch.sinc(t/pi) and (1 - cos t)/t^2 = torch.sinc(t/2pi)^2 / 2 avoids dividing by t
    and the cancellation in 1 - cos t.
    """
    angle = aa.norm(dim=-1)[..., None, None]                              # (..., 1, 1)
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))  # (..., 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    a, b = torch.sinc(angle / torch.pi), 0.5 * torch.sinc(angle / (2 * torch.pi)) ** 2
    return eye + a * K + b * (K @ K)


def matrix_to_axis_angle(R):
    """Inverse of `axis_angle_to_matrix`, (..., 3, 3) -> (..., 3), angle in [0, pi].

    The antisymmetric part of R gives sin(t) n, the trace gives cos(t). Near t = pi, sin(t) n is
    too small to carry the axis, so there it is read from the symmetric part instead:
    (R + R^T) / 2 - cos(t) I = (1 - cos t) n n^T, whose largest column is parallel to n.
    """
    sin_axis = 0.5 * torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                                  R[..., 1, 0] - R[..., 0, 1]], -1)          # (..., 3) = sin(t) n
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.atan2(sin_axis.norm(dim=-1), cos)                        # (...,)
    # t / sin(t) * sin(t) n; used for t < 2pi/3 only (sinc > 0.4), the clamp keeps t = pi's gradient finite
    aa_small = sin_axis / torch.sinc(angle / torch.pi).clamp_min(0.1)[..., None]
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    nnT = (R + R.transpose(-1, -2)) / 2 - cos[..., None, None] * eye       # (1 - cos t) n n^T
    k = nnT.diagonal(dim1=-2, dim2=-1).argmax(-1)                          # (...,) column with largest n_k^2
    col = torch.take_along_dim(nnT, k[..., None, None].expand(*k.shape, 3, 1), -1)[..., 0]  # (..., 3)
    axis = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    axis = torch.where((axis * sin_axis).sum(-1, keepdim=True) < 0, -axis, axis)  # sign from sin(t) n
    return torch.where((cos < -0.5)[..., None], angle[..., None] * axis, aa_small)


# ----------------------------------------------------------------------------------------------------
# Loading MANO files (official .pkl without chumpy, .npz) and finding them
# ----------------------------------------------------------------------------------------------------

class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle named a class outside the MANO allow-list; nothing from the file was executed."""


class _Stub:
    """Inert stand-in for a chumpy or scipy.sparse object: it only keeps the state it is given."""
    qualname, state = '', None

    def __setstate__(self, state):
        self.state = state


def _latin1_encode(text, encoding='latin1'):
    # How Python 3 writes bytes into protocol-2 pickles: _codecs.encode(str, 'latin1'). Only that.
    if encoding not in ('latin1', 'latin-1'):
        raise UnsafePickleError(f'refusing _codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


class _MANOUnpickler(pickle.Unpickler):
    """Resolves only the globals a MANO file needs. `find_class` runs when the pickle *names* a
    global, before anything is called, so a refused name means no code from the file ran."""

    def find_class(self, module, name):
        module = {'copy_reg': 'copyreg', '__builtin__': 'builtins'}.get(module, module)  # Python 2 names
        module = module.replace('numpy._core.', 'numpy.core.')                          # numpy 2 names
        allowed = {
            ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
            ('numpy.core.multiarray', '_reconstruct'): np.ndarray((0,)).__reduce__()[0],  # whatever numpy
            ('numpy.core.multiarray', 'scalar'): np.float64(0).__reduce__()[0],          # version we run
            ('copyreg', '_reconstructor'): _reconstructor, ('builtins', 'object'): object,
            ('builtins', 'set'): set,                       # chumpy's bookkeeping (`_dirty_vars`)
            ('_codecs', 'encode'): _latin1_encode,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        sparse = ('csc_matrix', 'csr_matrix', 'csc_array', 'csr_array')
        if module.split('.')[0] == 'chumpy' or (module.startswith('scipy.sparse') and name in sparse):
            return type(name, (_Stub,), {'qualname': f'{module}.{name}'})  # turned into arrays by _plain()
        raise UnsafePickleError(
            f"refusing to load '{module}.{name}' from this pickle: a MANO model file contains only "
            f"numpy arrays, scipy.sparse matrices and chumpy arrays, and unpickling any other class could "
            f"run arbitrary code. Nothing from the file was executed. If you trust the file, convert it "
            f"once to .npz (mano.save_mano) in an environment that can load it.")


def _reconstructor(cls, base, state):
    # copyreg._reconstructor, how protocols 0-1 create plain objects: cls went through find_class.
    if base is not object:
        raise UnsafePickleError(f'refusing copyreg._reconstructor with base {base!r}')
    return object.__new__(cls)


def _plain(obj):
    """Replace the stand-ins by numpy arrays / scipy matrices, recursively."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if not isinstance(obj, _Stub):
        return obj
    s, kind = obj.state if isinstance(obj.state, dict) else {}, obj.qualname.rsplit('.', 1)[1]
    if obj.qualname.startswith('scipy.'):  # rebuilt from its arrays: old and new scipy agree on these
        make = scipy.sparse.csc_matrix if kind.startswith('csc') else scipy.sparse.csr_matrix
        return make((s['data'], s['indices'], s['indptr']), shape=s.get('_shape', s.get('shape')))
    if kind == 'Ch' or (kind not in ('Select', 'Reshape', 'transpose') and 'x' in s):
        return np.asarray(_plain(s['x']))  # a chumpy leaf keeps its value in `x`
    a = np.asarray(_plain(s['a']))
    if kind == 'Select':
        a = a.ravel()[s['idxs']]
        return a.reshape(s['preferred_shape']) if 'preferred_shape' in s else a
    if kind == 'Reshape':
        return a.reshape(s['newshape'])
    if kind == 'transpose':
        return np.transpose(a, s.get('axes'))
    raise ValueError(f'chumpy node {obj.qualname} is not supported; convert the file to .npz with chumpy')


def _help():
    return ("It is searched at --mano PATH, then $MANO_DIR/MANO_RIGHT.pkl, then ./mano/MANO_RIGHT.pkl. "
            "The official file comes from the MANO website (https://mano.is.tue.mpg.de) after accepting "
            "its licence; this project never ships or downloads it. `--mano synthetic` runs everything "
            "with the built-in synthetic hand instead.")


def find_mano(path=None):
    """'synthetic' | an explicit file or folder | $MANO_DIR/MANO_RIGHT.pkl | ./mano/MANO_RIGHT.pkl."""
    if path is not None and str(path) == 'synthetic':
        return 'synthetic'
    if path is not None:
        tried = [os.path.join(path, 'MANO_RIGHT.pkl') if os.path.isdir(path) else str(path)]
    else:
        tried = [os.path.join(os.environ['MANO_DIR'], 'MANO_RIGHT.pkl')] if os.environ.get('MANO_DIR') else []
        tried.append(os.path.join('mano', 'MANO_RIGHT.pkl'))
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"MANO model not found (tried {', '.join(tried)}). {_help()}")


def load_mano(path):
    """Read a MANO model into a dict of numpy arrays under MANO's key names ('J_regressor' sparse).

    `path`: the official .pkl (no chumpy needed), an .npz written by `save_mano`, or 'synthetic'.
    """
    if str(path) == 'synthetic':
        return _check_mano(synthetic_mano(), 'the synthetic model')
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'MANO model file {path} does not exist. {_help()}')
    try:
        if path.endswith('.npz'):
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k].item() if z[k].dtype.kind == 'U' else z[k] for k in z.files}
        else:
            with open(path, 'rb') as f:  # latin1: how numpy arrays in Python 2 pickles must be read
                d = _plain(_MANOUnpickler(f, encoding='latin1').load())
    except UnsafePickleError:
        raise
    except Exception as e:  # EOFError, BadZipFile, UnpicklingError, KeyError ...: all mean "unreadable"
        raise ValueError(f'could not read the MANO model {path}: it looks truncated or corrupt '
                         f'({type(e).__name__}: {e}). Expected a MANO_RIGHT.pkl or a .npz written by '
                         f'mano.save_mano; download or convert it again. {_help()}') from e
    if not isinstance(d, dict):
        raise ValueError(f'{path} holds a {type(d).__name__}, not a MANO model dict. {_help()}')
    return _check_mano(d, path)


def _check_mano(d, source):
    """Shapes must be those of a right-hand MANO model with its own vertex count V."""
    d = dict(d)
    if 'J_regressor' in d and not scipy.sparse.issparse(d['J_regressor']):
        d['J_regressor'] = scipy.sparse.csc_matrix(np.asarray(d['J_regressor'], np.float64))
    V = np.shape(d['v_template'])[0] if 'v_template' in d else None
    expected = {'v_template': (V, 3), 'shapedirs': (V, 3, 10), 'posedirs': (V, 3, 135),
                'J_regressor': (16, V), 'weights': (V, 16), 'kintree_table': (2, 16), 'f': (None, 3),
                'hands_components': (45, 45), 'hands_mean': (45,)}
    problems = []
    for key, shape in expected.items():
        got = np.shape(d[key]) if key in d else None
        if got is None:
            problems.append(f"key '{key}' is missing")
        elif len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
            want = '(' + ', '.join('V' if e == V else 'F' if e is None else str(e) for e in shape) + ')'
            problems.append(f"'{key}' has shape {got}, expected {want}")
    if not problems:
        faces, parents = np.asarray(d['f']), _parents(d['kintree_table'])
        if faces.size == 0 or faces.min() < 0 or faces.max() >= V:
            problems.append(f"faces 'f' index vertices outside [0, {V})")
        if any(not 0 <= p < j for j, p in enumerate(parents[1:], 1)):
            problems.append(f"kintree_table parents {parents} do not list parents before children")
    if problems:
        raise ValueError(
            f"{source} is not a right-hand MANO model: {'; '.join(problems)}. Expected MANO's arrays with "
            f"V vertices (778 in MANO_RIGHT.pkl): v_template (V, 3), shapedirs (V, 3, 10), posedirs "
            f"(V, 3, 135), J_regressor (16, V), weights (V, 16), kintree_table (2, 16), f (F, 3), "
            f"hands_components (45, 45), hands_mean (45,). A body model (SMPL: 6890 vertices, 24 joints) "
            f"will not do. {_help()}")
    d['f'] = np.asarray(d['f']).astype(np.int64)
    return d


def save_mano(d, path):
    """Write a MANO dict as .npz (no pickle involved) or as a plain .pkl of numpy arrays and a scipy.sparse
    J_regressor, the layout that smplx/manopth read. Atomic: temp file + rename."""
    path, tmp = str(path), str(path) + '.tmp'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, 'wb') as f:
        if path.endswith('.npz'):
            np.savez(f, **{k: v.toarray() if scipy.sparse.issparse(v) else np.asarray(v)
                           for k, v in d.items()})
        else:
            f.write(_portable_pickle(dict(d)))
    os.replace(tmp, path)


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
# Synthetic stand-in model (SPEC.md section 3)
# ----------------------------------------------------------------------------------------------------
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
# Tests: python -m pytest -q tests/test_synthetic_hand.py.

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


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


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


def _parents(kintree_table):
    # Row 0 of kintree_table holds the parents; the root's entry is uint32(-1) = 4294967295.
    return [-1] + [int(p) for p in np.asarray(kintree_table)[0, 1:]]


# ----------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------

def tree_levels(parents):
    """Joint ids grouped by depth in the tree (parents listed before children): MANO has 4 levels,
    [wrist], [5 finger bases], [5 middle joints], [5 distal joints]."""
    depth = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return [[j for j, d in enumerate(depth) if d == level] for level in range(max(depth) + 1)]


def forward_kinematics(rotmats, joints, parents, levels):
    """Compose local rotations along the tree into world rotations and posed joint positions.

    rotmats (B, J, 3, 3) local rotations; joints (B, J, 3) rest-pose joints; `levels` groups joints
    whose parents are all in earlier groups (`tree_levels`; one joint per group gives the classic
    joint-by-joint loop). Joint j's local transform is [R_j | J_j - J_parent] (the root: [R_0 | J_0]),
    so its world transform is R_world = R_world[p] R_j, t_world = R_world[p] (J_j - J_p) + t_world[p].
    Returns R_world (B, J, 3, 3) and t_world (B, J, 3) = the posed joints.
    """
    R_world, t_world = torch.empty_like(rotmats), torch.empty_like(joints)
    roots = levels[0]
    R_world[:, roots], t_world[:, roots] = rotmats[:, roots], joints[:, roots]
    for ids in levels[1:]:
        par = [parents[j] for j in ids]
        bone = (joints[:, ids] - joints[:, par]).unsqueeze(-1)              # (B, n, 3, 1)
        R_world[:, ids] = R_world[:, par] @ rotmats[:, ids]
        t_world[:, ids] = (R_world[:, par] @ bone).squeeze(-1) + t_world[:, par]
    return R_world, t_world


class ManoOutput(NamedTuple):
    vertices: torch.Tensor  # (B, V, 3) metres
    joints: torch.Tensor    # (B, 21, 3) metres, internal FreiHAND order


class MANO(nn.Module):
    """Differentiable MANO: `MANO(model)(pose, betas=None, transl=None) -> ManoOutput`.

    model: 'synthetic', a file path (see `find_mano`) or a dict from `load_mano`. pose: (B, 48)
    absolute axis-angle (zero = flat hand), or (B, 16, 3, 3) rotation matrices, or with `ncomps` set
    (B, 3 + ncomps) = global axis-angle + PCA coefficients (fingers = hands_mean + coeffs @ components).
    The model arrays are non-persistent buffers: they follow .to(device/dtype) but stay out of
    state_dict (checkpoints never carry the licensed MANO data). float32 unless `dtype` says otherwise.
    """

    def __init__(self, model='synthetic', ncomps=None, dtype=torch.float32):
        super().__init__()
        d = model if isinstance(model, dict) else load_mano(find_mano(model))
        V = len(d['v_template'])
        tips = d.get('tip_ids', MANO_TIP_IDS if V == 778 else None)
        if tips is None:
            raise ValueError(f"this model has {V} vertices and no 'tip_ids': the official fingertip ids "
                             f"only apply to MANO's 778-vertex mesh; add 'tip_ids' (5,) to the model dict")
        self.num_verts, self.ncomps = V, ncomps
        self.parents = _parents(d['kintree_table'])
        self.levels = tree_levels(self.parents)
        jreg = d['J_regressor'].toarray() if scipy.sparse.issparse(d['J_regressor']) else d['J_regressor']
        as_float = lambda x: torch.as_tensor(np.asarray(x, np.float64), dtype=dtype)  # noqa: E731
        buffers = {
            'v_template': as_float(d['v_template']),                          # (V, 3)
            'shapedirs': as_float(d['shapedirs']),                            # (V, 3, L)
            'posedirs': as_float(d['posedirs']).reshape(V * 3, -1).T,         # (135, V*3)
            'J_regressor': as_float(jreg),                                    # (J, V)
            'weights': as_float(d['weights']),                                # (V, J)
            'hands_mean': as_float(d['hands_mean']),                          # (45,)
            'hands_components': as_float(d['hands_components'][:ncomps]),     # (ncomps or 45, 45)
            'faces': torch.as_tensor(np.asarray(d['f'], np.int64)),           # (F, 3)
            'tip_ids': torch.as_tensor(np.asarray(tips, np.int64)),           # (5,)
            'to_freihand': torch.tensor(MANO_TO_FREIHAND),                    # (21,)
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.contiguous(), persistent=False)

    def pose_to_rotmats(self, pose):
        """Any accepted pose format -> local joint rotations (B, J, 3, 3)."""
        J = len(self.parents)
        pose = pose.to(self.v_template)
        if pose.dim() == 4 and pose.shape[1:] == (J, 3, 3):
            return pose
        width = 3 * J if self.ncomps is None else 3 + self.ncomps
        if pose.dim() == 2 and pose.shape[1] == width:
            if self.ncomps is not None:  # PCA: global axis-angle + coefficients of finger synergies
                fingers = self.hands_mean + pose[:, 3:] @ self.hands_components  # (B, 45) absolute
                pose = torch.cat([pose[:, :3], fingers], 1)                      # (B, 48)
            return axis_angle_to_matrix(pose.reshape(-1, J, 3))                 # (B, J, 3, 3)
        kind = 'axis-angle' if self.ncomps is None else f'global axis-angle + {self.ncomps} PCA coefficients'
        raise ValueError(f'MANO pose must be (B, {width}) {kind} or (B, {J}, 3, 3) rotation matrices; '
                         f'got {tuple(pose.shape)}')

    def forward(self, pose, betas=None, transl=None):
        """pose (see the class docstring), betas (B, L) or None = mean shape, transl (B, 3) or None."""
        # Under AMP the network may run in bf16/fp16; the mesh is computed in the module's dtype.
        with torch.autocast(self.v_template.device.type, enabled=False):
            return self._forward(pose, betas, transl)

    def _forward(self, pose, betas, transl):
        rotmats = self.pose_to_rotmats(pose)                                  # (B, J, 3, 3)
        B, J, V = rotmats.shape[0], rotmats.shape[1], self.num_verts
        if betas is None:
            betas = rotmats.new_zeros(B, self.shapedirs.shape[-1])
        betas = betas.to(rotmats)

        # 1. Shape blend shapes (MANO eq. 2): v_shaped[b, v] = T[v] + sum_l betas[b, l] S[v, :, l]
        v_shaped = self.v_template + (betas @ self.shapedirs.view(V * 3, -1).T).view(B, V, 3)
        # 2. Skeleton joints regressed from the shaped, unposed mesh: J = J_regressor v_shaped
        joints = self.J_regressor @ v_shaped                                  # (B, J, 3)
        # 3. Pose blend shapes, driven by R - I of the 15 finger joints (so the flat hand adds nothing;
        #    the root is excluded: a global rotation must not deform the hand).
        eye = torch.eye(3, dtype=rotmats.dtype, device=rotmats.device)
        pose_feature = (rotmats[:, 1:] - eye).reshape(B, -1)                 # (B, 135)
        v_posed = v_shaped + (pose_feature @ self.posedirs).view(B, V, 3)
        # 4. Kinematic chain, one tree level (up to five fingers) at a time
        R_world, t_world = forward_kinematics(rotmats, joints, self.parents, self.levels)
        # 5. Linear blend skinning: relative to the rest pose joint j moves points by
        #    x -> R_world x + (t_world - R_world J_rest); each vertex blends these with its weights.
        t_rel = t_world - (R_world @ joints.unsqueeze(-1)).squeeze(-1)         # (B, J, 3)
        A = torch.cat([R_world, t_rel.unsqueeze(-1)], -1).view(B, J, 12)      # (B, J, 12) = [R | t] rows
        T = (self.weights @ A).view(B * V, 3, 4)                              # (B*V, 3, 4)
        vertices = torch.baddbmm(T[..., 3:], T[..., :3], v_posed.reshape(B * V, 3, 1))  # t + R v_posed
        vertices = vertices.view(B, V, 3)
        # 6. 16 skeleton joints + 5 fingertip vertices, reordered to the internal FreiHAND order
        joints21 = torch.cat([t_world, vertices[:, self.tip_ids]], 1)[:, self.to_freihand]  # (B, 21, 3)
        if transl is not None:
            transl = transl.to(vertices).unsqueeze(1)                         # (B, 1, 3)
            vertices, joints21 = vertices + transl, joints21 + transl
        return ManoOutput(vertices, joints21)


# ----------------------------------------------------------------------------------------------------
# A picture of the hand: python mano.py --render OUT.png
# ----------------------------------------------------------------------------------------------------

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


def _paint(verts, faces, size, scale, center, color=(226, 180, 150)):
    """Painter's algorithm: triangles (camera axes x right, y down, z away) drawn far to near,
    Lambert shaded from a light at the camera (two-sided, so face orientation does not matter)."""
    from PIL import Image, ImageDraw
    tri = verts[faces]                                        # (F, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    light = np.array([0.3, -0.4, -1.0]) / np.linalg.norm([0.3, -0.4, -1.0])
    shade = 0.3 + 0.7 * np.abs(normal @ light)                # (F,)
    xy = (tri[..., :2] - center) * scale + size / 2           # (F, 3, 2) pixels
    img = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(img)
    for i in np.argsort(-tri[:, :, 2].mean(1)):
        c = tuple(int(v * shade[i]) for v in color)
        draw.polygon([tuple(p) for p in xy[i]], fill=c, outline=c)
    return img


def render_demo(mano, path, size=256):
    """Draw the hand in the `demo_poses`, side by side, from a three-quarter palm view."""
    from PIL import Image, ImageDraw
    names = ['flat', 'mean pose', 'fist', 'pointing', 'spread']
    with torch.no_grad():
        verts = mano(demo_poses(mano)).vertices.double().cpu()     # (5, V, 3)
        up, normal = _palm_frame((mano.J_regressor @ mano.v_template).double().cpu())
        M = torch.stack([torch.linalg.cross(up, normal), -up, -normal])  # palm to camera, fingers up
        M = axis_angle_to_matrix(torch.tensor([0.35, -0.6, 0.0], dtype=M.dtype)) @ M
        verts = (verts @ M.T).numpy()
    lo, hi = verts[..., :2].min(1), verts[..., :2].max(1)      # (5, 2) per-panel bounding boxes
    scale = 2 * 0.88 * size / (hi - lo).max()                  # one scale for all, 2x supersampled
    canvas = Image.new('RGB', (size * len(names), size + 22), 'white')
    for k, name in enumerate(names):
        panel = _paint(verts[k], mano.faces.cpu().numpy(), 2 * size, scale, (lo[k] + hi[k]) / 2)
        canvas.paste(panel.resize((size, size), Image.LANCZOS), (k * size, 0))
        ImageDraw.Draw(canvas).text((k * size + size // 2 - 3 * len(name), size + 4), name, fill='black')
    canvas.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description='MANO hand model: write the synthetic model, draw a hand.')
    ap.add_argument('--mano', default='synthetic',
                    help="model to draw: 'synthetic' (default), a MANO_RIGHT.pkl / .npz path or its folder")
    ap.add_argument('--render', metavar='OUT.png', help='draw the hand in a few poses into this PNG')
    ap.add_argument('--write-synthetic', metavar='OUT.pkl',
                    help='write the synthetic model as a MANO-format .pkl (or .npz)')
    args = ap.parse_args(argv)
    if not (args.render or args.write_synthetic):
        ap.error('nothing to do: give --render OUT.png and/or --write-synthetic OUT.pkl')
    try:
        if args.write_synthetic:
            save_mano(load_mano('synthetic'), args.write_synthetic)
            print(f'wrote the synthetic MANO model to {args.write_synthetic}')
        if args.render:
            render_demo(MANO(args.mano), args.render)
            print(f'wrote {args.render}')
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
