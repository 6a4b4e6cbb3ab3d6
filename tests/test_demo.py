"""Tests of the demo (plot.run_demo, run by `evaluate.py --images DIR --checkpoint CKPT --out DIR [--left]`).

A tiny network is fine-tuned for one step with finetune.train on a 4-image synthetic set; the demo
runs on two of its images (one padded to a wider, non-square canvas inside a sub-folder) and one
broken file. The outputs are checked against independent computations: the OBJ against the npz and
the MANO layer's faces, the npz's MANO parameters re-posed through the MANO layer, the mesh projected
with the stored intrinsics, and a left-hand run on mirrored copies against the right-hand run.
"""
import contextlib
import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import finetune
import plot
from synthetic import project, synth, synthetic_mano
from mano import MANO

S = 64    # network input side
D = 96    # overlay side used by the tests


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """(best.pth of a one-step fine-tuning run, folder with 2 hand crops + 1 broken file, the crop pixels)."""
    root = tmp_path_factory.mktemp('demo')
    data = synth(root / 'synth', 4, img_size=S, n_eval=1)
    cfg = finetune.FinetuneConfig(data=str(data), output_dir=str(root / 'run'), img_size=S, depth=1, batch_size=2,
                                  epochs=1, warmup_epochs=0, val_fraction=0.25, workers=0, device='cpu')
    assert finetune.train(cfg) == 0
    images = root / 'images'
    (images / 'sub').mkdir(parents=True)
    crops = [np.asarray(Image.open(data / 'training' / 'rgb' / f'{i:08d}.jpg').convert('RGB')) for i in (0, 1)]
    Image.fromarray(crops[0]).save(images / 'a.png')
    wide = np.zeros((S, S + 32, 3), np.uint8)  # the hand crop centred on a wider canvas
    wide[:, 16:16 + S] = crops[1]
    Image.fromarray(wide).save(images / 'sub' / 'b.png')
    (images / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is no JPEG')
    return str(root / 'run' / 'best.pth'), images, crops


def run(images, ckpt, out, *flags):
    return evaluate.main(['--images', str(images), '--checkpoint', ckpt, '--out', str(out), '--overlay_size', str(D),
                          '--device', 'cpu', *flags])


def read_obj(path):
    """(verts (V, 3), faces (F, 3) 1-based) of an OBJ written by the demo, parsed independently."""
    text = open(path).read()
    verts = [list(map(float, m)) for m in re.findall(r'^v (\S+) (\S+) (\S+)$', text, re.M)]
    faces = [list(map(int, m)) for m in re.findall(r'^f (\d+) (\d+) (\d+)$', text, re.M)]
    assert len(verts) + len(faces) == len(text.strip().splitlines())  # nothing else in the file
    return np.array(verts), np.array(faces)


def signed_volume(verts, faces):
    """Volume enclosed by a closed triangle mesh (0-based faces): > 0 when the faces wind outward."""
    a, b, c = (verts[faces[:, i]] for i in range(3))
    return np.einsum('ij,ij->i', a, np.cross(b, c)).sum() / 6


def bare_crop(image_path):
    """(D, D, 3) int: the input image's centre square resized to D, as the demo shows it."""
    image = Image.open(image_path).convert('RGB')
    return np.asarray(image.resize((D, D), Image.BICUBIC, box=plot.centre_square(*image.size))).astype(int)


def drawn_mask(picture_path, image_path):
    """(D, D) bool: where the right panel (mesh and joints) differs from the input image."""
    return np.abs(np.asarray(Image.open(picture_path))[:, D:2 * D].astype(int) - bare_crop(image_path)).sum(-1) > 12


@pytest.fixture(scope='module')
def right(setup, tmp_path_factory):
    ckpt, images, _ = setup
    out = tmp_path_factory.mktemp('right')
    with contextlib.redirect_stderr(io.StringIO()) as err:  # capsys is per test, this fixture per module
        assert run(images, ckpt, out) == 0
    return out, err.getvalue()


def test_demo_writes_consistent_files(setup, right):
    _, images, crops = setup
    right, stderr = right
    layer = MANO(synthetic_mano())
    faces = layer.faces.numpy()
    assert sorted(os.listdir(right)) == ['a.npz', 'a.obj', 'a.png', 'demo_config.json', 'sub']  # broken.jpg: none
    assert sorted(os.listdir(right / 'sub')) == ['b.npz', 'b.obj', 'b.png']
    results = {}
    for name in ('a', 'sub/b'):
        res = dict(np.load(right / f'{name}.npz'))
        results[name] = res
        shapes = dict(pose=(48,), betas=(10,), cam=(3,), transl=(3,), joints=(21, 3), vertices=(layer.num_verts, 3),
                      K=(3, 3), K_crop=(3, 3), K_image=(3, 3), left=())
        assert {k: v.shape for k, v in res.items()} == shapes
        assert not res['left'] and all(np.isfinite(v).all() for v in res.values())

        # The OBJ: the npz's vertices (metres, 6 decimals) and the MANO faces, 1-based, same winding.
        verts, obj_faces = read_obj(right / f'{name}.obj')
        assert np.abs(verts - res['vertices']).max() < 1e-6
        assert np.array_equal(obj_faces, faces + 1) and obj_faces.min() == 1
        assert signed_volume(verts, faces) > 0  # outward-facing, as the MANO mesh

        # The MANO parameters reproduce the mesh: MANO(pose, betas) + transl, camera frame.
        with torch.no_grad():
            out = layer(torch.from_numpy(res['pose'])[None], torch.from_numpy(res['betas'])[None])
        assert np.abs(out.vertices[0].numpy() + res['transl'] - res['vertices']).max() < 1e-5
        assert np.abs(out.joints[0].numpy() + res['transl'] - res['joints']).max() < 1e-5

        # In front of the camera, projecting into the overlay; the three intrinsics describe one camera.
        assert (res['vertices'][:, 2] > 0.05).all()
        uv = project(res['vertices'].astype(np.float64), res['K'])
        assert ((uv > -0.5) & (uv < D - 0.5)).all()
        uv_crop = project(res['vertices'].astype(np.float64), res['K_crop'])
        assert np.allclose(uv, (uv_crop + 0.5) * D / S - 0.5, atol=1e-3)
        png = np.asarray(Image.open(right / f'{name}.png'))
        assert png.shape == (D, 2 * D, 3)  # [the input | mesh and joints over it]
        assert np.array_equal(png[:, :D], bare_crop(images / f'{name}.png'))  # the left half is the resized input
        # The mesh is drawn where it projects: those pixels differ from the bare (resized) crop.
        px = np.rint(uv).astype(int)
        assert drawn_mask(right / f'{name}.png', images / f'{name}.png')[px[:, 1], px[:, 0]].mean() > 0.8

    # b sits in the middle of a wider canvas: the centre crop finds exactly crop 1 there, and its
    # intrinsics in canvas pixels are the crop's shifted by the 16 px margin.
    b = results['sub/b']
    uv_image = project(b['vertices'].astype(np.float64), b['K_image'])
    assert np.allclose(uv_image - [16, 0], project(b['vertices'].astype(np.float64), b['K_crop']), atol=1e-3)
    model, _ = evaluate.load_finetuned(setup[0])
    direct = plot.predict_hand(model, Image.fromarray(crops[1]), focal=2.34)
    for key in ('pose', 'betas', 'cam', 'vertices', 'K_crop'):
        assert np.allclose(direct[key], b[key], atol=1e-6), key
    assert 'skipping' in stderr and 'broken.jpg' in stderr


def test_left_mirrors_the_right_hand(setup, right, tmp_path):
    """--left on mirrored copies: the left-hand mesh is the right-hand one with x negated, the stored
    MANO parameters are the right hand's, and the OBJ winding is flipped so it still faces outward."""
    ckpt, images, _ = setup
    right, mirrored = right[0], tmp_path / 'mirrored'
    for name in ('a', 'sub/b'):
        os.makedirs(os.path.dirname(mirrored / name), exist_ok=True)
        Image.open(images / f'{name}.png').transpose(Image.FLIP_LEFT_RIGHT).save(mirrored / f'{name}.png')
    out = tmp_path / 'left'
    assert run(mirrored, ckpt, out, '--left') == 0
    faces = MANO(synthetic_mano()).faces.numpy()
    for name in ('a', 'sub/b'):
        r, l = dict(np.load(right / f'{name}.npz')), dict(np.load(out / f'{name}.npz'))
        assert l['left'] and not r['left']
        for key in ('pose', 'betas', 'cam', 'transl', 'K', 'K_crop', 'K_image'):
            assert np.allclose(l[key], r[key], atol=1e-5), key
        for key in ('vertices', 'joints'):
            assert np.allclose(l[key], r[key] * [-1, 1, 1], atol=1e-5), key
        verts_r, faces_r = read_obj(right / f'{name}.obj')
        verts_l, faces_l = read_obj(out / f'{name}.obj')
        assert np.array_equal(faces_l, faces_r[:, ::-1])
        assert signed_volume(verts_l, faces_l - 1) > 0 > signed_volume(verts_l, faces)  # unflipped: inside out
        # The overlay draws the mirror image of the right-hand drawing (shading aside: the light is fixed).
        drawn = [drawn_mask(d / f'{name}.png', src / f'{name}.png') for d, src in ((right, images), (out, mirrored))]
        assert (drawn[0] & drawn[1][:, ::-1]).sum() > 0.9 * (drawn[0] | drawn[1][:, ::-1]).sum() > 0


def test_bad_checkpoints_exit_2_and_write_nothing(setup, tmp_path, capsys):
    ckpt, images, _ = setup
    data = open(ckpt, 'rb').read()
    bad = {'garbage.pth': b'not a checkpoint at all', 'truncated.pth': data[:len(data) // 2]}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    torch.save({'model': {'w': torch.zeros(3)}}, tmp_path / 'foreign.pth')  # a torch file, not ours
    state = torch.load(ckpt, weights_only=True)
    state['config'] = {k: v for k, v in state['config'].items() if k != 'arch'}
    torch.save(state, tmp_path / 'no_arch.pth')  # ours, but with a damaged config
    for name in (*bad, 'foreign.pth', 'no_arch.pth', 'missing.pth'):
        out = tmp_path / ('out_' + name)
        assert run(images, str(tmp_path / name), out) == 2, name
        assert name in capsys.readouterr().err and not out.exists(), name
    assert run(tmp_path / 'no_images_here', ckpt, tmp_path / 'out_noimg') == 2
    assert not (tmp_path / 'out_noimg').exists()


def test_output_names_and_an_output_folder_inside_the_inputs(setup, tmp_path, capsys):
    """hand.jpg and hand.png get distinct outputs; outputs written inside the image folder are not
    read back as inputs by the next run."""
    ckpt, images, _ = setup
    folder = tmp_path / 'imgs'
    folder.mkdir()
    crop = Image.open(images / 'a.png')
    crop.save(folder / 'hand.png')
    crop.save(folder / 'hand.jpg', quality=95)
    for _ in range(2):
        assert run(folder, ckpt, folder / 'demo') == 0
        assert 'demo: 2 hands written' in capsys.readouterr().out
    assert sorted(os.listdir(folder / 'demo')) == ['demo_config.json', 'hand_jpg.npz', 'hand_jpg.obj', 'hand_jpg.png',
                                                  'hand_png.npz', 'hand_png.obj', 'hand_png.png']


def test_crop_geometry():
    """The centred square's pixel edges map onto the resized crop's edges; the crop camera's principal
    point is the crop's centre, and mirroring a crop is x -> -x for that camera."""
    box = plot.centre_square(96, 64)
    assert box == (16, 0, 80, 64)
    A = plot.crop_affine(box, 128)
    edges = A @ np.array([[15.5, 79.5], [-0.5, 63.5], [1, 1]])  # outer pixel edges of the square
    assert np.allclose(edges[:2], [[-0.5, 127.5], [-0.5, 127.5]])
    K = plot.crop_intrinsics(2.0, 64)
    X = np.random.default_rng(0).normal(size=(20, 3)) * 0.05 + [0, 0, 0.5]
    u, u_mirror = project(X, K), project(plot.mirror_x(X), K)
    assert np.allclose(u_mirror[:, 0], 63 - u[:, 0]) and np.allclose(u_mirror[:, 1], u[:, 1])
