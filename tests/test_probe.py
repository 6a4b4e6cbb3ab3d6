"""Tests of scripts/probe.py: the ridge against an independent solution, the probe on features that do and do not
carry the target, and a run over a tiny synthetic set with each kind of backbone row (random, backbone.pth,
fine-tuned best.pth, pretraining checkpoint.pth)."""
import os
import sys
from dataclasses import asdict

import numpy as np
import torch

from conftest import make_synthetic_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import probe  # noqa: E402
from data import resolve_mano  # noqa: E402
from finetune import PRESETS, FinetuneConfig  # noqa: E402
from model import build_regressor  # noqa: E402
from engine import apply_preset, config_from_cli, run_cli  # noqa: E402


def test_ridge_matches_the_primal_solution_with_intercept():
    rng = np.random.default_rng(0)
    for n, f in ((30, 80), (60, 10)):  # fewer samples than features and the other way round
        X, Y, X_new = rng.normal(size=(n, f)) + 3, rng.normal(size=(n, 2)), rng.normal(size=(7, f))
        lam = 0.7
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(f), Xc.T @ Yc)               # (f, 2)
        expected = (X_new - X.mean(0)) @ W + Y.mean(0)
        got = probe.ridge(torch.from_numpy(X), torch.from_numpy(X_new))(torch.from_numpy(Y), lam)
        assert np.allclose(got.numpy(), expected, atol=1e-9)


def test_probe_reads_a_target_that_is_in_the_features_and_not_one_that_is_not():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(600, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(600, 300, generator=g, dtype=torch.float64)
    carried = noise.clone()
    carried[:, :5] += 3 * target * torch.randn(1, 5, generator=g, dtype=torch.float64)   # over 5 features
    (pred, _), = probe.probe(carried, [target], 300, 100)
    assert probe.corr(pred[:, 0], target[400:, 0]) > 0.9
    (pred, _), = probe.probe(noise, [target], 300, 100)
    assert probe.r2(pred, target[400:]) < 0.05        # the chosen ridge keeps the noise from being fitted
    a = torch.randn(50, generator=g, dtype=torch.float64)
    assert abs(probe.corr(a, 3 * a - 1) - 1) < 1e-12 and abs(probe.r2(a[:, None], a[:, None]) - 1) < 1e-12


def test_probe_runs_on_every_kind_of_row(tmp_path):
    data = make_synthetic_set(tmp_path, 24, n_eval=1, img_size=32)
    torch.manual_seed(1)
    config, _ = apply_preset(FinetuneConfig(data=data, preset='tiny', img_size=32, patch_size=8, depth=1,
                                            mano='synthetic'), PRESETS, has_gpu=False)
    config = asdict(config)
    model = build_regressor(config, resolve_mano('synthetic'))
    torch.save(model.vit.state_dict(), tmp_path / 'backbone.pth')
    torch.save(dict(config=config, model=model.state_dict()), tmp_path / 'best.pth')     # as finetune.py writes it
    student = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.vit.state_dict().items()}
    torch.save(dict(config=dict(arch='vit_tiny'), model=student, teacher=model.vit.state_dict(), epoch=1),
               tmp_path / 'checkpoint.pth')                                          # as pretrain.py writes it
    argv = [data, 'random', str(tmp_path / 'backbone.pth'), str(tmp_path / 'best.pth'),
            str(tmp_path / 'checkpoint.pth'), '--n_fit', '12', '--n_choose', '4', '--n_test', '6', '--start', '2',
            '--depth', '1', '--img_size', '32']
    cfg = config_from_cli(probe.ProbeConfig, argv)
    assert cfg.backbones == tuple(argv[1:5])
    rows = probe.probe_backbones(cfg)
    assert [r['backbone'] for r in rows] == list(cfg.backbones)
    assert all(-1 <= r['closure_corr'] <= 1 and r['joints2d_r2'] <= 1 for r in rows)
    assert rows[1]['closure_corr'] == rows[2]['closure_corr'] == rows[3]['closure_corr']  # one ViT, saved 3 ways
    assert rows[1]['attention_px'] == rows[2]['attention_px'] == rows[3]['attention_px'] != rows[0]['attention_px']
    assert all(len(r['attention_px']) == 1 and 0 < r['attention_px'][0] < 32 for r in rows)
    assert rows[0]['closure_corr'] != rows[1]['closure_corr']
    assert run_cli(probe.ProbeConfig, probe.probe_backbones, argv[:3] + ['--depth', '2', '--img_size', '32']) == 2
    assert run_cli(probe.ProbeConfig, probe.probe_backbones, argv[:2] + ['--n_fit', '100', '--img_size', '32']) == 2


def test_attention_distance_against_a_loop_and_two_exact_cases():
    g = torch.Generator().manual_seed(0)
    h, w, p, T = 3, 4, 8, 13
    attn = torch.rand(2, 2, T, T, generator=g).softmax(-1)
    expected = torch.zeros(2)
    for b in range(2):
        for head in range(2):
            for qi in range(T - 1):
                weights = attn[b, head, 1 + qi, 1:] / attn[b, head, 1 + qi, 1:].sum()
                expected[head] += sum(weights[ki] * p * np.hypot(qi % w - ki % w, qi // w - ki // w)
                                      for ki in range(T - 1)) / (2 * (T - 1))
    assert torch.allclose(probe.attention_distance(attn, (h, w), p).float(), expected, atol=1e-5)
    eye = torch.eye(T)[None, None]
    assert float(probe.attention_distance(eye, (h, w), p)[0]) == 0                # each patch on itself
    right = torch.zeros(1, 1, T, T)
    for qi in range(T - 1):   # each patch on its right neighbour, the last column on its left one
        right[0, 0, 1 + qi, 1 + (qi + 1 if qi % w < w - 1 else qi - 1)] = 1
    right[0, 0, 0, 0] = 1
    assert abs(float(probe.attention_distance(right, (h, w), p)[0]) - p) < 1e-12


def test_attention_maps_are_the_ones_the_blocks_apply():
    torch.manual_seed(0)
    vit = probe.M.ARCHS['vit_tiny'](img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(3, 3, 32, 32)
    outputs, qkvs = [], []   # block 2's qkv and the fused kernel's output (heads concatenated: attn @ v)
    hooks = [vit.blocks[1].attn.qkv.register_forward_hook(lambda m, i, out: qkvs.append(out)),
             vit.blocks[1].attn.proj.register_forward_hook(lambda m, i, out: outputs.append(i[0]))]
    maps = probe.attention_maps(vit, x)   # one forward pass serves the probe's hooks and these
    for hook in hooks:
        hook.remove()
    assert len(maps) == 2 and maps[1].shape == (3, 3, 17, 17)
    assert torch.allclose(maps[1].sum(-1), torch.ones(3, 3, 17))
    B, T, D = outputs[0].shape
    v = qkvs[0].reshape(B, T, 3, vit.num_heads, -1)[:, :, 2].transpose(1, 2)      # (B, H, T, d)
    assert torch.allclose((maps[1] @ v).transpose(1, 2).reshape(B, T, D), outputs[0], atol=1e-5)
    assert not torch.allclose(maps[0], maps[1])
