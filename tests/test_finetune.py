"""Tests of finetune.py: losses, camera, layer-wise lr decay, pretrained-checkpoint formats, a tiny-batch
overfit, exact resume, runs and validation in two processes (gloo), and clear errors on bad checkpoints."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import finetune
from engine import apply_preset
from evaluate import load_finetuned
from finetune import load_pretrained, load_regressor, lr_decay_scale, mesh_losses
from mano import MANO, axis_angle_to_matrix
from model import MeshRegressor, build_regressor, camera_translation, interpolate_pos_embed, vit_small, vit_tiny
from synthetic import synthetic_mano

S = 64  # crop size of every test


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # these are small ops: on a busy 2-core machine one thread is several times faster


@pytest.fixture(scope='module')
def mano():
    return MANO(synthetic_mano())


def make_labels(mano, n, seed=0):
    """A batch in the data.py sample format, labelled by posing MANO in front of a pinhole camera."""
    g = torch.Generator().manual_seed(seed)
    pose = torch.cat([0.6 * torch.randn(n, 3, generator=g),
                      mano.hands_mean.float() + 0.2 * torch.randn(n, 45, generator=g)], 1)  # (n, 48)
    betas = 0.5 * torch.randn(n, 10, generator=g)
    out = mano(pose=pose, betas=betas, transl=torch.tensor([[0.0, 0.0, 0.6]]).expand(n, 3))
    K = torch.tensor([[150.0, 0, S / 2], [0, 150.0, S / 2], [0, 0, 1]]).expand(n, 3, 3)
    uvw = out.joints @ K.transpose(1, 2)  # (n, J, 3)
    return dict(image=torch.randn(n, 3, S, S, generator=g), K=K.clone(), joints3d=out.joints,
                verts=out.vertices, pose=pose, betas=betas, joints2d=uvw[..., :2] / uvw[..., 2:],
                root=out.joints[:, 0], has_3d=torch.ones(n, dtype=torch.bool),
                has_verts=torch.ones(n, dtype=torch.bool), has_mano=torch.ones(n, dtype=torch.bool))


WEIGHTS = dict(j3d=1.0, v3d=1.0, hand=1.0, j2d=1.0, rot=1.0, beta=1.0)


def perfect_outputs(batch, shift):
    """What a perfect regressor returns: MANO-frame mesh (any translation), normalized 2D joints."""
    B = len(batch['pose'])
    return [dict(joints=batch['joints3d'] + shift, vertices=batch['verts'] + shift,
                 joints2d=batch['joints2d'] * 2 / S - 1, betas=batch['betas'].clone(),
                 rotmat=axis_angle_to_matrix(batch['pose'].view(B, 16, 3)))]


def test_losses_vanish_on_ground_truth_and_measure_l1(mano):
    batch = make_labels(mano, 3)
    outputs = perfect_outputs(batch, shift=torch.tensor([0.1, -0.2, 0.3]))  # root-relative: shift is free
    total, terms = mesh_losses(outputs, batch, WEIGHTS)
    assert total.item() < 1e-6 and max(terms.values()) < 1e-6
    # One joint off by 1 cm in x in every sample: the joint L1 is 0.01 / (21 * 3).
    outputs[0]['joints'][:, 5, 0] += 0.01
    _, terms = mesh_losses(outputs, batch, WEIGHTS)
    assert terms['j3d'] == pytest.approx(0.01 / 63, rel=1e-4)
    # Every iteration is supervised: two identical iterations double the total.
    outputs[0]['betas'] += 1.0
    one, _ = mesh_losses(outputs, batch, WEIGHTS)
    two, _ = mesh_losses(outputs * 2, batch, WEIGHTS)
    assert two.item() == pytest.approx(2 * one.item(), rel=1e-6)


def test_hand_frame_loss_ignores_global_rotation_only(mano):
    """The hand-frame term sees finger pose and shape errors, not a wrong global rotation."""
    batch = make_labels(mano, 3)
    B = len(batch['pose'])
    turned = batch['pose'].clone()
    turned[:, :3] = torch.tensor([0.0, 2.5, 0.0])  # another global rotation, same fingers and shape
    out = mano(pose=turned, betas=batch['betas'])
    outputs = [dict(joints=out.joints, vertices=out.vertices, joints2d=batch['joints2d'] * 2 / S - 1,
                    betas=batch['betas'], rotmat=axis_angle_to_matrix(turned.view(B, 16, 3)))]
    _, terms = mesh_losses(outputs, batch, WEIGHTS)
    assert terms['hand'] < 1e-6 and terms['v3d'] > 1e-2
    bent = turned.clone()
    bent[:, 3 + 3 * 4:3 + 3 * 5] += 0.5  # one finger joint bent further
    out = mano(pose=bent, betas=batch['betas'])
    outputs[0].update(joints=out.joints, vertices=out.vertices, rotmat=axis_angle_to_matrix(bent.view(B, 16, 3)))
    _, terms = mesh_losses(outputs, batch, WEIGHTS)
    assert terms['hand'] > 1e-4


def test_losses_respect_label_masks(mano):
    batch = make_labels(mano, 4)
    outputs = perfect_outputs(batch, shift=0.0)
    outputs[0]['betas'][:2] += 3.0  # wrong shape only on samples without MANO labels
    outputs[0]['rotmat'][:2] = torch.eye(3)
    outputs[0]['vertices'][1:] += torch.randn_like(outputs[0]['vertices'][1:])  # samples without verts
    batch['has_mano'][:2] = False
    batch['has_verts'][1:] = False
    _, terms = mesh_losses(outputs, batch, WEIGHTS)
    assert max(terms.values()) < 1e-6
    batch['has_mano'][:] = False
    batch['has_verts'][:] = False
    batch['has_3d'][:] = False  # nothing labelled: every term is 0, not NaN
    total, _ = mesh_losses(outputs, batch, WEIGHTS)
    assert total.item() == 0.0


def test_camera_translation_matches_weak_perspective():
    """Points at the reference depth project identically under the pinhole camera with the recovered
    translation and under the weak-perspective camera, also with an off-centre principal point."""
    g = torch.Generator().manual_seed(1)
    B = 5
    cam = torch.stack([torch.rand(B, generator=g) * 4 + 2, torch.randn(B, generator=g) * 0.05,
                       torch.randn(B, generator=g) * 0.05], 1)
    K = torch.zeros(B, 3, 3)
    K[:, 0, 0] = K[:, 1, 1] = 100 + 400 * torch.rand(B, generator=g)
    K[:, :2, 2] = S / 2 + 5 * torch.randn(B, 2, generator=g)
    K[:, 2, 2] = 1
    X = torch.cat([0.05 * torch.randn(B, 7, 2, generator=g), torch.zeros(B, 7, 1)], -1)  # (B, 7, 3), Z = 0
    uvw = (X + camera_translation(cam, K, S)[:, None]) @ K.transpose(1, 2)
    pinhole = uvw[..., :2] / uvw[..., 2:]
    weak = (cam[:, None, :1] * (X[..., :2] + cam[:, None, 1:]) + 1) * S / 2
    torch.testing.assert_close(pinhole, weak, rtol=0, atol=1e-4)
    # Contract: centred principal point -> (tx, ty, 2 f / (s S)).
    K[:, :2, 2] = S / 2
    T = camera_translation(cam, K, S)
    torch.testing.assert_close(T, torch.stack([cam[:, 1], cam[:, 2], 2 * K[:, 0, 0] / (cam[:, 0] * S)], 1))


def test_layer_decay_follows_mae():
    L, d = 12, 0.75
    assert lr_decay_scale('vit.cls_token', L, d) == d ** 13
    assert lr_decay_scale('vit.patch_embed.proj.weight', L, d) == d ** 13
    assert lr_decay_scale('vit.blocks.0.attn.qkv.weight', L, d) == d ** 12
    assert lr_decay_scale('vit.blocks.11.mlp.fc2.bias', L, d) == d ** 1
    assert lr_decay_scale('vit.norm.weight', L, d) == 1.0
    assert lr_decay_scale('regressor.0.fc1.weight', L, d) == 1.0


# ----------------------------------------------------------------------------------------------------
# Pretrained checkpoint formats

def _official_layouts(sd):
    """The same ViT weights as the various public checkpoints store them."""
    head = {'head.weight': torch.randn(10, 192), 'head.bias': torch.randn(10)}
    return {
        'backbone.pth (ours) / timm': {**sd, **head},
        'MAE': {'model': {**sd, 'mask_token': torch.zeros(1, 1, 512), 'decoder_embed.weight': torch.randn(512, 192)}},
        'DINO teacher': {'teacher': {**{'backbone.' + k: v for k, v in sd.items()},
                                     'head.mlp.0.weight': torch.randn(4, 192)},
                         'student': {'module.backbone.' + k: torch.zeros_like(v) for k, v in sd.items()},
                         'epoch': 100},
        'iBOT': {'state_dict': {'module.backbone.' + k: v for k, v in sd.items()}},
        'encoder prefix': {'encoder.' + k: v for k, v in sd.items()},
        'pretrain checkpoint.pth (ours)': {
            'model': {**{'backbone.' + k: torch.zeros_like(v) for k, v in sd.items()},
                      'pixel_head.proj.weight': torch.randn(768, 192)},
            'teacher': {**{'backbone.' + k: v for k, v in sd.items()}, 'head.last_layer.weight': torch.randn(8, 4)},
            'config': {'arch': 'vit_tiny'}, 'epoch': 5, 'step': 100},
    }


@pytest.mark.parametrize('layout', list(_official_layouts({})))
def test_pretrained_formats_load_exactly(tmp_path, layout):
    torch.manual_seed(3)
    source = vit_tiny(img_size=S, depth=2).eval()
    path = tmp_path / 'ckpt.pth'
    torch.save(_official_layouts(source.state_dict())[layout], path)
    target = vit_tiny(img_size=S, depth=2).eval()
    loaded, missing, unexpected = load_pretrained(target, str(path), key='teacher')
    assert 'blocks.0.attn.qkv.weight' in loaded and 'pos_embed' in loaded
    assert all(not k.startswith(('head', 'decoder')) for k in loaded)
    assert set(missing) <= {'mask_token'}
    x = torch.randn(2, 3, S, S)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize('layout', ['DINO teacher', 'pretrain checkpoint.pth (ours)'])
def test_pretrained_key_student_picks_the_student(tmp_path, layout):
    source = vit_tiny(img_size=S, depth=2)
    torch.save(_official_layouts(source.state_dict())[layout], tmp_path / 'ckpt.pth')
    target = vit_tiny(img_size=S, depth=2)
    load_pretrained(target, str(tmp_path / 'ckpt.pth'), key='student')  # the student's weights are all zero
    assert all(not v.any() for k, v in target.state_dict().items() if k != 'mask_token')


def test_pretrained_pos_embed_is_interpolated(tmp_path):
    source = vit_tiny(img_size=96, depth=2)
    torch.save(source.state_dict(), tmp_path / 'backbone.pth')
    target = vit_tiny(img_size=S, depth=2)
    load_pretrained(target, str(tmp_path / 'backbone.pth'))
    torch.testing.assert_close(target.pos_embed, interpolate_pos_embed(source.pos_embed, target.grid))
    torch.testing.assert_close(target.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)


def test_pretrained_takes_the_vit_of_a_finetune_checkpoint(tmp_path, mano):
    """A finetune.py checkpoint (a FreiHAND model to start HO3D from, say) gives its ViT key for key;
    the regressor's weights are not the ViT's and are left out, not reported as unexpected."""
    torch.manual_seed(4)
    source = MeshRegressor(vit_tiny(img_size=S, depth=2), mano, deconv_dims=(64, 32, 32), hidden_dim=256)
    torch.save({'model': source.state_dict(), 'config': {}, 'epoch': 1}, tmp_path / 'best.pth')
    target = vit_tiny(img_size=S, depth=2)
    loaded, missing, unexpected = load_pretrained(target, str(tmp_path / 'best.pth'))
    assert not missing and not unexpected and len(loaded) == len(target.state_dict())
    for k, v in source.vit.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_keep_regressor_starts_the_whole_model_from_a_finetune_checkpoint(tmp_path, mano):
    """--pretrained + --keep_regressor on a finetune.py checkpoint: the new model predicts exactly what the old
    one did; a regressor of another width, or a file without one, is a clear error."""
    torch.manual_seed(5)
    make = lambda dims: MeshRegressor(vit_tiny(img_size=S, depth=2), mano, deconv_dims=dims, hidden_dim=256).eval()
    source = make((64, 32, 32))
    path = tmp_path / 'best.pth'
    torch.save({'model': source.state_dict(), 'config': {}, 'epoch': 1}, path)
    target = make((64, 32, 32))
    load_pretrained(target.vit, str(path))
    x = torch.randn(2, 3, S, S)
    assert not torch.allclose(target(x)[-1]['vertices'], source(x)[-1]['vertices'])  # the ViT alone: not enough
    loaded = load_regressor(target, str(path))
    assert len(loaded) + len(source.vit.state_dict()) == len(source.state_dict())
    for a, b in zip(target(x), source(x)):
        torch.testing.assert_close(a['vertices'], b['vertices'])
    with pytest.raises(ValueError, match='--head_width'):
        load_regressor(make((32, 16, 16)), str(path))
    torch.save(source.vit.state_dict(), tmp_path / 'backbone.pth')
    with pytest.raises(ValueError, match='not a finetune.py checkpoint'):
        load_regressor(target, str(tmp_path / 'backbone.pth'))


def test_bad_pretrained_files_are_clear_errors(tmp_path):
    vit = vit_tiny(img_size=S, depth=2)
    good = tmp_path / 'good.pth'
    torch.save(vit.state_dict(), good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match='truncated'):
        load_pretrained(vit, str(truncated))
    foreign = tmp_path / 'foreign.pth'
    torch.save({'weights': {'conv1.weight': torch.randn(3, 3)}}, foreign)
    with pytest.raises(ValueError, match='no ViT weights'):
        load_pretrained(vit, str(foreign))
    small = tmp_path / 'small.pth'
    torch.save(vit_small(img_size=S, depth=2).state_dict(), small)
    with pytest.raises(ValueError, match='--arch'):
        load_pretrained(vit, str(small))
    deeper = tmp_path / 'deeper.pth'
    torch.save(vit_tiny(img_size=S, depth=3).state_dict(), deeper)
    with pytest.raises(ValueError, match=r'\(3 blocks.*--depth'):
        load_pretrained(vit, str(deeper))
    with pytest.raises(ValueError, match='not a finetune.py checkpoint'):
        load_finetuned(str(good))


# ----------------------------------------------------------------------------------------------------
# Training

def pa_error(pred, gt):
    """Mean per-point error after the official FreiHAND similarity alignment (scipy, per sample)."""
    from scipy.linalg import orthogonal_procrustes
    errors = []
    for p, t in zip(pred.double().numpy(), gt.double().numpy()):
        p0, t0 = p - p.mean(0), t - t.mean(0)
        p0n, t0n = p0 / np.linalg.norm(p0), t0 / np.linalg.norm(t0)
        R, s = orthogonal_procrustes(t0n, p0n)
        aligned = p0n @ R.T * s * np.linalg.norm(t0) + t.mean(0)
        errors.append(np.linalg.norm(aligned - t, axis=1).mean())
    return float(np.mean(errors))


def test_tiny_batch_overfits(mano):
    """Four labelled crops, a 2-block ViT-Tiny at 64 px: the losses drive the regressor to memorize
    them, from the mean hand to about a millimetre PA-MPVPE."""
    batch = make_labels(mano, 4)
    model = MeshRegressor(vit_tiny(img_size=S, depth=2), mano, deconv_dims=(64, 32, 32), hidden_dim=256)
    start = pa_error(model.eval()(batch['image'])[-1]['vertices'].detach(), batch['verts'])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    cfg, _ = apply_preset(finetune.FinetuneConfig(), finetune.PRESETS, has_gpu=False)  # the CPU default weights
    weights = dict(j3d=cfg.w_j3d, v3d=cfg.w_v3d, hand=cfg.w_hand, j2d=cfg.w_j2d, rot=cfg.w_rot, beta=cfg.w_beta)
    model.train()
    for step in range(60):
        loss, _ = mesh_losses(model(batch['image']), batch, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model.eval()(batch['image'])[-1]
    end = pa_error(out['vertices'], batch['verts'])
    print(f'PA-MPVPE {1000 * start:.2f} mm -> {1000 * end:.2f} mm')
    assert end < 0.003 and end < start / 4


@pytest.fixture(scope='module')
def synth_set(tmp_path_factory):
    from synthetic import synth
    return synth(tmp_path_factory.mktemp('hands') / 'synth', 12, img_size=S, n_eval=2)


def small_config(data, out, **kw):
    return finetune.FinetuneConfig(**{**dict(data=str(data), output_dir=str(out), img_size=S, depth=2, batch_size=4,
                                             epochs=2, warmup_epochs=1, val_fraction=0.25, workers=0, log_every=1,
                                             device='cpu', blr=0.05), **kw})


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_resume_is_exact_and_checkpoint_predicts(synth_set, tmp_path):
    """An uninterrupted run and one stopped mid-epoch and resumed end with identical weights and losses;
    best.pth rebuilds through load_finetuned and predicts camera-frame meshes that reproject onto the
    network's own 2D joints."""
    assert finetune.train(small_config(synth_set, tmp_path / 'a')) == 0  # 9 train / 3 val: 2 steps an epoch
    assert finetune.train(small_config(synth_set, tmp_path / 'b', max_steps=3)) == 0
    assert finetune.train(small_config(synth_set, tmp_path / 'b', resume=str(tmp_path / 'b' / 'checkpoint.pth'))) == 0
    a, b = (torch.load(tmp_path / d / 'checkpoint.pth', weights_only=True) for d in 'ab')
    assert a['step'] == b['step'] == 4 and a['epoch'] == b['epoch'] == 2
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    steps = lambda log: {r['step']: r['loss'] for r in log if 'loss' in r}
    log_a, log_b = read_log(tmp_path / 'a' / 'log.jsonl'), read_log(tmp_path / 'b' / 'log.jsonl')
    assert steps(log_a) == steps(log_b) and len(steps(log_a)) == 4
    val = [r for r in log_a if 'val_pa_mpvpe_mm' in r]
    assert len(val) == 2 and all(0 < r['val_pa_mpvpe_mm'] < 100 for r in val)

    model, cfg = load_finetuned(str(tmp_path / 'a' / 'best.pth'))
    assert cfg['depth'] == 2 and cfg['img_size'] == S
    from data import FreiHAND
    evaluation = FreiHAND(str(synth_set), 'evaluation', S)
    xyz, verts = evaluate.predict(model, torch.utils.data.DataLoader(evaluation, batch_size=2))
    assert xyz.shape == (2, 21, 3) and verts.shape == (2, model.mano.num_verts, 3) and (xyz[..., 2] > 0.1).all()
    batch = torch.utils.data.default_collate([evaluation[0], evaluation[1]])
    with torch.no_grad():
        uv = (model(batch['image'])[-1]['joints2d'] + 1) * S / 2  # (B, J, 2) pixels by weak perspective
    uvw = torch.from_numpy(xyz) @ batch['K'].transpose(1, 2)
    # Weak perspective ignores depth differences within the hand: agreement to a few pixels, not exact.
    assert (uvw[..., :2] / uvw[..., 2:] - uv).norm(dim=-1).mean() < 0.05 * S


def test_two_process_gloo_run_validates_the_network_it_saves(synth_set, tmp_path, torchrun):
    """finetune.py under torchrun (2 gloo processes, 3 validation images: shards of 2 and 1): rank 0 alone writes,
    and the validation it logs is the one-process validation of the network in its checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = small_config(synth_set, tmp_path / 'o', batch_size=2, epochs=1, max_steps=2)
    flags = [f'--{k}={getattr(cfg, k)}' for k in ('data', 'output_dir', 'img_size', 'depth', 'batch_size', 'epochs',
                                                  'warmup_epochs', 'val_fraction', 'workers', 'device', 'blr',
                                                  'max_steps', 'log_every')]
    r = torchrun(os.path.join(root, 'finetune.py'), *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    log = read_log(tmp_path / 'o' / 'log.jsonl')
    assert [x['step'] for x in log if 'loss' in x] == [1, 2]                    # rank 0 alone writes
    logged = [x for x in log if 'val_pa_mpvpe_mm' in x][-1]
    model, _ = load_finetuned(str(tmp_path / 'o' / 'checkpoint.pth'))
    _, val = finetune.make_datasets(cfg)
    assert len(val) == 3
    one = finetune.validate(model, val, cfg, torch.device('cpu'))
    assert logged['val_pa_mpvpe_mm'] == pytest.approx(one['pa_mpvpe_mm'], rel=1e-5)
    assert logged['val_pa_mpjpe_mm'] == pytest.approx(one['pa_mpjpe_mm'], rel=1e-5)


def test_two_processes_fine_tune_as_one_process_but_for_batchnorm(synth_set, tmp_path, monkeypatch, torchrun):
    """With the pyramid's BatchNorm on its running statistics (its batch statistics are the one thing computed per
    process) and no drop path, 2 processes of batch 2 under torchrun move the network as one process of batch 4 does,
    to 1e-3 of the update: the same samples, the lr of the global batch, gradients averaged over the ranks."""
    (tmp_path / 'frozen_bn.py').write_text(
        'import sys, torch, finetune\n'
        'torch.nn.BatchNorm2d.train = lambda self, mode=True: torch.nn.Module.train(self, False)\n'
        'sys.exit(finetune.main(sys.argv[1:]))\n')
    flags = ['--data', str(synth_set), '--img_size', str(S), '--depth', '2', '--epochs', '1', '--warmup_epochs', '1',
             '--val_fraction', '0.25', '--workers', '0', '--device', 'cpu', '--drop_path', '0', '--max_steps', '2']
    r = torchrun(tmp_path / 'frozen_bn.py', *flags, '--batch_size', '2', '--output_dir', tmp_path / 'two')
    assert r.returncode == 0, r.stderr[-2000:]
    monkeypatch.setattr(torch.nn.BatchNorm2d, 'train', lambda self, mode=True: torch.nn.Module.train(self, False))
    assert finetune.main([*flags, '--batch_size', '4', '--output_dir', str(tmp_path / 'one')]) == 0
    one, two = (torch.load(tmp_path / d / 'checkpoint.pth', weights_only=True) for d in ('one', 'two'))
    torch.manual_seed(one['config']['seed'])                                  # the runs' initialisation
    init = build_regressor(one['config'], MANO(synthetic_mano())).state_dict()
    keys = [k for k, v in init.items() if v.is_floating_point() and 'running' not in k and 'mano' not in k]
    moved = lambda ck: torch.cat([(ck['model'][k] - init[k]).flatten() for k in keys])
    assert one['step'] == two['step'] == 2 and moved(one).norm() > 0
    assert (moved(one) - moved(two)).norm() < 1e-3 * moved(one).norm()


def _reading_network(cfg):
    """A regressor whose mesh depends on its features (a fresh one starts near the mean hand whatever it sees)."""
    torch.manual_seed(0)
    model = build_regressor(dataclasses.asdict(cfg), MANO(synthetic_mano()))
    for last in (r[-1] for r in model.regressors):
        last.weight.data.mul_(100)  # from PyMAF's start gain of 0.01 to 1
    return model


def _validate_worker(rank, world, port, cfg, result_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    model = _reading_network(cfg)
    if rank == 1:  # what DDP leaves: BatchNorm statistics updated by this rank's own batches
        for name, b in model.named_buffers():
            if 'running_mean' in name:
                b.add_(1.0)
            elif 'running_var' in name:
                b.mul_(0.01)
    _, val = finetune.make_datasets(cfg)
    metrics = finetune.validate(model, val, cfg, torch.device('cpu'), rank, world)
    if rank == 0:
        torch.save(metrics, result_path)
    dist.destroy_process_group()


def test_validation_in_two_processes_scores_rank_zeros_network(synth_set, tmp_path, free_port):
    """Sharded validation (3 images: 2 on rank 0, 1 on rank 1) equals one process's validation of rank 0's network
    (the one the checkpoint saves), even where rank 1's BatchNorm statistics differ."""
    import torch.multiprocessing as mp
    cfg, _ = apply_preset(small_config(synth_set, tmp_path), finetune.PRESETS, has_gpu=False)
    mp.spawn(_validate_worker, args=(2, free_port, cfg, str(tmp_path / 'm.pt')), nprocs=2)
    model = _reading_network(cfg)
    _, val = finetune.make_datasets(cfg)
    one = finetune.validate(model, val, cfg, torch.device('cpu'))
    two = torch.load(tmp_path / 'm.pt', weights_only=True)
    assert len(val) == 3 and two == pytest.approx(one, rel=1e-6)


def test_head_width_sets_the_deconv_pyramid(mano):
    """--head_width w: deconvolution levels of w, w/2, w/4 channels; a config without the field (a checkpoint
    written before it existed) rebuilds PyMAF's 256/128/64."""
    cfg = dict(arch='vit_tiny', depth=1, img_size=32, patch_size=8, n_iter=3)
    channels = lambda m: [block[0].out_channels for block in m.deconv]
    assert channels(build_regressor(dict(cfg, head_width=64), mano)) == [64, 32, 16]
    assert channels(build_regressor(cfg, mano)) == [256, 128, 64]
    model = build_regressor(dict(cfg, head_width=32), mano)
    assert [o['vertices'].shape for o in model(torch.zeros(2, 3, 32, 32))] == [(2, mano.num_verts, 3)] * 3


def test_cli_bad_input_exits_with_a_message(synth_set, tmp_path, capsys):
    out = tmp_path / 'run'
    assert finetune.main(['--data', str(tmp_path / 'nowhere'), '--output_dir', str(out)]) == 2
    assert 'missing' in capsys.readouterr().err and not out.exists()  # nothing written on failure
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    for flag in ('--pretrained', '--resume'):
        code = finetune.main(['--data', str(synth_set), '--img_size', str(S), '--batch_size', '4',
                              '--output_dir', str(out), flag, str(bad)])
        assert code == 2 and 'bad.pth' in capsys.readouterr().err and not out.exists()
    code = finetune.main(['--data', str(synth_set), '--img_size', str(S), '--batch_size', '4', '--output_dir', str(out),
                          '--keep_regressor'])
    assert code == 2 and '--keep_regressor needs --pretrained' in capsys.readouterr().err and not out.exists()


def test_quickstart_smoke(tmp_path):  # five processes that each import torch: ~15 s on 2 idle cores
    """scripts/quickstart.sh end to end with two steps per stage: every stage hands the next what it needs
    (128 px images, read by both trainers with 16-px patches), and the official submission of the evaluation
    split scores to finite numbers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OUT=str(tmp_path / 'qs'), SMOKE='1', PYTHON=sys.executable, OMP_NUM_THREADS='1')
    run = subprocess.run(['bash', os.path.join(root, 'scripts', 'quickstart.sh')], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    for name in ('submission', 'mean_hand'):
        with open(tmp_path / 'qs' / name / 'scores.json') as f:
            scores = json.load(f)
        assert scores['num_samples'] == 1 and 0 < scores['metrics']['pa_mpvpe'] < 0.1
    with Image.open(next((tmp_path / 'qs' / 'hands' / 'training' / 'rgb').iterdir())) as image:
        assert image.size == (128, 128)
    for stage in ('pretrain', 'finetune'):
        with open(tmp_path / 'qs' / stage / 'config.json') as f:
            config = json.load(f)
        assert (config['img_size'], config['patch_size']) == (128, 16), stage


def test_heatmap_targets_peak_on_their_joints():
    """The auxiliary heat-map target of each joint is a normalized Gaussian whose argmax is the map pixel of the
    joint (crop pixel u -> map pixel (u + 1/2) w / S - 1/2, centres at integers)."""
    from finetune import heatmap_targets
    g = torch.Generator().manual_seed(0)
    joints2d = torch.rand(3, 21, 2, generator=g) * (S - 1)                        # crop pixels
    for side in (16, 32, 64):
        uv = (joints2d + 0.5) * side / S - 0.5
        t = heatmap_targets(uv, (side, side), sigma=side / 32)                     # (3, 21, side, side)
        assert torch.allclose(t.sum((-2, -1)), torch.ones(3, 21))
        peak = t.flatten(2).argmax(-1)                                             # (3, 21)
        rows, cols = peak // side, peak % side
        assert (rows == uv[..., 1].round().long()).all() and (cols == uv[..., 0].round().long()).all()


def test_heatmap_loss_is_zero_at_the_target_and_ignores_joints_outside(mano):
    from finetune import heatmap_loss, heatmap_targets
    joints2d = torch.tensor([[[10.0, 20.0], [40.0, 50.0], [-30.0, 5.0]]])            # the third is outside
    side = 32
    target = heatmap_targets((joints2d + 0.5) * side / S - 0.5, (side, side), side / 32)
    kl, has = heatmap_loss(target.clamp(min=1e-12).log(), joints2d, S)
    assert has.all() and kl.abs().max() < 1e-4
    flat = torch.zeros(1, 3, side, side)
    kl_flat, _ = heatmap_loss(flat, joints2d, S)
    kl_two, _ = heatmap_loss(flat[:, :2], joints2d[:, :2], S)
    assert kl_flat.item() > 1 and torch.allclose(kl_flat, kl_two)                 # the outside joint counts 0
    # In the model and the losses: a heat-map head on the finest level when its weight is set.
    model = build_regressor(dict(arch='vit_tiny', depth=1, img_size=S, patch_size=8, n_iter=3, head_width=32,
                                 w_heatmap=1.0), mano)
    batch = make_labels(mano, 2)
    outputs = model(batch['image'])
    assert outputs[-1]['heatmaps'].shape == (2, 21, S, S) and 'heatmaps' not in outputs[0]
    total, terms = mesh_losses(outputs, batch, dict(WEIGHTS, heatmap=1.0))
    without, _ = mesh_losses(outputs, batch, WEIGHTS)
    assert terms['heatmap'] > 1 and torch.isclose(total - without, torch.tensor(terms['heatmap']), rtol=1e-4)


def _what_it_reads():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import what_it_reads
    return what_it_reads


def test_what_it_reads_measures_against_independent_computations():
    """scripts/what_it_reads.py: PCA coordinates recover the coefficients that made a pose (orthonormal axes or
    not), the heat-map argmax inverts heatmap_loss's target placement, correlations are numpy's."""
    w = _what_it_reads()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(45, generator=g, dtype=torch.float64)
    axes = torch.linalg.qr(torch.randn(45, 6, generator=g, dtype=torch.float64)).Q.T          # (6, 45) orthonormal
    coeffs = torch.randn(20, 6, generator=g, dtype=torch.float64)
    for components in (axes, axes * torch.linspace(0.5, 2, 6, dtype=torch.float64)[:, None]):
        fingers = mean + coeffs @ components
        assert torch.allclose(w.pca_coefficients(fingers, mean, components), coeffs, atol=1e-9)
    from finetune import heatmap_targets
    joints2d = torch.rand(3, 21, 2, generator=g) * (S - 1)                                   # crop pixels
    for side in (32, 64):
        target = heatmap_targets((joints2d + 0.5) * side / S - 0.5, (side, side), sigma=side / 32)
        peak = w.heatmap_argmax(target.log(), S)                                              # (3, 21, 2) px
        assert (peak - joints2d).abs().max() <= 0.5 * S / side + 1e-4
    a, b = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    b[:, 0] = 2 * a[:, 0] + 1                                                                # perfectly read
    expected = [np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(3)]
    assert np.allclose(w.correlation(a, b).numpy(), expected) and abs(expected[0] - 1) < 1e-12


def test_what_it_reads_runs_on_a_finetune_output(synth_set, tmp_path):
    w = _what_it_reads()
    assert finetune.train(small_config(synth_set, tmp_path / 'ft', epochs=1, w_heatmap=1.0)) == 0
    r = w.what_it_reads(w.ReadsConfig(run=str(tmp_path / 'ft'), n=3, axes=6))
    assert len(r['axes']) == 6 and all(-1 <= a['corr'] <= 1 and a['true_std'] > 0 for a in r['axes'])
    assert 0 < r['j2d_l1'] < 2 and 0 < r['heatmap_l1'] < 2 and 0 < r['mean_j2d_l1'] < 2
    assert w.run_cli(w.ReadsConfig, w.report, [str(tmp_path / 'missing')]) == 2                # a clear error
