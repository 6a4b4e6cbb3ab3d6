"""MANO hand model in plain PyTorch: a chumpy-free loader and a fast, differentiable layer.

MANO (Romero, Tzionas & Black, "Embodied Hands", SIGGRAPH Asia 2017) is SMPL's hand: a template
mesh deformed by shape and pose blend shapes, then posed by linear blend skinning (LBS) over a
16-joint kinematic tree. We use the right hand only. This file holds:

  * `load_mano(path)`: the official MANO_RIGHT.pkl read WITHOUT chumpy, through a restricted
    unpickler that admits only numpy, scipy.sparse and inert stand-ins for chumpy classes (a pickle
    naming anything else is refused before any of it runs); also `.npz` copies. The same unpickler
    reads HO3D's annotation pickles (`load_pickle`).
  * `MANO(nn.Module)`: pose (axis-angle, rotation matrices or PCA coefficients) + betas + translation
    -> vertices (B, V, 3) and 21 joints (B, 21, 3) in the internal FreiHAND order, metres. The maths
    is that of smplx `lbs.py` and manopth; the kinematic chain runs level by level (all five fingers
    at once), the rigid transforms of the skeleton are kept as rotation + translation.
  * `axis_angle_to_matrix` / `matrix_to_axis_angle`, the MANO <-> FreiHAND joint permutations and the
    HO3D (OpenGL) camera frame.
This file imports nothing from the project: copy it alone, with `MANO(load_mano(path))` as the entry point
(synthetic.py builds a licence-free stand-in model in the same format).

Shapes (README legend): B batch, V vertices (778 for MANO), F faces; the skeleton has 16 joints, the
output J = 21 (with the fingertips), L = 10 betas.
"""
import os
import pickle
from typing import NamedTuple

import numpy as np
import scipy.sparse
import torch
import torch.nn as nn

# MANO's joint order plus fingertips is: wrist, index1-3, middle1-3, pinky1-3, ring1-3, thumb1-3,
# tips (thumb, index, middle, ring, pinky). internal = mano_plus_tips[MANO_TO_FREIHAND] gives the
# FreiHAND/OpenPose order: wrist, thumb, index, middle, ring, pinky, each base -> tip.
MANO_TO_FREIHAND = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]
FREIHAND_TO_MANO = [0, 5, 6, 7, 9, 10, 11, 17, 18, 19, 13, 14, 15, 1, 2, 3, 4, 8, 12, 16, 20]
# Fingertip vertices of the official 778-vertex mesh (manopth's choice; smplx and the FreiHAND toolbox
# use slightly different ids, see the README). Thumb, index, middle, ring, pinky.
MANO_TIP_IDS = [745, 317, 444, 556, 673]
# HO3D stores everything in the OpenGL camera frame: OpenCV's with y and z negated (a 180 degree turn about x).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])


# ----------------------------------------------------------------------------------------------------
# Rotations
# ----------------------------------------------------------------------------------------------------

def axis_angle_to_matrix(aa):
    """Rodrigues' formula, (..., 3) -> (..., 3, 3); exact and with finite gradients at angle 0.

    R = cos(t) I + sin(t) [n]_x + (1 - cos t) n n^T with t = |aa|, n = aa / t. Writing sin(t) n as
    torch.sinc(t/pi) aa and (1 - cos t) n n^T as torch.sinc(t/2pi)^2 / 2 aa aa^T avoids dividing by t
    and the cancellation in 1 - cos t.
    """
    angle = torch.linalg.vector_norm(aa, dim=-1, keepdim=True)              # (..., 1)
    x, y, z = (torch.sinc(angle / torch.pi) * aa).unbind(-1)                # sin(t) n
    zero = torch.zeros_like(x)
    R = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).unflatten(-1, (3, 3))  # sin(t) [n]_x
    b = 0.5 * torch.sinc(angle / (2 * torch.pi)).square()                   # (..., 1) (1 - cos t) / t^2
    R = torch.addcmul(R, (b * aa).unsqueeze(-1), aa.unsqueeze(-2))          # + (1 - cos t) n n^T
    R.diagonal(dim1=-2, dim2=-1).add_(torch.cos(angle))                     # + cos(t) I
    return R


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


def rotate_axis_angle(R, aa):
    """Axis-angle (3,) of R @ rotation(aa). A camera turned by R sees the MANO hand with global
    rotation R R_global: the global orient is left-multiplied, the finger pose is unchanged."""
    R, aa = torch.as_tensor(np.asarray(R, np.float64)), torch.as_tensor(np.asarray(aa, np.float64))
    return matrix_to_axis_angle(R @ axis_angle_to_matrix(aa)).numpy()


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
            f"once to .npz of plain arrays in an environment that can load it.")


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
    """The MANO file: an explicit file or folder | $MANO_DIR/MANO_RIGHT.pkl | ./mano/MANO_RIGHT.pkl."""
    if path is not None:
        tried = [os.path.join(path, 'MANO_RIGHT.pkl') if os.path.isdir(path) else str(path)]
    else:
        tried = [os.path.join(os.environ['MANO_DIR'], 'MANO_RIGHT.pkl')] if os.environ.get('MANO_DIR') else []
        tried.append(os.path.join('mano', 'MANO_RIGHT.pkl'))
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"MANO model not found (tried {', '.join(tried)}). {_help()}")


def load_pickle(path):
    """Unpickle `path` through the restricted unpickler: numpy arrays, scipy.sparse matrices and chumpy
    arrays (as plain arrays) only; anything else is refused before it runs (UnsafePickleError)."""
    with open(path, 'rb') as f:  # latin1: how numpy arrays in Python 2 pickles must be read
        return _plain(_MANOUnpickler(f, encoding='latin1').load())


def load_mano(path):
    """Read a MANO model into a dict of numpy arrays under MANO's key names ('J_regressor' sparse).

    `path`: the official .pkl (no chumpy needed) or an .npz of the same arrays; a dict is checked as is.
    """
    if isinstance(path, dict):
        return _check_mano(path, 'the model dict')
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'MANO model file {path} does not exist. {_help()}')
    try:
        if path.endswith('.npz'):
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k].item() if z[k].dtype.kind == 'U' else z[k] for k in z.files}
        else:
            d = load_pickle(path)
    except UnsafePickleError:
        raise
    except Exception as e:  # EOFError, BadZipFile, UnpicklingError, KeyError ...: all mean "unreadable"
        raise ValueError(f'could not read the MANO model {path}: it looks truncated or corrupt '
                         f'({type(e).__name__}: {e}). Expected a MANO_RIGHT.pkl or a .npz written by '
                         f'synthetic.save_mano; download or convert it again. {_help()}') from e
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


def _as_slice(ids):
    """`ids` as a slice where one indexes the same joints (then x[:, ids] is a view, not a copy): an
    arithmetic run such as MANO's fingers 1, 4, 7, 10, 13, or one id repeated (a size-1 slice that
    broadcasts); else the list itself."""
    step = ids[1] - ids[0] if len(ids) > 1 else 1
    if step > 0 and ids == list(range(ids[0], ids[0] + step * len(ids), step)):
        return slice(ids[0], ids[0] + step * (len(ids) - 1) + 1, step)
    return slice(ids[0], ids[0] + 1) if len(set(ids)) == 1 else ids


def forward_kinematics(rotmats, joints, parents, levels):
    """Compose local rotations along the tree into world rotations and posed joint positions.

    rotmats (B, J, 3, 3) local rotations; joints (B, J, 3) rest-pose joints; `levels` groups joints:
    the roots first, then joints whose parents are all in earlier groups (`tree_levels`; one joint per
    group gives the classic joint-by-joint loop). Joint j's local transform is [R_j | J_j - J_parent]
    (a root's parent is the origin), so its world transform is [R_world | t_world] = [R_world[p] R_j |
    R_world[p] (J_j - J_p) + t_world[p]]: one (3, 4) @ (4, 4) product per joint, a level at a time.
    For MANO's tree every level and its parents are strided slices (views, no gathers); `world` grows
    by concatenation, never in place, so the views autograd saves stay valid.
    Returns R_world (B, J, 3, 3) and t_world (B, J, 3) = the posed joints.
    """
    B, J = joints.shape[:2]
    bones = joints - torch.cat([joints, joints.new_zeros(B, 1, 3)], 1)[:, parents]  # (B, J, 3); [-1] = origin
    local = torch.cat([rotmats, bones.unsqueeze(-1)], -1)                  # (B, J, 3, 4) [R_j | J_j - J_p]
    local = torch.cat([local, local.new_tensor([0., 0., 0., 1.]).expand(B, J, 1, 4)], -2)  # (B, J, 4, 4)
    world, order = local[:, _as_slice(levels[0]), :3], list(levels[0])    # (B, n, 3, 4) joints so far
    for ids in levels[1:]:
        up = world[:, _as_slice([order.index(parents[j]) for j in ids])]  # (B, m, 3, 4) parents' [R | t]
        world = torch.cat([world, up @ local[:, _as_slice(ids)]], 1)
        order += ids
    world = world[:, _as_slice(sorted(range(J), key=order.__getitem__))]   # back to joint order
    return world[..., :3], world[..., 3]


class ManoOutput(NamedTuple):
    vertices: torch.Tensor  # (B, V, 3) metres
    joints: torch.Tensor    # (B, 21, 3) metres, internal FreiHAND order


class MANO(nn.Module):
    """Differentiable MANO: `MANO(model)(pose, betas=None, transl=None) -> ManoOutput`.

    model: a file path (see `find_mano`) or a dict from `load_mano`. pose: (B, 48)
    absolute axis-angle (zero = flat hand), or (B, 16, 3, 3) rotation matrices, or with `ncomps` set
    (B, 3 + ncomps) = global axis-angle + PCA coefficients (fingers = hands_mean + coeffs @ components).
    The model arrays are non-persistent buffers: they follow .to(device/dtype) but stay out of
    state_dict (checkpoints never carry the licensed MANO data). float32 unless `dtype` says otherwise.
    What does not depend on the input is combined once, in float64, in __init__: the regressed joints
    of the template and of the shape blend shapes, and one matrix for template + shape + pose blend
    shapes. The mesh is then computed a cache-sized block of poses at a time.
    """
    chunk = 32  # poses per skinning block and CPU thread: (V, 12, 32) transforms, ~1 MiB, about one L2

    def __init__(self, model, ncomps=None, dtype=torch.float32):
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
        f64 = lambda x: np.asarray(x.toarray() if scipy.sparse.issparse(x) else x, np.float64)  # noqa: E731
        T, S, P, jreg = f64(d['v_template']), f64(d['shapedirs']), f64(d['posedirs']), f64(d['J_regressor'])
        buffers = {
            'v_template': T,                                                  # (V, 3)
            'J_regressor': jreg,                                              # (J, V)
            # J_regressor (T + S betas) = J_template + betas @ J_shapedirs: joints straight from betas
            'J_template': (jreg @ T).ravel(),                                 # (J*3,)
            'J_shapedirs': np.einsum('jv,vcl->ljc', jreg, S).reshape(S.shape[-1], -1),  # (L, J*3)
            # blenddirs @ [1 | betas | pose_feature] = template + shape and pose blend shapes
            'blenddirs': np.concatenate([T[..., None], S, P], -1).reshape(3 * V, -1),  # (V*3, 1 + L + 135)
            'weights': f64(d['weights']),                                     # (V, J)
            'hands_mean': f64(d['hands_mean']),                               # (45,)
            'hands_components': f64(d['hands_components'][:ncomps]),          # (ncomps or 45, 45)
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=dtype).contiguous(), persistent=False)
        indices = {'faces': d['f'], 'tip_ids': tips, 'to_freihand': MANO_TO_FREIHAND}  # (F, 3), (5,), (21,)
        for name, value in indices.items():
            self.register_buffer(name, torch.as_tensor(np.asarray(value, np.int64)), persistent=False)

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
        betas = rotmats.new_zeros(B, len(self.J_shapedirs)) if betas is None else betas.to(rotmats)
        transl = None if transl is None else transl.to(rotmats).unsqueeze(1)  # (B, 1, 3)

        # 1. Shape blend shapes (MANO eq. 2): v_shaped = T + betas @ S, computed within step 3's product.
        # 2. Skeleton joints regressed from the shaped, unposed mesh: J_regressor v_shaped, which is
        #    linear in betas: J_template + betas @ J_shapedirs, both regressed once in __init__.
        joints = torch.addmm(self.J_template, betas, self.J_shapedirs).view(B, J, 3)  # (B, J, 3)
        # 3. Pose blend shapes, driven by R - I of the 15 finger joints (so the flat hand adds nothing;
        #    the root is excluded: a global rotation must not deform the hand). Template, shape and pose
        #    blend shapes are one product, v_posed = blenddirs @ [1 | betas | pose_feature] (in step 5).
        eye = torch.eye(3, dtype=rotmats.dtype, device=rotmats.device)
        pose_feature = (rotmats[:, 1:] - eye).flatten(1)                     # (B, 135)
        blend_in = torch.cat([rotmats.new_ones(B, 1), betas, pose_feature], 1)  # (B, 1 + L + 135)
        # 4. Kinematic chain, one tree level (up to five fingers) at a time
        R_world, t_world = forward_kinematics(rotmats, joints, self.parents, self.levels)
        # 5. Linear blend skinning: relative to the rest pose joint j moves points by
        #    x -> R_world x + (t_world - R_world J_rest); each vertex blends these with its weights.
        t_rel = t_world - (R_world @ joints.unsqueeze(-1)).squeeze(-1)         # (B, J, 3)
        A = torch.cat([R_world, t_rel.unsqueeze(-1)], -1).permute(1, 2, 3, 0)  # (J, 3, 4, B) [R | t]
        #    With the batch index last (the products MKL runs fastest here) and `chunk` poses per CPU
        #    thread at a time (a GPU takes the whole batch), so that a block's arrays stay in cache.
        step = self.chunk * torch.get_num_threads() if rotmats.device.type == 'cpu' else max(B, 1)
        vertices = rotmats.new_empty(B, V, 3)
        for s in range(0, B, step):
            b = slice(s, s + step)
            v_posed = (self.blenddirs @ blend_in[b].T).view(V, 3, 1, -1)      # (V, 3, 1, b)
            T = (self.weights @ A[..., b].reshape(J, -1)).view(V, 3, 4, -1)   # (V, 3, 4, b) blended [R | t]
            (x, y, z), (Rx, Ry, Rz, t) = v_posed.unbind(1), T.unbind(2)       # (V, 1, b) and (V, 3, b)
            v = torch.addcmul(t, Rx, x).addcmul_(Ry, y).addcmul_(Rz, z)       # (V, 3, b) = R v_posed + t
            vertices[b] = v.permute(2, 0, 1) if transl is None else v.permute(2, 0, 1) + transl[b]
        # 6. 16 skeleton joints + 5 fingertip vertices, reordered to the internal FreiHAND order
        if transl is not None:                                                # (the tips have it already)
            t_world = t_world + transl
        joints21 = torch.cat([t_world, vertices.index_select(1, self.tip_ids)], 1)  # (B, 21, 3) MANO order
        return ManoOutput(vertices, joints21.index_select(1, self.to_freihand))
