"""Tests for mano.py: the chumpy-free loader and its safety, file errors, rotations, the joint
permutation, and the MANO layer against an independent numpy implementation.

Run: python -m pytest -q tests/test_mano.py   (a few seconds on CPU; the real-MANO test runs only
when $MANO_DIR/MANO_RIGHT.pkl exists). Models are small random MANO-format dicts over the real
16-joint tree, plus the synthetic hand when it is available.
"""
import os
import pickle
import pickletools
import sys
import types
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.spatial.transform import Rotation

import mano
import synthetic
from mano import (FREIHAND_TO_MANO, MANO, MANO_TO_FREIHAND, axis_angle_to_matrix, find_mano,
                  forward_kinematics, load_mano, matrix_to_axis_angle, tree_levels)
from synthetic import save_mano

MANO_PARENTS = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]


def random_mano(V=60, F=90, seed=0):
    """A random model in MANO's file layout over MANO's kinematic tree (root stored as uint32 -1)."""
    rng = np.random.default_rng(seed)
    J_regressor = rng.random((16, V)) * (rng.random((16, V)) < 0.2)
    J_regressor[:, 0] += 1e-3                                     # no empty row
    weights = rng.dirichlet(np.ones(16) * 0.3, size=V)
    return {
        'v_template': rng.normal(0, 0.05, (V, 3)),
        'shapedirs': rng.normal(0, 0.01, (V, 3, 10)),
        'posedirs': rng.normal(0, 0.01, (V, 3, 135)),
        'J_regressor': scipy.sparse.csc_matrix(J_regressor / J_regressor.sum(1, keepdims=True)),
        'weights': weights,
        'kintree_table': np.array([[4294967295] + MANO_PARENTS[1:], list(range(16))], np.int64),
        'f': rng.integers(0, V, (F, 3)).astype(np.uint32),
        'hands_components': np.linalg.qr(rng.normal(size=(45, 45)))[0],
        'hands_mean': rng.normal(0, 0.2, 45),
        'tip_ids': rng.choice(V, 5, replace=False),
        'J': rng.normal(size=(16, 3)), 'bs_style': 'lbs', 'bs_type': 'lrotmin',
    }


@pytest.fixture(params=['random', 'synthetic'])
def model(request):
    if request.param == 'random':
        return random_mano()
    return load_mano(synthetic.synthetic_mano())


def random_pose(B, generator=None, scale=0.8):
    return torch.randn(B, 48, generator=generator, dtype=torch.float64) * scale


# ------------------------------------------------------------------ an independent implementation

def reference_mano(d, pose, betas):
    """MANO in numpy float64, one sample and one joint at a time with 4x4 matrices and scipy's
    rotations: the textbook algorithm, sharing no code with mano.py."""
    V, parents = len(d['v_template']), MANO_PARENTS
    R = Rotation.from_rotvec(pose.reshape(16, 3)).as_matrix()         # (16, 3, 3)
    v_shaped = d['v_template'] + d['shapedirs'] @ betas
    J = d['J_regressor'] @ v_shaped                                     # (16, 3)
    v_posed = v_shaped + d['posedirs'] @ (R[1:] - np.eye(3)).ravel()
    G = []
    for j in range(16):
        local = np.eye(4)
        local[:3, :3], local[:3, 3] = R[j], J[j] - (J[parents[j]] if j else 0)
        G.append(local if j == 0 else G[parents[j]] @ local)
    G = np.stack(G)
    unpose = np.tile(np.eye(4), (16, 1, 1))
    unpose[:, :3, 3] = -J                                               # rest joint to the origin first
    T = np.einsum('vj,jab->vab', d['weights'], G @ unpose)
    verts = np.einsum('vab,vb->va', T, np.c_[v_posed, np.ones(V)])[:, :3]
    tips = verts[d.get('tip_ids', mano.MANO_TIP_IDS)]
    return verts, np.concatenate([G[:, :3, 3], tips])[MANO_TO_FREIHAND]


# ------------------------------------------------------------------ conventions and rotations

def test_permutation_inverse_and_joint_names():
    P, Q = np.array(MANO_TO_FREIHAND), np.array(FREIHAND_TO_MANO)
    assert (P[Q] == np.arange(21)).all() and (Q[P] == np.arange(21)).all()
    fingers = ['thumb', 'index', 'middle', 'ring', 'pinky']
    mano_fingers = ['index', 'middle', 'pinky', 'ring', 'thumb']         # MANO's own finger order
    mano_names = ['wrist'] + [f'{f}{i}' for f in mano_fingers for i in (1, 2, 3)] + [f'{f}_tip' for f in fingers]
    freihand_names = ['wrist'] + [f'{f}{i}' for f in fingers for i in (1, 2, 3, '_tip')]
    assert [mano_names[i] for i in P] == freihand_names
    assert [freihand_names[i] for i in Q] == mano_names


ANGLES = [1e-8, 1e-4, 0.5, 2.0, np.pi - 1e-3, np.pi - 1e-6]


def test_axis_angle_matrix_round_trip():
    axes = Rotation.random(len(ANGLES), random_state=0).as_rotvec()
    aa = torch.tensor(axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.array(ANGLES)[:, None])
    R = axis_angle_to_matrix(aa)
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(aa.numpy()).as_matrix(), atol=1e-12)
    np.testing.assert_allclose(matrix_to_axis_angle(R).numpy(), aa.numpy(), rtol=1e-6, atol=1e-14)
    # Exactly pi: the axis-angle is defined up to sign, the matrix is not.
    aa_pi = torch.tensor(axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.pi)
    back = matrix_to_axis_angle(axis_angle_to_matrix(aa_pi))
    np.testing.assert_allclose(back.norm(dim=-1).numpy(), np.pi, atol=1e-7)
    torch.testing.assert_close(axis_angle_to_matrix(back), axis_angle_to_matrix(aa_pi), rtol=0, atol=1e-7)
    # Random rotations, and the identity, survive matrix -> axis-angle -> matrix; float32 too.
    Rr = torch.tensor(np.concatenate([Rotation.random(200, random_state=1).as_matrix(), np.eye(3)[None]]))
    np.testing.assert_allclose(axis_angle_to_matrix(matrix_to_axis_angle(Rr)).numpy(), Rr.numpy(), atol=1e-10)
    R32 = Rr.float()
    assert (axis_angle_to_matrix(matrix_to_axis_angle(R32)) - R32).abs().max() < 1e-5


def test_rotation_gradients_are_finite_at_zero_and_pi():
    aa = torch.tensor([[0., 0, 0], [1e-8, 0, 0], [0.3, -0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (aa,))
    R = axis_angle_to_matrix(torch.tensor([[0., 0, 0], [0.4, 0.1, -0.3], [0, np.pi - 1e-3, 0], [0, 0, np.pi]],
                                          dtype=torch.float64)).requires_grad_()
    matrix_to_axis_angle(R).sum().backward()
    assert torch.isfinite(R.grad).all()


def test_6d_round_trip():
    model = pytest.importorskip('model')
    R = axis_angle_to_matrix(torch.tensor(Rotation.random(50, random_state=2).as_rotvec()))
    six = model.rotmat_to_rot6d(R)
    np.testing.assert_allclose(six[..., :3].numpy(), R[..., :, 0].numpy())   # first column first
    np.testing.assert_allclose(model.rot6d_to_rotmat(six).numpy(), R.numpy(), atol=1e-12)
    aa = matrix_to_axis_angle(model.rot6d_to_rotmat(six))
    np.testing.assert_allclose(axis_angle_to_matrix(aa).numpy(), R.numpy(), atol=1e-10)


# ------------------------------------------------------------------ loading, safety, file errors

class Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize('call', ['os.system', 'eval'])
def test_restricted_unpickler_refuses_code(tmp_path, call):
    target = tmp_path / 'PWNED'
    payload = Evil(os.system, f'touch {target}') if call == 'os.system' else \
        Evil(eval, f"open({str(target)!r}, 'w').close()")
    path = tmp_path / 'MANO_RIGHT.pkl'
    d = random_mano()
    d['payload'] = payload                                     # after valid arrays, like a doctored file
    path.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match='refusing to load.*Nothing from the file was executed'):
        load_mano(path)
    assert not target.exists()


def test_restricted_unpickler_allows_only_latin1_bytes(tmp_path):
    # _codecs.encode is how Python 3 stores bytes in protocol-2 pickles; any other codec is refused.
    (tmp_path / 'codec.pkl').write_bytes(b'\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.')
    with pytest.raises(pickle.UnpicklingError, match="encoding 'rot13'"):
        load_mano(tmp_path / 'codec.pkl')


def fake_chumpy_modules():
    """Stand-ins for chumpy.ch.Ch and chumpy.reordering.Select that pickle like the real ones:
    a new-style object whose state is its __dict__ (value in `x`, bookkeeping such as a set)."""
    def make(module, name):
        return type(name, (), {'__module__': module, '__qualname__': name})

    Ch, Select = make('chumpy.ch', 'Ch'), make('chumpy.reordering', 'Select')
    pkg, ch, reordering = (types.ModuleType(n) for n in ('chumpy', 'chumpy.ch', 'chumpy.reordering'))
    ch.Ch, reordering.Select, pkg.ch, pkg.reordering = Ch, Select, ch, reordering
    return {'chumpy': pkg, 'chumpy.ch': ch, 'chumpy.reordering': reordering}, Ch, Select


def chumpy_node(cls, **state):
    node = cls()
    node.__dict__.update(state, _dirty_vars=set(), _itr=None, _depends_on_deps={}, _make_dense=False)
    return node


@pytest.mark.parametrize('sparse_module', ['scipy.sparse._csc', 'scipy.sparse.csc'])
def test_chumpy_style_pickle_loads_without_chumpy(tmp_path, monkeypatch, sparse_module):
    d = random_mano()
    modules, Ch, Select = fake_chumpy_modules()
    flat = d['posedirs'].ravel()
    perm = np.random.default_rng(0).permutation(flat.size)
    official = dict(d, shapedirs=chumpy_node(Ch, x=d['shapedirs']),
                    posedirs=chumpy_node(Select, a=chumpy_node(Ch, x=flat[perm]), idxs=np.argsort(perm),
                                         preferred_shape=d['posedirs'].shape))
    with monkeypatch.context() as m:                           # chumpy exists only while writing
        for name, module in modules.items():
            m.setitem(sys.modules, name, module)
        data = pickle.dumps(official, protocol=2)
    assert 'chumpy' not in sys.modules and b'cchumpy.ch\nCh\n' in data
    new_name = b'cscipy.sparse._csc\ncsc_matrix\n'
    assert new_name in data
    data = data.replace(new_name, b'c' + sparse_module.encode() + b'\ncsc_matrix\n')  # scipy < 1.8 name
    (tmp_path / 'MANO_RIGHT.pkl').write_bytes(data)
    loaded = load_mano(tmp_path / 'MANO_RIGHT.pkl')
    assert 'chumpy' not in sys.modules
    for key in ['shapedirs', 'posedirs', 'v_template', 'weights', 'hands_components', 'J']:
        assert type(loaded[key]) is np.ndarray
        np.testing.assert_array_equal(loaded[key], d[key])
    assert scipy.sparse.issparse(loaded['J_regressor'])
    np.testing.assert_array_equal(loaded['J_regressor'].toarray(), d['J_regressor'].toarray())
    assert loaded['bs_style'] == 'lbs'


@pytest.mark.parametrize('suffix', ['.npz', '.pkl'])
def test_save_load_round_trip(tmp_path, suffix):
    d = random_mano()
    path = tmp_path / f'model{suffix}'
    save_mano(d, path)
    loaded = load_mano(path)
    assert set(loaded) == set(d)
    for key, value in d.items():
        got = loaded[key].toarray() if scipy.sparse.issparse(loaded[key]) else loaded[key]
        want = value.toarray() if scipy.sparse.issparse(value) else value
        np.testing.assert_array_equal(got, want)
    if suffix == '.pkl':  # what smplx / manopth do: a plain pickle of numpy + scipy objects
        with open(path, 'rb') as f:
            plain = pickle.load(f, encoding='latin1')
        assert scipy.sparse.issparse(plain['J_regressor']) and isinstance(plain['f'], np.ndarray)


def test_written_pkl_is_portable(tmp_path):
    # The .pkl must load in a plain pickle.load (what smplx/manopth do) and name only modules that numpy 1
    # and old scipy also have: not numpy 2's private numpy._core or scipy's private scipy.sparse._csc.
    d = load_mano(synthetic.synthetic_mano())
    synthetic.save_mano(d, tmp_path / 'SYNTH_RIGHT.pkl')
    raw = (tmp_path / 'SYNTH_RIGHT.pkl').read_bytes()
    names = {arg.split(' ')[0] for op, arg, _ in pickletools.genops(raw) if op.name in ('GLOBAL', 'STACK_GLOBAL')}
    assert names and not any(n.startswith(('numpy._core', 'scipy.sparse._')) for n in names), names
    with warnings.catch_warnings():                 # numpy 2 calls numpy.core deprecated, and still loads it
        warnings.simplefilter('ignore', DeprecationWarning)
        plain = pickle.loads(raw, encoding='latin1')
    assert scipy.sparse.issparse(plain['J_regressor'])
    assert np.array_equal(plain['J_regressor'].toarray(), d['J_regressor'].toarray())
    assert np.array_equal(plain['posedirs'], d['posedirs']) and plain['f'].dtype == d['f'].dtype


def test_missing_file_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('MANO_DIR', raising=False)
    with pytest.raises(FileNotFoundError) as err:
        find_mano()
    for words in ['MANO_DIR', os.path.join('mano', 'MANO_RIGHT.pkl'), '--mano PATH', '--mano synthetic',
                  'licence']:
        assert words in str(err.value)
    with pytest.raises(FileNotFoundError, match='does not exist.*--mano synthetic'):
        load_mano(tmp_path / 'nope.pkl')
    # $MANO_DIR, an explicit folder and ./mano are all found
    (tmp_path / 'mano').mkdir()
    save_mano(random_mano(), tmp_path / 'mano' / 'MANO_RIGHT.pkl')
    assert find_mano() == os.path.join('mano', 'MANO_RIGHT.pkl')
    assert find_mano(tmp_path / 'mano') == str(tmp_path / 'mano' / 'MANO_RIGHT.pkl')
    monkeypatch.setenv('MANO_DIR', str(tmp_path / 'mano'))
    assert find_mano() == str(tmp_path / 'mano' / 'MANO_RIGHT.pkl')
    assert synthetic.mano_model('synthetic')['f'].shape == synthetic.synthetic_mano()['f'].shape   # no file needed


def test_wrong_model_error(tmp_path):
    rng = np.random.default_rng(0)
    smpl = {'v_template': rng.random((6890, 3)), 'shapedirs': rng.random((6890, 3, 10)),
            'posedirs': rng.random((6890, 3, 207)), 'weights': rng.random((6890, 24)),
            'J_regressor': scipy.sparse.csc_matrix(rng.random((24, 6890))),
            'kintree_table': np.zeros((2, 24), np.int64), 'f': rng.integers(0, 6890, (13776, 3))}
    (tmp_path / 'SMPL.pkl').write_bytes(pickle.dumps(smpl, protocol=2))
    with pytest.raises(ValueError) as err:
        load_mano(tmp_path / 'SMPL.pkl')
    msg = str(err.value)
    for words in ["'J_regressor' has shape (24, 6890), expected (16, V)", 'SMPL', '--mano synthetic',
                  "'posedirs' has shape (6890, 3, 207)", "key 'hands_mean' is missing", 'MANO_RIGHT.pkl']:
        assert words in msg
    bad = random_mano()
    bad['f'][0, 0] = 60                                         # a face pointing past the last vertex
    save_mano(bad, tmp_path / 'bad.npz')
    with pytest.raises(ValueError, match=r"faces 'f' index vertices outside \[0, 60\)"):
        load_mano(tmp_path / 'bad.npz')


@pytest.mark.parametrize('suffix', ['.pkl', '.npz'])
def test_truncated_file_error(tmp_path, suffix):
    save_mano(random_mano(), tmp_path / f'full{suffix}')
    data = (tmp_path / f'full{suffix}').read_bytes()
    (tmp_path / f'cut{suffix}').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='truncated or corrupt.*--mano synthetic'):
        load_mano(tmp_path / f'cut{suffix}')


# ------------------------------------------------------------------ the layer

def test_tree_levels_of_mano():
    assert tree_levels(MANO_PARENTS) == [[0], [1, 4, 7, 10, 13], [2, 5, 8, 11, 14], [3, 6, 9, 12, 15]]


def test_zero_pose_gives_template_and_regressed_joints(model):
    layer = MANO(model)
    assert layer.v_template.dtype == torch.float32 and layer.faces.dtype == torch.int64
    out = layer(torch.zeros(2, 48))
    T = model['v_template']
    np.testing.assert_allclose(out.vertices[1].numpy(), T, atol=1e-6)
    joints = np.concatenate([model['J_regressor'] @ T, T[model['tip_ids']]])[MANO_TO_FREIHAND]
    np.testing.assert_allclose(out.joints[0].numpy(), joints, atol=1e-6)


def test_layer_matches_naive_reference(model):
    layer = MANO(model, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    pose, betas = random_pose(4, g), torch.randn(4, 10, generator=g, dtype=torch.float64)
    out = layer(pose, betas)
    for b in range(4):
        verts, joints = reference_mano(model, pose[b].numpy(), betas[b].numpy())
        np.testing.assert_allclose(out.vertices[b].numpy(), verts, atol=1e-12)
        np.testing.assert_allclose(out.joints[b].numpy(), joints, atol=1e-12)
    # A joint-by-joint chain (one joint per "level") gives the same world transforms.
    R, J = axis_angle_to_matrix(pose.view(4, 16, 3)), torch.randn(4, 16, 3, dtype=torch.float64)
    for a, b in zip(forward_kinematics(R, J, layer.parents, layer.levels),
                    forward_kinematics(R, J, layer.parents, [[j] for j in range(16)])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_forward_kinematics_on_other_trees():
    # Levels that are no arithmetic runs (gathers) and a forest with two roots, against a plain loop.
    g = torch.Generator().manual_seed(1)
    for parents in ([-1, 0, 0, 1, 2, 1, 5, 3], [-1, -1, 0, 1, 1, 0, 3]):
        n = len(parents)
        R = axis_angle_to_matrix(torch.randn(3, n, 3, generator=g, dtype=torch.float64))
        J = torch.randn(3, n, 3, generator=g, dtype=torch.float64)
        R_ref, t_ref = [], []
        for j, p in enumerate(parents):
            R_ref.append(R[:, j] if p < 0 else R_ref[p] @ R[:, j])
            bone = (J[:, j] - J[:, p]).unsqueeze(-1)
            t_ref.append(J[:, j] if p < 0 else (R_ref[p] @ bone).squeeze(-1) + t_ref[p])
        groupings = [tree_levels(parents)] + ([[[j] for j in range(n)]] if parents.count(-1) == 1 else [])
        for levels in groupings:                                    # by depth; joint by joint (one root)
            R_world, t_world = forward_kinematics(R.requires_grad_(), J, parents, levels)
            torch.testing.assert_close(R_world, torch.stack(R_ref, 1), rtol=0, atol=1e-14)
            torch.testing.assert_close(t_world, torch.stack(t_ref, 1), rtol=0, atol=1e-14)
            assert torch.isfinite(torch.autograd.grad(t_world.sum(), R)[0]).all()


def test_blocks_of_poses_agree_and_carry_gradients(model):
    # The mesh is skinned `chunk` poses (per thread) at a time: a last, partial block, with translation.
    layer, small = MANO(model, dtype=torch.float64), MANO(model, dtype=torch.float64)
    small.chunk = 2
    g = torch.Generator().manual_seed(2)
    pose, betas = random_pose(5, g), torch.randn(5, 10, generator=g, dtype=torch.float64)
    transl = torch.randn(5, 3, generator=g, dtype=torch.float64)
    pose.requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                        # blocks of 2 poses: 2 + 2 + 1
    try:
        whole, blocks = layer(pose, betas, transl), small(pose, betas, transl)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    verts, joints = reference_mano(model, pose[4].detach().numpy(), betas[4].numpy())
    np.testing.assert_allclose(blocks.vertices[4].detach().numpy(), verts + transl[4].numpy(), atol=1e-12)
    np.testing.assert_allclose(blocks.joints[4].detach().numpy(), joints + transl[4].numpy(), atol=1e-12)
    grads = [torch.autograd.grad(out.vertices.square().sum() + out.joints.sum(), pose)[0]
             for out in (whole, blocks)]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


def test_input_formats_agree():
    d = random_mano()
    layer = MANO(d)
    pose, betas, transl = random_pose(3).float(), torch.randn(3, 10), torch.randn(3, 3)
    ref = layer(pose, betas, transl)
    rotmats = layer(axis_angle_to_matrix(pose.view(3, 16, 3)), betas, transl)
    torch.testing.assert_close(rotmats.vertices, ref.vertices, atol=1e-6, rtol=0)
    plain = layer(pose, betas)
    torch.testing.assert_close(plain.joints + transl[:, None], ref.joints)
    # PCA with all 45 components reproduces any absolute pose: fingers = mean + coeffs @ components.
    coeffs = (pose[:, 3:].double() - d['hands_mean']) @ torch.tensor(np.linalg.inv(d['hands_components']))
    pca = MANO(d, ncomps=45)(torch.cat([pose[:, :3], coeffs.float()], 1), betas, transl)
    torch.testing.assert_close(pca.vertices, ref.vertices, atol=2e-6, rtol=0)
    assert MANO(d, ncomps=6)(torch.zeros(2, 9)).vertices.shape == (2, 60, 3)
    assert MANO(d).double()(pose, betas).vertices.dtype == torch.float64   # follows the module's dtype
    with torch.autocast('cpu', dtype=torch.bfloat16):                     # and stays exact under AMP
        amp = layer(pose.bfloat16(), betas, transl)
    assert amp.vertices.dtype == torch.float32
    torch.testing.assert_close(amp.vertices, layer(pose.bfloat16().float(), betas, transl).vertices)
    with pytest.raises(ValueError, match=r'\(B, 9\) global axis-angle \+ 6 PCA.*got \(2, 48\)'):
        MANO(d, ncomps=6)(torch.zeros(2, 48))


def test_gradients_reach_pose_and_betas():
    layer = MANO(random_mano())
    # zero pose: the Rodrigues singularity; a batch of one: the chain's views of one pose
    for pose in [torch.zeros(2, 48), random_pose(2).float(), random_pose(1).float()]:
        pose.requires_grad_()
        betas = torch.randn(len(pose), 10, requires_grad=True)
        out = layer(pose, betas)
        (out.vertices.square().sum() + out.joints.square().sum()).backward()
        for grad in (pose.grad, betas.grad):
            assert torch.isfinite(grad).all() and (grad.abs().sum(1) > 0).all()


def test_model_without_tip_ids_needs_778_vertices():
    d = random_mano()
    del d['tip_ids']
    with pytest.raises(ValueError, match="60 vertices and no 'tip_ids'"):
        MANO(d)


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.environ.get('MANO_DIR', '-'), 'MANO_RIGHT.pkl')),
                    reason='the official MANO_RIGHT.pkl is not in $MANO_DIR')
def test_official_mano_file():
    d = load_mano(os.path.join(os.environ['MANO_DIR'], 'MANO_RIGHT.pkl'))
    assert d['v_template'].shape == (778, 3) and d['f'].shape == (1538, 3)
    layer = MANO(d, dtype=torch.float64)
    pose, betas = random_pose(2, scale=0.3), torch.randn(2, 10, dtype=torch.float64)
    out = layer(pose, betas)
    for b in range(2):
        verts, joints = reference_mano(d, pose[b].numpy(), betas[b].numpy())
        np.testing.assert_allclose(out.vertices[b].numpy(), verts, atol=1e-10)
        np.testing.assert_allclose(out.joints[b].numpy(), joints, atol=1e-10)
    flat = layer(torch.zeros(1, 48, dtype=torch.float64)).joints[0]
    assert 0.12 < (flat[12] - flat[0]).norm() < 0.25           # wrist -> middle fingertip, metres
