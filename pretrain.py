"""HandMIM self-supervised pretraining of a plain ViT on unlabeled hand images.

HandMIM (Liu et al., arXiv 2307.16061) trains a student ViT against an EMA teacher with losses at
three granularities:
  L_cls, L_pka  [CLS] token: DINO/iBOT cross-view distillation, plus pseudo keypoint alignment: the
                teacher's last-layer [CLS]->patch attention peaks (soft-argmax, one per head) of one view,
                carried into the other view with the known augmentation affines A_i A_j^-1, are regressed
                from the student's [CLS] token, which makes it pose-aware;
  L_mim         patch tokens: iBOT masked-image-modeling self-distillation on the masked patches;
  L_pix         pixels: MAE norm_pix reconstruction of the masked patches (SimMIM-style linear head).
The paper's full text is not available: PKA's exact form and the loss weights (1 each) are our design on the
public recipes (iBOT main_ibot.py, DINO, MAE; README). The EMA momentum scales with the run (`teacher_momentum`).

Run:   python pretrain.py --data ./hands                        (CPU: the 'tiny' preset, announced)
       python pretrain.py --data DIR --preset base --amp bf16   (one GPU, paper scale)
       torchrun --nproc_per_node=2 pretrain.py --data DIR       (DDP; gloo on CPU, NCCL on GPU)
       python pretrain.py --help                                (every flag, e.g. --w_pka 0 for an ablation)
Outputs in --output_dir: config.json, log.jsonl, curves.png, checkpoint.pth (each epoch and on Ctrl-C),
backbone.pth at the end (the TEACHER's ViT under the standard MAE/DINO/timm key names). Exit codes: 0 done,
130 stopped (checkpoint saved; --resume continues exactly), 2 bad input, 1 loss NaN/inf too often.

Shapes (README legend): B batch, S view side, N = h*w patches, D width, H heads (= pseudo keypoints), C head
output dim (out_dim); the global views of a batch are stacked as (2B, ...), its L local views as (LB, ...).
"""
import copy
import dataclasses
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import model as M
from data import ImageFolder, PretrainAugment
from engine import (KeyedSamples, NonFiniteGuard, Progress, apply_preset, autocast, backward_step,
                    check_same_architecture, cosine_schedule, load_checkpoint, make_scaler, option, param_groups,
                    prepare_output_dir, print0, run_cli, save_checkpoint, setup_distributed, teardown_distributed,
                    train_loop)
from plot import draw_curves


# -------- HandMIM components: masking, EMA teacher, losses, pseudo keypoints
def block_mask(h, w, ratio, rng, min_aspect=0.3):
    """iBOT/BEiT block-wise mask over an h x w patch grid -> bool (h, w), True = masked. Rectangles of random
    area (>= (min(h, w) // 3)^2 patches) and aspect ratio in [min_aspect, 1/min_aspect] are added until
    ratio*h*w are masked, each kept only if it adds 1..remaining new patches (`rng`: random.Random)."""
    mask, count = torch.zeros(h, w, dtype=torch.bool), 0
    target, min_area = ratio * h * w, (min(h, w) // 3) ** 2
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    while count < target:
        remaining, added = target - count, 0
        for _ in range(10):   # up to 10 placement attempts per block, as BEiT
            area, aspect = rng.uniform(min_area, remaining), math.exp(rng.uniform(*log_ar))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if bh >= h or bw >= w:
                continue
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
            if 0 < new <= remaining:
                mask[top:top + bh, left:left + bw] = True
                added = new
                break
        if added == 0:   # no block fits any more
            break
        count += added
    return mask


def teacher_momentum(total_steps, base=0.996, horizon=10.0):
    """The EMA momentum at the start of a run of `total_steps`: iBOT's `base`, or lower for a short run. With m
    rising from m0 to 1 along a cosine, the teacher keeps exp(-(1 - m0) T / 2) of its initialisation: with
    0.996 nothing after T ~ 10^5 steps, but 61% after T = 250. So 1 - m0 >= `horizon` / T, which keeps under
    exp(-horizon / 2) < 1%; runs of horizon / (1 - base) = 2500 steps or more use iBOT's value unchanged."""
    return min(base, max(0.0, 1.0 - horizon / max(total_steps, 1)))   # runs under `horizon` steps: 0 (a copy)


def make_teacher(student):
    """The EMA teacher: a deep copy of the student that never receives gradients."""
    return copy.deepcopy(student).requires_grad_(False).eval()   # eval: no drop path (iBOT: drop_path 0)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_t <- m theta_t + (1 - m) theta_s in place over the teacher's parameters, matched by name
    (the student-only pixel and PKA heads are ignored). Parameters only, as DINO/iBOT: no buffers."""
    student_params = dict(student.named_parameters())
    names, t_params = zip(*teacher.named_parameters())
    torch._foreach_lerp_(list(t_params), [student_params[n].detach() for n in names], 1.0 - momentum)


class Centre(nn.Module):
    """The teacher-output centre c of DINO/iBOT (EMA over the global batch); centring and sharpening (a low
    teacher temperature) together prevent collapse."""

    def __init__(self, dim, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer('value', torch.zeros(dim))

    def probs(self, teacher_logits, temp):
        """Teacher targets softmax((g_t - c) / tau_t), (..., C)."""
        return F.softmax((teacher_logits.float() - self.value) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits):
        """c <- m c + (1 - m) mean(g_t) over every row of every rank (sum all-reduced / global count)."""
        x = teacher_logits.detach().float().reshape(-1, self.value.numel())   # (rows, C)
        total = torch.cat([x.sum(0), x.new_tensor([x.shape[0]])])
        if dist.is_initialized():
            dist.all_reduce(total)
        self.value.lerp_(total[:-1] / total[-1], 1.0 - self.momentum)


def soft_cross_entropy(teacher_probs, student_logits, student_temp=0.1):
    """-sum_k P_t,k log softmax(g_s / tau_s)_k over the last dim, (...)."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def cls_loss(student_cls, teacher_probs, student_temp=0.1):
    """DINO/iBOT cross-view [CLS] loss: mean over pairs (teacher view q, student view v), v != q.
    student_cls: list of (B, C) logits, globals first; teacher_probs: list of (B, C) targets of the globals."""
    terms = [soft_cross_entropy(t, s, student_temp).mean()
             for q, t in enumerate(teacher_probs) for v, s in enumerate(student_cls) if v != q]
    return sum(terms) / len(terms)


def mim_loss(student_patch, teacher_probs, masks, student_temp=0.1):
    """iBOT patch loss: same view, teacher unmasked vs student masked, on masked patches only; normalised
    per image by its mask count, then averaged over the batch (an image without a mask counts as 0, as
    iBOT) and the views. student_patch, teacher_probs: lists of (B, N, C); masks: list of (B, N) bool."""
    terms = []
    for s, t, m in zip(student_patch, teacher_probs, masks):
        ce, m = soft_cross_entropy(t, s, student_temp), m.float()          # (B, N) each
        terms.append(((ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean())
    return sum(terms) / len(terms)


def patchify(images, patch_size):
    """(B, 3, S, S) -> (B, N, p*p*3) with each patch (p = patch_size) laid out (row, column, channel), as MAE."""
    (B, C, H, W), p = images.shape, patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)                         # (B, 3, h, p, w, p)
    return torch.einsum('bchpwq->bhwpqc', x).reshape(B, -1, p * p * C)   # (B, N, p*p*3)


def pixel_loss(pred, images, mask, patch_size):
    """MAE norm_pix loss: MSE to per-patch normalised pixels, averaged over all masked patches.
    pred (B, N, p*p*3), images (B, 3, S, S), mask (B, N) bool."""
    target = patchify(images.float(), patch_size)                          # (B, N, p*p*3)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)   # unbiased, as MAE
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch, m = ((pred.float() - target) ** 2).mean(-1), mask.float()     # (B, N) each
    return (per_patch * m).sum() / global_count(m.sum())


def global_count(count):
    """Normaliser of a loss averaged over the items of the global batch (masked patches, keypoints: counts vary by
    rank): under DDP, which averages W ranks' gradients, the all-reduced count / W, so W processes train as one."""
    if dist.is_initialized():
        dist.all_reduce(count := count.detach().clone())
    return count.clamp(min=1.0) / (dist.get_world_size() if dist.is_initialized() else 1)


def attention_keypoints(attn, grid):
    """Pseudo keypoints: soft-argmax of each head's [CLS]->patch attention map, attn (B, H, N) -> (B, H, 2)
    as (x, y) in [-1, 1], where patch column j is centred at (2j + 1) / w - 1 (align_corners=False)."""
    h, w = grid
    p = attn.float() / attn.float().sum(-1, keepdim=True).clamp(min=1e-12)   # the [CLS] share removed
    ys, xs = (torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=attn.device) for n in (h, w))   # patch centres
    centres = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), -1).reshape(h * w, 2)   # (N, 2) row-major
    return p @ centres                                                         # (B, H, 2)


def map_between_views(points, affine_from, size_from, affine_to, size_to):
    """Map normalised points (B, H, 2) of one view into another through the pixel map A_to A_from^-1. A view
    has a source->view pixel affine (B, 2, 3) and a side S; pixel centres sit at integer coordinates (data.py,
    OpenCV), so u = (x + 1) * S / 2 - 0.5 (grid_sample's align_corners=False)."""
    square = lambda A: torch.cat([A, A.new_tensor([[0.0, 0, 1]]).expand(len(A), 1, 3)], 1).double()   # (B, 3, 3)
    T = square(affine_to) @ torch.linalg.inv(square(affine_from))              # (B, 3, 3) pixel map
    px = (points.double() + 1) * size_from / 2 - 0.5                          # (B, H, 2) pixels
    px = px @ T[:, :2, :2].transpose(1, 2) + T[:, None, :2, 2]
    return ((px + 0.5) * 2 / size_to - 1).to(points.dtype)


def pka_loss(student_kp, teacher_kp, affines, sizes, n_teacher):
    """Pseudo keypoint alignment: L1 between the student's PKA-head keypoints of view i and the teacher's
    attention keypoints of every other global view j mapped into view i, where those land inside view i.
    student_kp: list of (B, H, 2) per view (globals first); teacher_kp: list of (B, H, 2) for the first
    `n_teacher` views; affines: list of (B, 2, 3) per view; sizes: list of view sides in pixels."""
    total, count = 0.0, 0.0   # become tensors at the first pair (there is always one)
    for j in range(n_teacher):
        for i, pred in enumerate(student_kp):
            if i == j:
                continue
            target = map_between_views(teacher_kp[j], affines[j], sizes[j], affines[i], sizes[i])
            inside = (target.abs() <= 1).all(-1, keepdim=True).float()       # (B, H, 1)
            total = total + ((pred.float() - target).abs() * inside).sum()
            count = count + 2 * inside.sum()
    return total / global_count(count)   # no host sync: fine under torch.compile and on GPUs


# -------- Configuration and presets
@dataclass
class PretrainConfig:
    """HandMIM self-supervised pretraining of a ViT on a folder of unlabeled hand images."""
    data: str = option('./hands', 'folder of hand images, searched recursively')
    max_images: int = option(0, 'pretrain on the first this many images of the folder (sorted paths); 0 = all')
    output_dir: str = option('./runs/pretrain', 'checkpoint.pth, log.jsonl, config.json and backbone.pth go here')
    preset: str = option('auto', 'tiny (CPU quick start) | base (paper scale) | auto: base with a GPU, else tiny',
                        choices=['auto', 'tiny', 'base'])
    # Architecture; None = the preset's value.
    arch: str = option(None, 'backbone', choices=['vit_tiny', 'vit_small', 'vit_base', 'vit_large'])
    depth: int = option(None, 'number of ViT blocks (overrides the arch default)')
    img_size: int = option(None, 'global view side in pixels')
    patch_size: int = option(None, 'ViT patch size')
    out_dim: int = option(None, 'projection head output dim C (iBOT: 8192)')
    head_hidden: int = option(None, 'projection head hidden width (iBOT: 2048)')
    drop_path: float = option(0.1, 'student stochastic depth (the teacher has none)')
    n_local: int = option(0, 'small local views per image (student [CLS] and PKA only; iBOT: 10)')
    local_size: int = option(None, 'local view side in pixels (default: 3/7 of img_size, as 96 for 224)')
    # Optimisation: iBOT's recipe.
    epochs: int = option(None, 'training epochs')
    batch_size: int = option(None, 'images per process and step')
    blr: float = option(None, 'base learning rate: lr = blr * global batch / 256 (iBOT: 5e-4)')
    min_lr: float = option(1e-6, 'final learning rate of the cosine schedule')
    warmup_epochs: int = option(None, 'linear learning-rate warm-up epochs')
    weight_decay: float = option(0.04, 'weight decay at the start (cosine schedule)')
    weight_decay_end: float = option(0.4, 'weight decay at the end')
    momentum_teacher: float = option(None, 'EMA momentum at the start, cosine to 1; default: teacher_momentum')
    clip_grad: float = option(3.0, 'per-parameter gradient-norm clip (iBOT); 0 = off')
    freeze_last_layer: int = option(1, "epochs with the projection head's last layer frozen (DINO)")
    student_temp: float = option(0.1, 'student softmax temperature')
    teacher_temp: float = option(0.07, 'teacher temperature after the warm-up (above 0.07 is unstable)')
    warmup_teacher_temp: float = option(0.04, 'teacher temperature at the start')
    warmup_teacher_temp_epochs: int = option(None, 'teacher temperature warm-up epochs')
    mask_ratio: float = option(0.3, 'mean block-mask ratio of the student global views')
    mask_ratio_var: float = option(0.2, 'each ratio is drawn uniformly in mask_ratio +- mask_ratio_var')
    w_cls: float = option(1.0, 'weight of the [CLS] distillation loss (0 = off)')
    w_pka: float = option(1.0, 'weight of the pseudo keypoint alignment loss (0 = off)')
    w_mim: float = option(1.0, 'weight of the patch MIM distillation loss (0 = off)')
    w_pix: float = option(1.0, 'weight of the masked-pixel reconstruction loss (0 = off)')
    # Engineering.
    device: str = option('auto', 'auto | cpu | cuda', choices=['auto', 'cpu', 'cuda'])
    amp: str = option('off', 'mixed precision (fp16 uses a GradScaler)', choices=['off', 'bf16', 'fp16'])
    compile: bool = option(False, 'torch.compile the student and the teacher')
    workers: int = option(2, 'data-loading worker processes per rank')
    seed: int = option(0, 'seed of the initialisation, data order, augmentations and masks')
    log_every: int = option(10, 'append a line to log.jsonl every this many steps')
    max_steps: int = option(0, 'stop, save and export after this many steps (schedules unchanged); 0 = all')
    max_non_finite: int = option(10, 'stop after this many non-finite losses in a row')
    resume: str = option('', 'checkpoint.pth to continue from')


# tiny: ViT-Tiny with 6 blocks instead of 12 and a narrow head, for a useful speed on a CPU; base: iBOT's ViT-B/16.
PRESETS = {
    'tiny': dict(arch='vit_tiny', depth=6, img_size=64, patch_size=8, out_dim=1024, head_hidden=512, epochs=5,
                 batch_size=32, blr=2e-3, warmup_epochs=1, warmup_teacher_temp_epochs=2),
    'base': dict(arch='vit_base', depth=12, img_size=224, patch_size=16, out_dim=8192, head_hidden=2048, epochs=100,
                 batch_size=64, blr=5e-4, warmup_epochs=10, warmup_teacher_temp_epochs=30),
}
# Fields that change the shapes of the weights: a checkpoint must match them to be resumed.
ARCH_FIELDS = ('arch', 'depth', 'img_size', 'patch_size', 'out_dim', 'head_hidden')


def resolve_preset(cfg, has_gpu):
    """Fill the fields left at None from the preset -> (new config, one-line note on the choice)."""
    cfg, note = apply_preset(cfg, PRESETS, has_gpu)
    if cfg.local_size is None:   # 3/7 of the global side in whole patches (96 for 224), at least one patch
        cfg = dataclasses.replace(cfg, local_size=max(cfg.patch_size, cfg.img_size * 3 // 7 // cfg.patch_size
                                                      * cfg.patch_size))
    if not any((cfg.w_cls, cfg.w_pka, cfg.w_mim, cfg.w_pix)):
        raise ValueError('all four loss weights (--w_cls --w_pka --w_mim --w_pix) are 0: nothing to train')
    return cfg, (f"{note} ({cfg.arch} depth {cfg.depth}, {cfg.img_size} px, patch {cfg.patch_size}, out_dim "
                 f"{cfg.out_dim}, batch {cfg.batch_size} per process, {cfg.epochs} epochs)")


# -------- Data: two global views (+ locals) with their affines, block masks
class MaskedViews(torch.utils.data.Dataset):
    """Wraps an image dataset whose transform returns dict(views, affines) and adds a block mask (N,) per
    global view, drawn from Python's `random` (seeded per sample by engine.KeyedSamples)."""

    def __init__(self, images, grid, mask_ratio, mask_ratio_var):
        self.images, self.grid = images, grid
        self.ratio_range = (max(0.0, mask_ratio - mask_ratio_var), min(1.0, mask_ratio + mask_ratio_var))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        sample = self.images[index]
        masks = [block_mask(*self.grid, random.uniform(*self.ratio_range), random).flatten() for _ in range(2)]
        return dict(views=sample['views'], affines=sample['affines'], masks=masks)   # masks: 2 x (N,)


def pretraining_images(root):
    """The image folder to pretrain on: of a FreiHAND-layout folder, training/rgb only (evaluation/ stays unseen)."""
    train_rgb = os.path.join(root, 'training', 'rgb')
    if os.path.isdir(train_rgb) and os.path.isdir(os.path.join(root, 'evaluation')):
        print0(f"{root} has the FreiHAND layout: pretraining on training/rgb only (evaluation/ stays unseen)")
        return train_rgb
    return root


# -------- Model: student (ViT + heads) and EMA teacher (ViT + projection head)
class Student(nn.Module):
    """ViT + iBOT projection head (shared by [CLS] and patches, as iBOT) + pixel head + PKA head, one forward for
    DDP. The projection head sees the patches only when `patch_logits` (the costly head); its logits go out whole:
    a compiled output that slices another crashes `--compile` on a warm cache in torch 2.13 (pytorch/pytorch#185630)."""

    def __init__(self, backbone, out_dim, head_hidden):
        super().__init__()
        self.backbone, D = backbone, backbone.embed_dim
        self.head = M.ProjectionHead(D, out_dim, hidden_dim=head_hidden)
        self.pixel_head = M.PixelHead(D, backbone.patch_size)
        self.pka_head = M.PKAHead(D, backbone.num_heads)   # H pseudo keypoints: one per attention head

    def forward(self, global_views, masks=None, local_views=None, patch_logits=True):
        tokens = self.backbone(global_views, mask=masks)                      # (2B, 1+N, D)
        logits = self.head(tokens if patch_logits else tokens[:, :1])         # (2B, 1+N or 1, C)
        out = dict(logits=logits, pix=self.pixel_head(tokens[:, 1:]),          # (2B, N, p*p*3)
                   kp=self.pka_head(tokens[:, 0]))                            # (2B, H, 2)
        if local_views is not None:   # locals: unmasked, [CLS] only (iBOT multi-crop)
            cls_local = self.backbone(local_views)[:, 0]                       # (LB, D)
            out.update(cls_local=self.head(cls_local), kp_local=self.pka_head(cls_local))
        return out


def build_models(cfg):
    """-> (student, teacher, centres). The teacher holds copies of the student's backbone and head."""
    vit = getattr(M, cfg.arch)(img_size=cfg.img_size, patch_size=cfg.patch_size, depth=cfg.depth,
                               drop_path=cfg.drop_path)
    student = Student(vit, cfg.out_dim, cfg.head_hidden)
    teacher = make_teacher(nn.ModuleDict(dict(backbone=student.backbone, head=student.head)))
    centres = nn.ModuleDict(dict(cls=Centre(cfg.out_dim), patch=Centre(cfg.out_dim)))
    return student, teacher, centres


def handmim_losses(student, teacher, centres, batch, cfg, teacher_temp, grid):
    """One HandMIM forward -> (weighted total, {name: loss}, {name: diagnostic}, teacher logits). batch:
    dict(views=[(B, 3, S, S) per view], affines=[(B, 2, 3) per view], masks=[2 x (B, N)]), globals first."""
    n_local = len(batch['views']) - 2
    g_views = torch.cat(batch['views'][:2])                                    # (2B, 3, S, S)
    masks = torch.cat(batch['masks'])                                          # (2B, N)
    locals_ = torch.cat(batch['views'][2:]) if n_local else None               # (LB, 3, s, s)

    # Teacher: unmasked global views, no gradients (iBOT).
    with torch.no_grad():
        t_tokens, t_attn = teacher['backbone'](g_views, return_attn=True)      # (2B, 1+N, D), (2B, H, N)
        t_logits = teacher['head'](t_tokens if cfg.w_mim else t_tokens[:, :1]).float()   # (2B, 1+N or 1, C)
    # Without a patch-level loss the student sees unmasked views (DINO + PKA).
    s = student(g_views, masks if cfg.w_mim or cfg.w_pix else None, locals_, patch_logits=cfg.w_mim > 0)
    s.update(cls=s['logits'][:, 0], patch=s['logits'][:, 1:])                 # (2B, C), (2B, N, C); see Student

    def per_view(key):   # (2B or LB, ...) -> (B, ...) per view: the globals, then the locals ([CLS] and kp only)
        local = list(s[key + '_local'].float().chunk(n_local)) if n_local else []
        return list(s[key].float().chunk(2)) + local

    parts = {}
    t_cls_probs = [centres['cls'].probs(t, teacher_temp) for t in t_logits[:, 0].chunk(2)]   # 2 x (B, C)
    if cfg.w_cls:
        parts['cls'] = cls_loss(per_view('cls'), t_cls_probs, cfg.student_temp)
    if cfg.w_mim:
        t_patch = [centres['patch'].probs(t, teacher_temp) for t in t_logits[:, 1:].chunk(2)]   # 2 x (B, N, C)
        parts['mim'] = mim_loss(list(s['patch'].chunk(2)), t_patch, list(masks.chunk(2)), cfg.student_temp)
    if cfg.w_pix:
        parts['pix'] = pixel_loss(s['pix'], g_views, masks, cfg.patch_size)
    t_kp = attention_keypoints(t_attn, grid).chunk(2)                          # 2 x (B, H, 2)
    if cfg.w_pka:   # the views' sides in pixels map the keypoints between them
        parts['pka'] = pka_loss(per_view('kp'), t_kp, batch['affines'], [v.shape[-1] for v in batch['views']], 2)
    total = sum(getattr(cfg, 'w_' + k) * v for k, v in parts.items())

    # Diagnostics of collapse: entropy of the centred teacher distribution (0 = one-hot collapse,
    # log C = uniform collapse) and the spread of the pseudo keypoints across images.
    p = torch.cat(t_cls_probs).detach()                                        # (2B, C)
    stats = dict(t_entropy=float(-(p * p.clamp(min=1e-12).log()).sum(-1).mean()),
                 kp_spread=float(t_kp[0].std(0).mean()) if len(t_kp[0]) > 1 else 0.0)
    if cfg.w_mim:  # the MIM loss's floor: mim_loss of the teacher against itself, i.e. its patch entropy
        log_t = [t.detach().clamp(min=1e-12).log() for t in t_patch]   # log-probs as logits at temperature 1
        stats['t_patch_entropy'] = float(mim_loss(log_t, t_patch, list(masks.chunk(2)), 1.0))
    return total, parts, stats, t_logits


def clip_gradients(params, max_norm):
    """iBOT's per-parameter clipping: each gradient's norm is clipped to max_norm separately."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in torch._foreach_norm(grads)])


# -------- Training
def train(cfg):
    """Run HandMIM pretraining; returns the process exit code (0 done, 130 stopped by Ctrl-C/SIGTERM)."""
    rank, world, device = setup_distributed(cfg.device)
    cfg, note = resolve_preset(cfg, has_gpu=device.type == 'cuda')
    print0(note)
    torch.manual_seed(cfg.seed)
    is_main, global_batch = rank == 0, cfg.batch_size * world
    out = lambda name: os.path.join(cfg.output_dir, name)

    # ---- data: views + affines (data.PretrainAugment), block masks, per-(epoch, index) seeding
    augment = PretrainAugment(cfg.img_size, n_local=cfg.n_local, local_size=cfg.local_size)
    grid = (cfg.img_size // cfg.patch_size,) * 2
    images = ImageFolder(pretraining_images(cfg.data), transform=augment)
    images.paths = images.paths[:cfg.max_images or None]
    dataset = KeyedSamples(MaskedViews(images, grid, cfg.mask_ratio, cfg.mask_ratio_var), cfg.seed)
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data} has {len(dataset)} usable images, fewer than one global batch "
                         f"({world} x {cfg.batch_size}); lower --batch_size or add images")
    total_steps, lr_peak = cfg.epochs * steps_per_epoch, cfg.blr * global_batch / 256

    # ---- student, EMA teacher, centres, optimizer (iBOT: AdamW, lr = blr * global batch / 256)
    student, teacher, centres = (m.to(device) for m in build_models(cfg))
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay))
    scaler = make_scaler(cfg.amp, device)
    stateful = dict(model=student, teacher=teacher, centres=centres, optimizer=optimizer, scaler=scaler)
    guard, progress = NonFiniteGuard(cfg.max_non_finite), Progress()
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        if not isinstance(state.get('config'), dict) or 'teacher' not in state:
            raise ValueError(f"--resume {cfg.resume}: not a pretrain.py checkpoint (no 'config'/'teacher')")
        check_same_architecture(state['config'], cfg, ARCH_FIELDS)
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        progress = Progress(state['epoch'], state['step_in_epoch'], state['step'])
        if state.get('global_batch') != global_batch and progress.step_in_epoch:
            print0("the global batch differs from the checkpoint's: the interrupted epoch restarts")
            progress.step_in_epoch = 0
        guard.n_skipped = state.get('non_finite_steps', 0)
        print0(f"resumed from {cfg.resume}: epoch {progress.epoch}, step {progress.step}")
    if is_main:   # only now that data and weights are known to be good: a failed start writes nothing
        prepare_output_dir(cfg.output_dir, dataclasses.asdict(cfg), progress.step)
        print0(json.dumps(dataclasses.asdict(cfg)))
    m0 = cfg.momentum_teacher if cfg.momentum_teacher is not None else teacher_momentum(total_steps)
    print0(f'{total_steps} steps: teacher EMA momentum {m0:.4f} -> 1, peak lr {lr_peak:.2e}')
    last_layer = [p for n, p in student.named_parameters() if 'last_layer' in n]

    model, teacher_fwd = student, teacher
    if world > 1:   # heads a loss weight switches off get no gradient: DDP must be told
        model = nn.parallel.DistributedDataParallel(
            student, find_unused_parameters=min(cfg.w_cls, cfg.w_mim, cfg.w_pix, cfg.w_pka) == 0)
    if cfg.compile:   # the raw modules keep the weights: checkpoints and the EMA use them
        model = torch.compile(model)
        teacher_fwd = {k: torch.compile(m) for k, m in teacher.items()}

    def train_step(batch, step):
        # ---- schedules, pure functions of the global step (iBOT)
        lr = cosine_schedule(step, total_steps, lr_peak, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch)
        wd = cosine_schedule(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
        momentum = cosine_schedule(step, total_steps, m0, 1.0)
        t_temp = cosine_schedule(step, total_steps, cfg.teacher_temp, cfg.teacher_temp,
                                 cfg.warmup_teacher_temp_epochs * steps_per_epoch, cfg.warmup_teacher_temp)
        for g in optimizer.param_groups:
            g['lr'], g['weight_decay'] = lr * g['lr_scale'], wd * g['wd_scale']
        with autocast(device, cfg.amp):   # the losses themselves are computed in float32
            loss, parts, stats, t_logits = handmim_losses(model, teacher_fwd, centres, batch, cfg, t_temp, grid)

        def freeze_last_layer():   # DINO: a frozen last layer in the first epoch(s) avoids collapse
            for p in last_layer if progress.epoch < cfg.freeze_last_layer else []:
                p.grad = None
        if backward_step(loss, step, optimizer, scaler, guard, lambda: clip_gradients(student.parameters(),
                         cfg.clip_grad) if cfg.clip_grad else None, freeze_last_layer):
            ema_update(teacher, student, momentum)
            centres['cls'].update(t_logits[:, 0])
            if cfg.w_mim:
                centres['patch'].update(t_logits[:, 1:])
        return dict(loss=loss.item(), **{k: v.item() for k, v in parts.items()}, lr=lr, wd=wd, momentum=momentum,
                    teacher_temp=t_temp, **stats)

    def end_epoch(finished, stop):
        if is_main:   # every epoch, and where a stop happened
            save_checkpoint({k: v.state_dict() for k, v in stateful.items()} | dict(
                epoch=progress.epoch, step_in_epoch=progress.step_in_epoch, step=progress.step,
                global_batch=global_batch, non_finite_steps=guard.n_skipped, config=dataclasses.asdict(cfg)),
                out('checkpoint.pth'))

    stop = train_loop(cfg, dataset, progress, train_step, end_epoch, device, rank, world, out('log.jsonl'),
                      show=[k for k in ('cls', 'pka', 'mim', 'pix') if getattr(cfg, 'w_' + k)])
    if is_main and stop == 130:
        print0(f"stopped at step {progress.step}: checkpoint saved, continue with --resume {out('checkpoint.pth')}")
    elif is_main:   # the teacher's ViT under the standard MAE/DINO/timm key names, for finetune.py
        save_checkpoint(teacher['backbone'].state_dict(), out('backbone.pth'))
        print0(f"done: {progress.step} steps ({progress.images / max(progress.seconds, 1e-9):.1f} img/s), "
               f"{guard.n_skipped} skipped (non-finite); teacher backbone saved to {out('backbone.pth')}")
        draw_curves(cfg.output_dir)
    teardown_distributed()
    return stop or 0


def main(argv=None):
    return run_cli(PretrainConfig, train, argv)


if __name__ == '__main__':
    sys.exit(main())
