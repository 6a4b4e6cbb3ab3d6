"""Many epochs of MAE pretraining on a CPU: does masked-image pretraining help the fine-tuning once it sees the
unlabeled pool tens of times instead of pretrain.py's 2-10?

MAE (He et al., 2022): the encoder reads only the visible 25% of the patches (no mask tokens), a light decoder
fills in mask tokens and predicts the masked patches' normalised pixels (norm_pix loss). With a quarter of the
encoder's tokens and no teacher it trains at about 215 images/s on 2 cores against pretrain.py's 28, so the
8000-image pool is seen 100 times in about an hour. The encoder is model.py's ViT, so the backbone.pth it writes
loads into `finetune.py --pretrained` like pretrain.py's. Views: a random square of 40-100% of the image's area,
rotated by up to 30 degrees (pretrain.py's global views without the photometric jitter, as MAE). A baseline for
the ablation (docs/results.md), not a stage of the project.

Run:  python scripts/mae_long.py --data runs/ablation_128/hands/training/rgb --output_dir runs/mae_long/e100 \
          --img_size 128 --patch_size 16 --epochs 100
Outputs: log.jsonl (loss per epoch), backbone.pth (the encoder's ViT state dict), done.json (config, time).
Shapes (README legend): B batch, S image side, N = h*w patches, D encoder width; here also K kept (visible)
patches and E decoder width.
"""
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from data import find_images, load_rgb, normalize  # noqa: E402
from engine import cosine_schedule, log_jsonl, option, param_groups, run_cli, save_checkpoint, write_atomic  # noqa: E402
from pretrain import pixel_loss  # noqa: E402


class MAE(nn.Module):
    """A model.py ViT as MAE's encoder (visible patches only) plus MAE's decoder (Blocks of width E)."""

    def __init__(self, vit, dec_dim=128, dec_depth=2, dec_heads=4):
        super().__init__()
        self.vit, p = vit, vit.patch_size
        self.embed = nn.Linear(vit.embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer('dec_pos', M.sincos_pos_embed(dec_dim, vit.grid)[:, 1:])  # (1, N, E), fixed (MAE)
        self.blocks = nn.ModuleList(M.Block(dec_dim, dec_heads) for _ in range(dec_depth))
        self.norm, self.pred = nn.LayerNorm(dec_dim, eps=1e-6), nn.Linear(dec_dim, p * p * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images, mask_ratio=0.75):
        """images (B, 3, S, S) -> (predicted patches (B, N, p*p*3), mask (B, N) bool, True = masked)."""
        vit = self.vit
        x = vit.patch_embed(images).flatten(2).transpose(1, 2)               # (B, N, D)
        B, N, D = x.shape
        pos = M.interpolate_pos_embed(vit.pos_embed, vit.grid)                # (1, 1+N, D)
        x = x + pos[:, 1:]
        n_keep = max(1, round(N * (1 - mask_ratio)))
        order = torch.rand(B, N, device=x.device).argsort(1)                 # (B, N) random per image (MAE)
        keep = order[:, :n_keep]                                             # (B, K)
        x = x.gather(1, keep[..., None].expand(-1, -1, D))                   # (B, K, D)
        x = torch.cat([(vit.cls_token + pos[:, :1]).expand(B, -1, -1), x], 1)  # (B, 1+K, D)
        for block in vit.blocks:
            x = block(x)
        x = self.embed(vit.norm(x))[:, 1:]                                   # (B, K, E)
        full = self.mask_token.expand(B, N, -1).clone()                      # (B, N, E)
        full.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)
        y = full + self.dec_pos                                              # (B, N, E)
        for block in self.blocks:
            y = block(y)
        mask = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
        return self.pred(self.norm(y)), mask                                 # (B, N, p*p*3), (B, N)


def load_pool(folder, img_size):
    """Every image under `folder` (data.py's search and decoding), resized to img_size: uint8 (n, 3, S, S), held
    in memory. Files that do not decode are skipped and counted."""
    paths = find_images(folder)   # raises where there are none
    out, n, bad = torch.empty(len(paths), 3, img_size, img_size, dtype=torch.uint8), 0, 0
    for path in tqdm(paths, desc='loading', leave=False):
        img = load_rgb(path)
        if img is None:
            bad += 1
            continue
        out[n] = torch.from_numpy(np.array(img.resize((img_size, img_size), Image.BICUBIC))).permute(2, 0, 1)
        n += 1
    if bad:
        print(f'skipped {bad} of {len(paths)} files that do not decode as images')
    if not n:
        raise ValueError(f'no image under {folder!r} decodes')
    return out[:n]


def random_views(images, scale=(0.4, 1.0), rotation=30.0, generator=None):
    """uint8 (B, 3, S, S) -> normalised float views (B, 3, S, S): a random square of `scale` of the area around a
    random centre that keeps it inside the image, rotated by U(-rotation, rotation) degrees (bilinear)."""
    B = images.shape[0]
    u = torch.rand(B, 4, generator=generator)
    side = (scale[0] + (scale[1] - scale[0]) * u[:, 0]).sqrt()                # fraction of the side
    centre = (u[:, 1:3] * 2 - 1) * (1 - side[:, None])                       # (B, 2), in [-1, 1] units
    angle = torch.deg2rad((u[:, 3] * 2 - 1) * rotation)
    c, s = angle.cos() * side, angle.sin() * side
    theta = torch.stack([torch.stack([c, -s, centre[:, 0]], 1), torch.stack([s, c, centre[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return normalize(F.grid_sample(images.float() / 255, grid, mode='bilinear', padding_mode='border',
                                   align_corners=False))


@dataclasses.dataclass
class Config:
    """MAE pretraining of model.py's ViT on a folder of unlabeled images; writes a backbone.pth for finetune.py."""
    data: str = option('', 'folder of unlabeled images (e.g. a FreiHAND-layout training/rgb)')
    output_dir: str = option('runs/mae_long/e100', 'where log.jsonl, backbone.pth and done.json go')
    arch: str = option('vit_tiny', 'encoder ViT', choices=list(M.ARCHS))
    depth: int = option(6, 'encoder blocks')
    img_size: int = option(128, 'image side in pixels')
    patch_size: int = option(16, 'patch side in pixels')
    epochs: int = option(100, 'passes over the pool')
    batch_size: int = option(128, 'images per step')
    blr: float = option(1e-3, 'base lr: lr = blr * batch_size / 256 (MAE scaling)')
    warmup_epochs: int = option(5, 'linear lr warm-up epochs')
    weight_decay: float = option(0.05, "AdamW weight decay (MAE's)")
    mask_ratio: float = option(0.75, "fraction of patches masked (MAE's)")
    threads: int = option(0, 'torch threads (0: the default)')
    seed: int = option(0, 'seed of the model, views and masks')


def train(cfg):
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.output_dir, exist_ok=True)
    log = os.path.join(cfg.output_dir, 'log.jsonl')
    write_atomic(log, '')   # a run again into its folder logs afresh
    pool = load_pool(cfg.data, cfg.img_size)
    vit = M.ARCHS[cfg.arch](img_size=cfg.img_size, patch_size=cfg.patch_size, depth=cfg.depth)
    mae = MAE(vit)
    lr = cfg.blr * cfg.batch_size / 256
    opt = torch.optim.AdamW(param_groups(mae, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
    per_epoch = len(pool) // cfg.batch_size
    total = cfg.epochs * per_epoch
    g, step, t0 = torch.Generator().manual_seed(cfg.seed), 0, time.time()
    print(f'MAE: {len(pool)} images, {per_epoch} steps an epoch, {total} steps, lr {lr:.2e}')
    for epoch in range(cfg.epochs):
        order, losses = torch.randperm(len(pool), generator=g), []
        for i in tqdm(range(per_epoch), desc=f'epoch {epoch + 1}/{cfg.epochs}', leave=False):
            for group in opt.param_groups:
                group['lr'] = cosine_schedule(step, total, lr, 0.0, cfg.warmup_epochs * per_epoch)
            images = random_views(pool[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]], generator=g)
            pred, mask = mae(images, cfg.mask_ratio)
            loss = pixel_loss(pred, images, mask, cfg.patch_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        record = dict(epoch=epoch + 1, step=step, loss=sum(losses) / len(losses), minutes=(time.time() - t0) / 60)
        log_jsonl(log, record)
        print(f"epoch {epoch + 1}: masked-pixel loss {record['loss']:.4f}, {record['minutes']:.1f} min", flush=True)
    save_checkpoint(vit.state_dict(), os.path.join(cfg.output_dir, 'backbone.pth'))   # as pretrain.py's
    write_atomic(os.path.join(cfg.output_dir, 'done.json'), json.dumps(dict(
        config=dataclasses.asdict(cfg), steps=step, minutes=round((time.time() - t0) / 60, 2), loss=record['loss'])))


def main(argv=None):
    return run_cli(Config, train, argv)


if __name__ == '__main__':
    sys.exit(main())
