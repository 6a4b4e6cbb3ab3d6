"""Tests of scripts/mae_long.py: the encoder reads the visible patches only, the views against a direct crop, and a
short run that fits its images and writes a backbone.pth that finetune.py loads whole."""
import json
import os
import sys

import torch

from conftest import make_synthetic_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import mae_long  # noqa: E402
import model as M  # noqa: E402
from data import normalize  # noqa: E402
from finetune import load_pretrained  # noqa: E402
from pretrain import patchify  # noqa: E402


def tiny_mae():
    return mae_long.MAE(M.vit_tiny(img_size=32, patch_size=8, depth=2), dec_dim=32, dec_depth=1).eval()


def test_encoder_never_sees_the_masked_patches():
    mae, x = tiny_mae(), torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    pred, mask = mae(x)                                                   # (B, N, p*p*3), (B, N)
    assert mask.sum(1).tolist() == [12, 12]                               # 75% of 16 patches
    noise = torch.randn(2, 16, 1, 1, 1) * mask.view(2, 16, 1, 1, 1)     # (B, N, 1, 1, 1) on masked patches only
    grid = x.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 3, 8, 8)  # (B, N, 3, p, p)
    changed = (grid + noise).reshape(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
    assert not torch.equal(patchify(changed, 8), patchify(x, 8))
    torch.manual_seed(1)
    assert torch.allclose(mae(changed)[0], pred, atol=1e-6)              # the same masks, the same prediction
    visible = grid + torch.randn(2, 16, 1, 1, 1) * ~mask.view(2, 16, 1, 1, 1)
    torch.manual_seed(1)
    other = mae(visible.reshape(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32))[0]
    assert (other - pred).abs().max() > 1e-3                              # a visible patch does change it


def test_whole_upright_view_is_the_normalised_image_and_a_half_crop_is_its_centre():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    whole = mae_long.random_views(images, scale=(1.0, 1.0), rotation=0.0)
    assert torch.allclose(whole, normalize(images.float() / 255), atol=1e-5)
    # a quarter of the area is half the side; the centre may move, but the crop stays inside the image
    crop = mae_long.random_views(images, scale=(0.25, 0.25), rotation=0.0, generator=torch.Generator().manual_seed(0))
    lo, hi = normalize(torch.zeros(1, 3, 1, 1)), normalize(torch.ones(1, 3, 1, 1))
    assert crop.shape == whole.shape and ((crop >= lo - 1e-5) & (crop <= hi + 1e-5)).all()


def test_pool_skips_and_counts_files_that_do_not_decode(tmp_path, capsys):
    from PIL import Image
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        Image.new('RGB', (20, 10), colour).save(tmp_path / f'{i}.png')
    (tmp_path / '2.jpg').write_bytes(b'not an image')
    pool = mae_long.load_pool(str(tmp_path), 8)                          # (n, 3, S, S) uint8
    assert pool.shape == (2, 3, 8, 8) and pool.dtype == torch.uint8
    assert pool[0, 0].eq(255).all() and pool[1, 2].eq(255).all() and pool[:, 1].eq(0).all()
    assert 'skipped 1 of 3' in capsys.readouterr().out


def test_short_run_fits_its_images_and_writes_a_backbone_finetune_loads_whole(tmp_path):
    data = make_synthetic_set(tmp_path, 8, n_eval=1, img_size=32)
    out = tmp_path / 'mae'
    args = ['--data', os.path.join(data, 'training', 'rgb'), '--output_dir', str(out), '--img_size', '32',
            '--patch_size', '8', '--depth', '2', '--epochs', '40', '--batch_size', '8', '--blr', '0.02',
            '--warmup_epochs', '2', '--mask_ratio', '0.5']
    assert mae_long.main(args) == 0
    losses = [json.loads(line)['loss'] for line in open(out / 'log.jsonl')]
    # each patch's target has mean 0 and (unbiased) variance 1, so predicting zeros scores (P - 1) / P = 0.995
    # (P = 8 * 8 * 3 values); the fresh decoder starts above 1.2. Fresh views and masks every step: no exact fit.
    assert len(losses) == 40 and losses[0] > 1.2 and sum(losses[-5:]) / 5 < 0.93, losses
    vit = M.vit_tiny(img_size=32, patch_size=8, depth=2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    loaded, missing, unexpected = load_pretrained(vit, str(out / 'backbone.pth'))
    assert not missing and not unexpected and len(loaded) == len(before)
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, before['blocks.0.attn.qkv.weight'])
    assert json.load(open(out / 'done.json'))['steps'] == 40
    assert mae_long.main(args + ['--epochs', '1']) == 0   # again into the same folder (the last flag wins)
    assert len(open(out / 'log.jsonl').readlines()) == 1
