"""Tests for data.py: robust decoding, augmentation geometry, the rasterizer, and the key label test
posing MANO with the stored FreiHAND 61 values / HO3D meta reproduces the stored joints
and vertices, and projecting them with K lands on the rendered hand.

Run: python -m pytest -x -q tests/test_data.py
"""
import io
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import synthetic
from mano import FREIHAND_TO_MANO, OPENGL_TO_OPENCV


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------

def _jpeg_bytes(size=(32, 24), color=(200, 120, 60)):
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, 'JPEG', quality=95)
    return buf.getvalue()


def _write(path, content):
    with open(path, 'wb') as f:
        f.write(content)
    return path


def test_load_rgb_odd_formats(tmp_path):
    rng = np.random.default_rng(0)
    # grayscale
    Image.fromarray(np.full((5, 7), 77, np.uint8), 'L').save(tmp_path / 'g.png')
    g = data.load_rgb(tmp_path / 'g.png')
    assert g.mode == 'RGB' and g.size == (7, 5) and np.all(np.asarray(g) == 77)
    # RGBA: transparent pixels become white, opaque ones keep their colour
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (10, 200, 30)
    a[0, :, 3] = 255
    Image.fromarray(a, 'RGBA').save(tmp_path / 'a.png')
    rgba = np.asarray(data.load_rgb(tmp_path / 'a.png'))
    assert np.all(rgba[0] == (10, 200, 30)) and np.all(rgba[1:] == 255)
    # palette
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).convert('P').save(tmp_path / 'p.png')
    assert data.load_rgb(tmp_path / 'p.png').mode == 'RGB'
    # 16-bit PNG: rescaled to 8 bit (65535 -> 255, 32896 -> 128), not clipped to 255 everywhere
    v16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(v16).save(tmp_path / 'i16.png')
    assert Image.open(tmp_path / 'i16.png').mode.startswith('I')
    assert np.asarray(data.load_rgb(tmp_path / 'i16.png'))[0, :, 0].tolist() == [0, 1, 128, 255]
    # CMYK JPEG: colours survive the conversion
    Image.new('RGB', (16, 16), (200, 40, 40)).convert('CMYK').save(tmp_path / 'c.jpg', quality=95)
    assert Image.open(tmp_path / 'c.jpg').mode == 'CMYK'
    assert np.abs(np.asarray(data.load_rgb(tmp_path / 'c.jpg'))[8, 8].astype(int) - (200, 40, 40)).max() < 12
    # 1x1 is a valid image, and a pretraining view can still be made from it
    Image.new('RGB', (1, 1), (9, 9, 9)).save(tmp_path / 'one.png')
    out = data.PretrainAugment(32, photometric=False)(data.load_rgb(tmp_path / 'one.png'))
    assert [v.shape for v in out['views']] == [(3, 32, 32)] * 2


def _bad_folder(tmp_path, monkeypatch):
    """A folder with 2 good images and one of each kind of bad file; returns (root, number of bad)."""
    root = tmp_path / 'imgs'
    (root / 'sub').mkdir(parents=True)
    _write(root / 'good.jpg', _jpeg_bytes())
    _write(os.path.join(os.fsencode(root / 'sub'), b'hand_\xff\xfe.jpg'), _jpeg_bytes())  # non-UTF-8 name
    _write(root / 'zero.jpg', b'')
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(noisy, 'JPEG')
    _write(root / 'truncated.jpg', noisy.getvalue()[:len(noisy.getvalue()) // 2])  # header intact, data cut
    _write(root / 'text.jpg', b'this is not an image\n' * 10)
    _write(os.path.join(os.fsencode(root), b'bad_\xff.png'), b'nope')  # bad file with a non-UTF-8 name
    Image.new('RGB', (100, 100)).save(root / 'bomb.png')   # > 2 x MAX_IMAGE_PIXELS: DecompressionBombError
    Image.new('RGB', (40, 40)).save(root / 'bomb_warn.png')  # between 1x and 2x: the warning, also a skip
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    os.symlink(root / 'loop_b.jpg', root / 'loop_a.jpg')     # a symlink loop between two files
    os.symlink(root / 'loop_a.jpg', root / 'loop_b.jpg')
    os.symlink(root, root / 'sub' / 'back_up')               # a folder loop: must not be walked forever
    (root / 'folder.jpg').mkdir()                              # a folder with an image name: ignored
    _write(root / 'locked.jpg', _jpeg_bytes())                 # unreadable (root ignores chmod: patch open)
    real_open = open

    def guarded_open(file, *a, **k):
        if not isinstance(file, int) and os.fsdecode(file).endswith('locked.jpg'):
            raise PermissionError(13, 'Permission denied', file)
        return real_open(file, *a, **k)
    monkeypatch.setattr('builtins.open', guarded_open)
    return root, 9


def test_image_folder_skips_bad_files(tmp_path, monkeypatch):
    root, n_bad = _bad_folder(tmp_path, monkeypatch)
    with pytest.warns(UserWarning) as record:
        ds = data.ImageFolder(root, transform=lambda im: im.size)
        items = [ds[i] for i in range(len(ds))]
    assert items == [(32, 24)] * len(ds)
    assert ds.n_skipped == n_bad
    messages = [str(r.message) for r in record if 'skipping' in str(r.message)]
    assert len(messages) == n_bad                                   # one warning per bad file
    assert any('\\xff' in m for m in messages)                     # a non-UTF-8 name is printable
    assert len(ds) == 3  # 2 good + the truncated file, whose header is fine: it is replaced when read
    assert len({os.path.realpath(p) for p in ds.paths}) == len(ds.paths)  # the folder loop added nothing twice
    with warnings.catch_warnings():  # a second epoch: the same bad file is not reported again
        warnings.simplefilter('error')
        assert [ds[i] for i in range(len(ds))] == items and ds.n_skipped == n_bad


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='python synthetic.py'):
        data.ImageFolder(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='python synthetic.py'):
        data.ImageFolder(tmp_path / 'empty')
    _write(tmp_path / 'empty' / 'x.jpg', b'')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match='python synthetic.py'):
        data.ImageFolder(tmp_path / 'empty')


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files whatever their mode')
def test_unreadable_file_chmod(tmp_path):
    _write(tmp_path / 'ok.jpg', _jpeg_bytes())
    _write(tmp_path / 'locked.jpg', _jpeg_bytes())
    os.chmod(tmp_path / 'locked.jpg', 0)
    with pytest.warns(UserWarning, match='locked'):
        assert len(data.ImageFolder(tmp_path)) == 1


# ----------------------------------------------------------------------------------------------------
# Pretraining views: the returned affines are the true geometry of each view
# ----------------------------------------------------------------------------------------------------

def _denormalize(x):
    return x * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)


def _centroid(view):
    """Intensity-weighted centroid (x, y) of a bright dot in a (3, S, S) normalized view."""
    w = _denormalize(view).mean(0).clamp_min(0)
    w = torch.where(w > 0.3 * w.max(), w, torch.zeros_like(w))
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing='ij')
    return torch.stack([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()]).double()


def _h(A):
    return torch.cat([A.double(), torch.tensor([[0, 0, 1.0]], dtype=torch.float64)])


def test_pretrain_views_affines_track_a_dot():
    H, W = 300, 400
    g = torch.Generator().manual_seed(1)
    aug = data.PretrainAugment(img_size=96, scale=(0.5, 0.9), n_local=2, local_size=48, local_scale=(0.2, 0.3),
                               rotation=40, photometric=False)
    checked = 0
    for trial in range(12):
        p = np.array([np.random.uniform(150, 250), np.random.uniform(120, 180)])
        yy, xx = np.mgrid[0:H, 0:W]
        img = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 4.0 ** 2))  # a Gaussian dot at p
        out = aug(Image.fromarray(np.repeat((255 * img)[..., None], 3, 2).astype(np.uint8)), g)
        assert [tuple(v.shape) for v in out['views']] == [(3, 96, 96)] * 2 + [(3, 48, 48)] * 2
        assert all(A.shape == (2, 3) for A in out['affines'])
        seen = []
        for view, A in zip(out['views'], out['affines']):
            q = (_h(A) @ torch.tensor([*p, 1.0], dtype=torch.float64))[:2]  # where the dot must be
            S = view.shape[-1]
            if (q > 8).all() and (q < S - 9).all():
                assert torch.allclose(_centroid(view), q, atol=0.6), (trial, _centroid(view), q)
                seen.append((view, A))
        for (vi, Ai), (vj, Aj) in zip(seen, seen[1:]):  # view j -> view i: A_i A_j^-1
            q = (_h(Ai) @ torch.linalg.inv(_h(Aj)) @ torch.tensor([*_centroid(vj), 1.0], dtype=torch.float64))[:2]
            assert torch.allclose(q, _centroid(vi), atol=1.0)
            checked += 1
    assert checked >= 5


def test_large_photo_views_keep_original_pixel_affines():
    """A 1500 x 1000 photo is box-reduced (by 7) before warping; the affines must still start from the
    ORIGINAL pixel grid: the dot must land where the returned affine sends it."""
    H, W, p = 1000, 1500, np.array([700.0, 480.0])
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 25.0 ** 2))
    img = Image.fromarray(np.repeat((255 * img)[..., None], 3, 2).astype(np.uint8))
    aug = data.PretrainAugment(img_size=64, scale=(0.3, 0.5), rotation=30, photometric=False)
    checked = 0
    for seed in range(4):
        out = aug(img, torch.Generator().manual_seed(seed))
        for view, A in zip(out['views'], out['affines']):
            q = (_h(A) @ torch.tensor([*p, 1.0], dtype=torch.float64))[:2]
            if (q > 10).all() and (q < 53).all():
                assert torch.allclose(_centroid(view), q, atol=0.6)
                checked += 1
    assert checked >= 3
    jittered = data.PretrainAugment(img_size=64)(img, torch.Generator().manual_seed(0))  # photometric on
    assert all(v.shape == (3, 64, 64) and torch.isfinite(v).all() for v in jittered['views'])


def test_full_frame_view_is_a_plain_resize():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8))
    out = data.PretrainAugment(img_size=100, scale=(1.0, 1.0), rotation=0, photometric=False)(img)
    A = _h(out['affines'][0])
    edges = A @ torch.tensor([[-0.5, -0.5, 1.0], [49.5, 49.5, 1.0]], dtype=torch.float64).T
    assert torch.allclose(edges[:2].T, torch.tensor([[-0.5, -0.5], [99.5, 99.5]], dtype=torch.float64))
    view = _denormalize(out['views'][0])
    # a 2x upsampling: output pixel 2i + 1 sits at source x = i + 0.25 (pixel centres at integers)
    src = data.to_tensor(img)
    rows = 0.75 * src[:, :-1] + 0.25 * src[:, 1:]                   # source y = i + 0.25
    expected = 0.75 * rows[:, :, :-1] + 0.25 * rows[:, :, 1:]       # source x = j + 0.25
    assert torch.allclose(view[:, 1:-1:2, 1:-1:2], expected, atol=1e-5)


def test_crop_transform_moves_labels_with_pixels():
    rng = np.random.default_rng(0)
    K = np.array([[600.0, 0, 320], [0, 580, 240], [0, 0, 1]])
    X = rng.uniform([-0.1, -0.1, 0.5], [0.1, 0.1, 0.7], (21, 3))
    A, K2, R = data.crop_transform(K, (300, 250), 200, 128, angle=0.7, shift=(5, -3))
    uv = synthetic.project(X, K)
    moved = (A @ np.c_[uv, np.ones(21)].T).T[:, :2]          # the image point, moved by the warp
    assert np.allclose(synthetic.project(X @ R.T, K2), moved)      # = the rotated 3D point seen by K_crop
    assert np.allclose(R @ R.T, np.eye(3)) and np.isclose(np.linalg.det(R), 1) and np.allclose(R[2], [0, 0, 1])


def _load(root, name):
    with open(os.path.join(root, name)) as f:
        return np.asarray(json.load(f), np.float64)


def _dilate(mask, r):
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


@pytest.mark.parametrize('split', ['training', 'evaluation'])
def test_freihand_61_values_reproduce_xyz_and_verts(freihand_set, layer, split):
    mano61, K = _load(freihand_set, f'{split}_mano.json'), _load(freihand_set, f'{split}_K.json')
    xyz, verts = _load(freihand_set, f'{split}_xyz.json'), _load(freihand_set, f'{split}_verts.json')
    assert mano61.shape[1:] == (1, 61) and xyz.shape[1:] == (21, 3) and verts.shape[1:] == (layer.num_verts, 3)
    v, j, pose = synthetic.freihand_mano_to_mesh(mano61[:, 0], K, layer)
    assert np.abs(j.numpy() - xyz).max() < 1e-5 and np.abs(v.numpy() - verts).max() < 1e-5  # << 1 mm
    # the stored finger pose is relative to hands_mean: the absolute pose adds it back
    assert np.allclose(pose[:, 3:].numpy(), mano61[:, 0, 3:48] + layer.hands_mean.numpy(), atol=1e-6)
    assert np.allclose(_load(freihand_set, f'{split}_scale.json'), np.linalg.norm(xyz[:, 9] - xyz[:, 10], axis=1))
    # uv_root is keypoint 9 projected; (u, v, f / z) of the official convention
    uv9 = synthetic.project(xyz[:, 9:10], K)[:, 0]
    assert np.allclose(mano61[:, 0, 58:60], uv9, atol=1e-4)
    assert np.allclose(mano61[:, 0, 60], K[:, 0, 0] / xyz[:, 9, 2], rtol=1e-6)
    # projecting xyz with K lands on the rendered hand (the silhouette written while rendering)
    for i in range(len(xyz)):
        mask = np.asarray(Image.open(os.path.join(freihand_set, split, 'mask', '%08d.jpg' % i))) > 127
        uv = np.rint(synthetic.project(xyz[i], K[i])).astype(int)
        assert (uv >= 0).all() and (uv < 224).all()
        assert _dilate(mask, 2)[uv[:, 1], uv[:, 0]].all(), (split, i)
        # and the silhouette is the one of the stored mesh seen through K
        face, _ = synthetic.rasterize(verts[i], layer.faces.numpy(), K[i], (224, 224))
        assert ((face >= 0) == mask).mean() > 0.99


def test_freihand_loader_samples(freihand_set, layer):
    train = data.FreiHAND(freihand_set, 'training')
    assert train.versions == 2 and len(train) == 12  # written with versions=2: image i + 6 shows annotation i
    xyz = _load(freihand_set, 'training_xyz.json')
    for i in (1, 7):
        s = train[i]
        assert s['image'].shape == (3, 224, 224) and s['image'].dtype == torch.float32
        assert s['has_3d'] and s['has_verts'] and s['has_mano'] and s['index'] == i
        assert np.allclose(s['joints3d'].numpy(), xyz[i % 6], atol=1e-6)
        out = layer(s['pose'][None], s['betas'][None])  # absolute pose: no hands_mean to add
        offset = s['root'] - out.joints[0, 0]
        assert (out.joints[0] + offset - s['joints3d']).abs().max() < 1e-5
        assert (out.vertices[0] + offset - s['verts']).abs().max() < 1e-5
        assert torch.allclose(synthetic.project(s['joints3d'].double(), s['K'].double()).float(), s['joints2d'], atol=1e-3)
        assert torch.isclose(s['scale'], (s['joints3d'][9] - s['joints3d'][10]).norm(), atol=1e-6)
    # the two versions of a sample share labels and differ in looks
    a, b = train[2], train[8]
    assert torch.equal(a['joints3d'], b['joints3d']) and not torch.equal(a['image'], b['image'])
    assert len(data.FreiHAND(freihand_set, 'training', versions=1)) == 6
    # evaluation with and without ground truth; batches collate
    ev = data.FreiHAND(freihand_set, 'evaluation')
    assert len(ev) == 4 and ev[0]['has_3d'] and ev[0]['has_mano']
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch['image'].shape == (4, 3, 224, 224) and batch['verts'].shape == (4, layer.num_verts, 3)


def test_freihand_evaluation_without_ground_truth(freihand_set, tmp_path):
    import shutil
    root = tmp_path / 'fh'
    shutil.copytree(os.path.join(freihand_set, 'evaluation'), root / 'evaluation')
    for name in ('evaluation_K.json', 'evaluation_scale.json'):
        shutil.copy(os.path.join(freihand_set, name), root / name)
    s = data.FreiHAND(root, 'evaluation', img_size=128)[1]
    assert not s['has_3d'] and not s['has_verts'] and not s['has_mano']
    assert s['image'].shape == (3, 128, 128) and (s['joints3d'] == 0).all()
    K = _load(freihand_set, 'evaluation_K.json')[1]
    assert np.allclose(s['K'][:2].numpy(), K[:2] * 128 / 224 + np.array([[0, 0, 0.5 * 128 / 224 - 0.5]]), atol=1e-4)


def test_finetune_augmentation_keeps_labels_on_the_hand(freihand_set, layer):
    """Augment the rendered silhouette itself: the re-posed MANO joints, projected with the augmented
    crop's K, must land on the warped silhouette and equal the transformed 2D labels."""
    train = data.FreiHAND(freihand_set, 'training', versions=1)
    aug = data.FinetuneAugment(scale=0.3, rotation=45, translation=0.1, color=0.0)
    torch.manual_seed(3)
    for i in range(6):
        mask = Image.open(os.path.join(freihand_set, 'training', 'mask', '%08d.jpg' % i)).convert('RGB')
        s = data.make_sample(mask, train.K[i], (111.5, 111.5), 224, train.annotation(i), i, 160, aug)
        warped = _denormalize(s['image'])[0].numpy() > 0.5
        out = layer(s['pose'][None], s['betas'][None])
        joints = out.joints[0] - out.joints[0, 0] + s['root']   # MANO re-posed with the rotated global orient
        assert (joints - s['joints3d']).abs().max() < 1e-5
        uv = synthetic.project(joints.double(), s['K'].double())
        assert torch.allclose(uv.float(), s['joints2d'], atol=1e-3)
        inside = ((uv >= 0) & (uv <= 159)).all(1)
        px = uv[inside].round().long().numpy()
        assert inside.sum() >= 15 and _dilate(warped, 2)[px[:, 1], px[:, 0]].all()


def test_ho3d_meta_and_loader(ho3d_set, layer):
    C = OPENGL_TO_OPENCV
    with open(os.path.join(ho3d_set, 'train.txt')) as f:
        ids = f.read().split()
    assert len(ids) == 3 and all(len(i.split('/')) == 2 for i in ids)
    seq, fid = ids[0].split('/')
    with open(os.path.join(ho3d_set, 'train', seq, 'meta', fid + '.pkl'), 'rb') as f:
        meta = pickle.load(f, encoding='latin1')
    assert Image.open(os.path.join(ho3d_set, 'train', seq, 'rgb', fid + '.png')).size == (640, 480)
    # HO3D's own convention: MANO(handPose, handBeta) + handTrans gives handJoints3D, OpenGL frame,
    # MANO+tips order, hand in front of the camera along -z.
    out = layer(torch.tensor(meta['handPose'][None], dtype=torch.float32),
                torch.tensor(meta['handBeta'][None], dtype=torch.float32),
                torch.tensor(meta['handTrans'][None], dtype=torch.float32))
    assert np.abs(out.joints[0].numpy()[FREIHAND_TO_MANO] - meta['handJoints3D']).max() < 1e-5
    assert (meta['handJoints3D'][:, 2] < 0).all()
    ds = data.HO3D(ho3d_set, 'train', img_size=128)
    s = ds[0]
    assert s['image'].shape == (3, 128, 128) and s['has_3d'] and s['has_mano'] and s['has_verts']
    assert np.allclose(s['joints3d'].numpy(), (meta['handJoints3D'] @ C)[data.MANO_TO_FREIHAND], atol=1e-6)
    out = layer(s['pose'][None], s['betas'][None])  # the OpenCV-frame pose poses the same hand
    offset = s['root'] - out.joints[0, 0]
    assert (out.joints[0] + offset - s['joints3d']).abs().max() < 1e-5
    assert (out.vertices[0] + offset - s['verts']).abs().max() < 1e-5
    uv = s['joints2d']
    assert ((uv > 0) & (uv < 127)).all() and (uv.max(0).values - uv.min(0).values).max() > 40  # hand fills the crop
    assert torch.allclose(synthetic.project(s['joints3d'].double(), s['K'].double()).float(), uv, atol=1e-3)
    aug = data.HO3D(ho3d_set, 'train', img_size=128, augment=True)[1]
    out = layer(aug['pose'][None], aug['betas'][None])
    assert (out.joints[0] - out.joints[0, 0] + aug['root'] - aug['joints3d']).abs().max() < 1e-5


def test_ho3d_evaluation_crops_from_the_box(ho3d_set):
    ev = data.HO3D(ho3d_set, 'evaluation', img_size=128)
    gt_xyz, gt_verts = _load(ho3d_set, 'evaluation_xyz.json'), _load(ho3d_set, 'evaluation_verts.json')
    assert len(ev) == 2 == len(gt_xyz)
    for i in range(2):
        s = ev[i]
        assert not s['has_3d'] and not s['has_mano'] and s['verts'].shape == (0, 3)
        assert np.allclose(s['root'].numpy(), OPENGL_TO_OPENCV @ gt_xyz[i, 0], atol=1e-6)  # wrist only
        uv = synthetic.project(gt_verts[i] @ OPENGL_TO_OPENCV, s['K'].double().numpy())  # GT mesh in the crop
        assert (uv > 0).all() and (uv < 127).all() and np.ptp(uv, 0).max() > 60


def test_ho3d_synth_without_evaluation_split_and_pickled_datasets(tmp_path, freihand_set):
    # n_eval=0 used to crash inside the MANO layer (a batch of zero hands)
    root = synthetic.synth(str(tmp_path / 'h'), 1, layout='ho3d', n_eval=0)
    ds = data.HO3D(root, 'train', img_size=64)
    assert len(ds) == 1 and _load(root, 'evaluation_xyz.json').size == 0
    # DataLoader workers started with 'spawn' receive the dataset pickled: no lambdas in its state
    for ds in (ds, data.FreiHAND(freihand_set, 'training')):
        copy = pickle.loads(pickle.dumps(ds))
        assert torch.equal(copy[0]['image'], ds[0]['image']) and torch.equal(copy[0]['K'], ds[0]['K'])


def test_malformed_annotations_name_the_file(freihand_set, ho3d_set, tmp_path):
    import shutil
    root = tmp_path / 'fh'
    shutil.copytree(freihand_set, root)
    (root / 'training_xyz.json').write_text('[[1, 2')
    with pytest.raises(ValueError, match='training_xyz.json.*expected'):
        data.FreiHAND(root, 'training')
    (root / 'training_xyz.json').write_text('[[1, 2, 3]]')
    with pytest.raises(ValueError, match='training_xyz.json has shape'):
        data.FreiHAND(root, 'training')
    os.remove(root / 'training_K.json')
    with pytest.raises(FileNotFoundError, match='training_K.json is missing'):
        data.FreiHAND(root, 'training')
    h = tmp_path / 'ho3d'
    shutil.copytree(ho3d_set, h)
    seq, fid = open(h / 'train.txt').read().split()[0].split('/')
    meta = h / 'train' / seq / 'meta' / (fid + '.pkl')
    with open(meta, 'wb') as f:
        pickle.dump({'handPose': np.zeros(48)}, f)
    with pytest.raises(ValueError, match=f'{fid}.pkl is malformed.*handBeta'):
        data.HO3D(h, 'train')[0]
    with open(meta, 'wb') as f:
        pickle.dump({'handPose': os.getcwd}, f)  # code in a pickle is refused, not run
    with pytest.raises(ValueError, match='refusing'):
        data.HO3D(h, 'train')[0]
    os.remove(meta)
    with pytest.raises(FileNotFoundError, match=f'{fid}.pkl is missing'):
        data.HO3D(h, 'train')[0]
