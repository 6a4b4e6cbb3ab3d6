"""HandMIM self-supervised pretraining of a plain ViT on unlabeled hand images (SPEC.md section 6).

HandMIM (Liu et al., arXiv 2307.16061) trains a student ViT against an EMA teacher with losses at
three granularities:
  L_cls, L_pka  [CLS] token: DINO/iBOT cross-view distillation, plus pseudo keypoint alignment: the
                teacher's last-layer [CLS]->patch attention peaks (soft-argmax, one per head) of one view,
                carried into the other view with the known augmentation affines A_i A_j^-1, are regressed
                from the student's [CLS] token, which makes it pose-aware;
  L_mim         patch tokens: iBOT masked-image-modeling self-distillation on the masked patches;
  L_pix         pixels: MAE norm_pix reconstruction of the masked patches (SimMIM-style linear head).
The paper's full text is not available: PKA's exact form and the loss weights (1 each) are our design
on top of the public recipes (bytedance/ibot main_ibot.py, DINO, MAE). Other choices of ours: the 'tiny'
CPU preset (ViT-Tiny with 6 blocks at 128 px, head 512 -> 1024); a FreiHAND-layout folder pretrains on
training/rgb only; a sample's views and masks are a pure function of (seed, epoch, index) and drop path
of (seed, step), so a resumed CPU run reproduces the uninterrupted one bit for bit.

Run:   python pretrain.py --data ./hands                        (CPU: the 'tiny' preset, announced)
       python pretrain.py --data DIR --preset base --amp bf16   (one GPU, paper scale)
       torchrun --nproc_per_node=2 pretrain.py --data DIR       (DDP; gloo on CPU, NCCL on GPU)
       python pretrain.py --help                                (every flag, e.g. --w_pka 0 for an ablation)
Outputs in --output_dir: config.json, log.jsonl, checkpoint.pth (each epoch and on Ctrl-C), backbone.pth
at the end (the TEACHER's ViT under the standard MAE/DINO/timm key names). Exit codes: 0 done, 130 stopped
by Ctrl-C/SIGTERM (checkpoint saved; --resume continues exactly), 2 bad input, 1 loss NaN/inf too often.

Shapes: B batch, V views (2 global + L local), S view side (px), N = h*w patches, D width, H heads
(= K pseudo keypoints), P = patch*patch*3 pixel values of a patch, C head output dim (out_dim).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import model as M
from data import ImageFolder, PretrainAugment


# -------- Shared training utilities (finetune.py imports these)
def option(default, help, **metadata):
    """A dataclass field with its --help text (read by config_from_cli)."""
    return field(default=default, metadata=dict(help=help, **metadata))


def config_from_cli(cls, argv=None):
    """A dataclass `cls` instance from flags generated from its fields: the type from the default (or the
    annotation when it is None), bools as `--flag/--no-flag`, tuples with nargs, help from the metadata."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or '').strip().split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=f.metadata.get('help', ' '))
        if 'choices' in f.metadata:
            kw['choices'] = f.metadata['choices']
        if isinstance(default, bool):
            kw['action'] = argparse.BooleanOptionalAction
        elif isinstance(default, (tuple, list)):
            kw.update(nargs='+', type=type(default[0]) if default else str)
        else:   # `x: int = None` or `x: float | None = None` take the type from the annotation
            kw['type'] = type(default) if default is not None else _annotation_type(f.type)
        parser.add_argument('--' + f.name, **kw)
    args = parser.parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    return cls(**values)


def _annotation_type(ann):
    """The first concrete type of an annotation such as `int` or `float | None` (else str)."""
    args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
    return args[0] if args[0] in (int, float) else str


def cosine_schedule(step, total_steps, start, end, warmup_steps=0, warmup_start=0.0):
    """Linear warm-up from `warmup_start` to `start`, then half a cosine from `start` to `end` (clamped).

    iBOT/DINO `cosine_scheduler` as a pure function of the step: lr, weight decay, EMA momentum and,
    with start == end, the teacher-temperature warm-up."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def setup_distributed(device='auto'):
    """-> (rank, world_size, torch.device): DDP (NCCL on GPUs, gloo on CPU) under torchrun, else one process."""
    if device not in ('auto', 'cpu', 'cuda'):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    use_cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, torch.device('cuda' if use_cuda else 'cpu')
    rank, world, local_rank = (int(os.environ.get(k, 0)) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo', rank=rank, world_size=world)
    return rank, world, torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')


def teardown_distributed():
    """Wait for every rank (rank 0 may still be writing a checkpoint), then leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_cli(config_cls, train, argv=None):
    """Parse the flags into `config_cls` and run `train(cfg)`; bad input and a loss that stays non-finite
    end with a one-line message instead of a traceback. -> exit code (2 bad input, 1 non-finite)."""
    cfg = config_from_cli(config_cls, argv)
    try:
        return train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2


def print0(*args, **kwargs):
    """print() on rank 0 only (instead of patching builtins.print as DINO/MAE do)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def autocast(device, amp):
    """Mixed-precision context for `amp` in 'off'|'bf16'|'fp16' (a no-op context for 'off')."""
    if amp not in ('off', 'bf16', 'fp16'):
        raise ValueError(f"--amp must be off, bf16 or fp16, got {amp!r}")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(amp)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def make_scaler(amp, device):
    """GradScaler, enabled only for fp16 (bf16 has float32's range and needs no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == 'fp16'))


def save_checkpoint(state, path):
    """torch.save `state` (tensors and plain Python values) via a tmp file + os.replace, so an
    interrupted write never leaves a truncated checkpoint behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load(weights_only=True) -> dict; a clear ValueError for a missing/truncated/foreign file."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist (check the path given to --resume "
                         f"or --pretrained)")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # truncated zip, pickle with foreign classes, not a torch file at all
        raise ValueError(f"checkpoint {path!r} could not be read as a weights-only torch file "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). It may be truncated "
                         f"or saved with pickled Python objects; re-save it as a dict of tensors.") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a dict")
    return state


def param_groups(model, weight_decay, lr_scale_fn=None):
    """AdamW groups of the trainable parameters: no weight decay on biases, norms, tokens, pos_embed.

    Each group carries 'wd_scale' (1 or 0) and 'lr_scale' (lr_scale_fn(name), e.g. layer-wise decay):
    the training loop sets lr = lr(step) * lr_scale and weight_decay = wd(step) * wd_scale.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split('.')[-1]
        no_decay = p.ndim <= 1 or leaf == 'bias' or leaf in ('cls_token', 'mask_token', 'pos_embed')
        lr_scale = 1.0 if lr_scale_fn is None else float(lr_scale_fn(name))
        key = (no_decay, lr_scale)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                               wd_scale=0.0 if no_decay else 1.0, lr_scale=lr_scale)
        groups[key]['params'].append(p)
    return list(groups.values())


def log_jsonl(path, record):
    """Append `record` as one JSON line (tensors and numpy scalars become floats)."""
    with open(path, 'a') as f:
        f.write(json.dumps(record, default=float) + '\n')


def any_rank(flag, device):
    """True if `flag` is True on any rank (so every rank stops at the same step)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class NonFiniteLossError(RuntimeError):
    """Raised by NonFiniteGuard when the loss stays NaN/inf."""


class NonFiniteGuard:
    """`guard(loss, step)` -> True when the step may proceed: NaN/inf steps are skipped and counted, and
    `max_consecutive` in a row raise. Under DDP the verdict is all-reduced *before* backward, so every
    rank skips the same steps (otherwise DDP's gradient all-reduce hangs)."""

    def __init__(self, max_consecutive=10):
        self.max_consecutive, self.consecutive, self.n_skipped = max_consecutive, 0, 0

    def __call__(self, loss, step=None):
        if not any_rank(not torch.isfinite(torch.as_tensor(loss)).all(),
                         loss.device if torch.is_tensor(loss) else 'cpu'):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.n_skipped += 1
        print0(f"non-finite loss at step {step}: step skipped ({self.n_skipped} skipped so far, "
               f"{self.consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {self.consecutive} steps in a row (step {step}); stopping "
                f"before the weights are corrupted. Lower the learning rate, use --amp bf16 or off "
                f"instead of fp16, or check the input data. The last good checkpoint is kept.")
        return False


# -------- HandMIM components: masking, EMA teacher, losses, pseudo keypoints
def block_mask(h, w, ratio, rng, min_aspect=0.3):
    """iBOT/BEiT block-wise mask over an h x w patch grid -> bool (h, w), True = masked.

    Rectangles of random area (>= (min(h, w) // 3)^2 patches) and aspect ratio in [min_aspect,
    1/min_aspect] are added until ratio*h*w patches are masked; one is accepted only if it adds
    between 1 and the remaining number, so the count never exceeds the target. `rng`: random.Random.
    """
    mask, count = torch.zeros(h, w, dtype=torch.bool), 0
    target, min_area = ratio * h * w, (min(h, w) // 3) ** 2
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    while count < target:
        remaining, added = target - count, 0
        for _ in range(10):   # up to 10 placement attempts per block, as BEiT
            area = rng.uniform(min_area, remaining)
            aspect = math.exp(rng.uniform(*log_ar))
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


def make_teacher(student):
    """The EMA teacher: a deep copy of the student that never receives gradients."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()   # eval: no drop path in the teacher (iBOT builds it with drop_path 0)


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_t <- m theta_t + (1 - m) theta_s in place over the teacher's parameters, matched by name
    (the student-only pixel and PKA heads are ignored). Parameters only, as DINO/iBOT: no buffers."""
    student_params = dict(student.named_parameters())
    names, t_params = zip(*teacher.named_parameters())
    torch._foreach_lerp_(list(t_params), [student_params[n].detach() for n in names], 1.0 - momentum)


class Centre(nn.Module):
    """The teacher-output centre c of DINO/iBOT, a buffer updated by EMA over the global batch. Centring
    (subtracting c) and sharpening (a low teacher temperature) together prevent collapse."""

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

    student_cls: list of (B, C) logits, globals first; teacher_probs: list of (B, C) targets of the globals.
    """
    terms = [soft_cross_entropy(t, s, student_temp).mean()
             for q, t in enumerate(teacher_probs) for v, s in enumerate(student_cls) if v != q]
    return sum(terms) / len(terms)


def mim_loss(student_patch, teacher_probs, masks, student_temp=0.1):
    """iBOT patch loss: same view, teacher unmasked vs student masked, on masked patches only; normalised
    per image by its mask count, then averaged over the batch (an image without a mask counts as 0, as
    iBOT) and the views. student_patch, teacher_probs: lists of (B, N, C); masks: list of (B, N) bool."""
    terms = []
    for s, t, m in zip(student_patch, teacher_probs, masks):
        ce = soft_cross_entropy(t, s, student_temp)                        # (B, N)
        m = m.float()
        terms.append(((ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean())
    return sum(terms) / len(terms)


def patchify(images, patch_size):
    """(B, 3, H, W) -> (B, N, P) with each patch laid out (row, column, channel), as MAE."""
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)                # (B, 3, h, p, w, p)
    return torch.einsum('bchpwq->bhwpqc', x).reshape(B, h * w, patch_size ** 2 * C)   # (B, N, P)


def pixel_loss(pred, images, mask, patch_size):
    """MAE norm_pix loss: MSE to per-patch normalised pixels, averaged over all masked patches.

    pred (B, N, P), images (B, 3, H, W), mask (B, N) bool.
    """
    target = patchify(images.float(), patch_size)                          # (B, N, P)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)   # unbiased, as MAE
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(-1)                     # (B, N)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp(min=1.0)


def attention_keypoints(attn, grid):
    """Pseudo keypoints: soft-argmax of each head's [CLS]->patch attention map, attn (B, H, N) -> (B, H, 2)
    as (x, y) in [-1, 1], where patch column j is centred at (2j + 1) / w - 1 (align_corners=False)."""
    h, w = grid
    p = attn.float() / attn.float().sum(-1, keepdim=True).clamp(min=1e-12)   # the [CLS] share removed
    ys, xs = (torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=attn.device) for n in (h, w))   # patch centres
    centres = torch.stack(torch.meshgrid(xs, ys, indexing='xy'), -1).reshape(h * w, 2)   # (N, 2) row-major
    return p @ centres                                                         # (B, H, 2)


def map_between_views(points, affine_from, size_from, affine_to, size_to):
    """Map normalised points (B, K, 2) of one view into another through the pixel map A_to A_from^-1.

    A view has a source->view pixel affine (B, 2, 3) and a side S. Pixel centres sit at integer
    coordinates (data.py, OpenCV), so u = (x + 1) * S / 2 - 0.5 (grid_sample's align_corners=False).
    """
    square = lambda A: torch.cat([A, A.new_tensor([[0.0, 0, 1]]).expand(len(A), 1, 3)], 1).double()   # (B, 3, 3)
    T = square(affine_to) @ torch.linalg.inv(square(affine_from))              # (B, 3, 3) pixel map
    px = (points.double() + 1) * size_from / 2 - 0.5                          # (B, K, 2) pixels
    px = px @ T[:, :2, :2].transpose(1, 2) + T[:, None, :2, 2]
    return ((px + 0.5) * 2 / size_to - 1).to(points.dtype)


def pka_loss(student_kp, teacher_kp, affines, sizes, n_teacher):
    """Pseudo keypoint alignment: L1 between the student's PKA-head keypoints of view i and the teacher's
    attention keypoints of every other global view j mapped into view i, where those land inside view i.

    student_kp: list of (B, K, 2) per view (globals first); teacher_kp: list of (B, K, 2) for the first
    `n_teacher` views; affines: list of (B, 2, 3) per view; sizes: list of view sides in pixels.
    """
    total, count = 0.0, 0.0   # become tensors at the first pair (there is always one)
    for j in range(n_teacher):
        for i, pred in enumerate(student_kp):
            if i == j:
                continue
            target = map_between_views(teacher_kp[j], affines[j], sizes[j], affines[i], sizes[i])
            inside = (target.abs() <= 1).all(-1, keepdim=True).float()       # (B, K, 1)
            total = total + ((pred.float() - target).abs() * inside).sum()
            count = count + 2 * inside.sum()
    return total / count.clamp(min=1.0)   # no host sync: fine under torch.compile and on GPUs


# -------- Configuration and presets
@dataclass
class PretrainConfig:
    """HandMIM self-supervised pretraining of a ViT on a folder of unlabeled hand images."""
    data: str = option('./hands', 'folder of hand images, searched recursively')
    output_dir: str = option('./runs/pretrain', 'checkpoint.pth, log.jsonl, config.json and backbone.pth go here')
    preset: str = option('auto', 'tiny (CPU quick start) | base (paper scale) | auto: base with a GPU, else tiny',
                        choices=['auto', 'tiny', 'base'])
    # Architecture; None = the preset's value.
    arch: str = option(None, 'backbone', choices=['vit_tiny', 'vit_small', 'vit_base', 'vit_large'])
    depth: int = option(None, 'number of ViT blocks (overrides the arch default)')
    img_size: int = option(None, 'global view side in pixels')
    patch_size: int = option(16, 'ViT patch size')
    out_dim: int = option(None, 'projection head output dim C (iBOT: 8192)')
    head_hidden: int = option(None, 'projection head hidden width (iBOT: 2048)')
    drop_path: float = option(0.1, 'student stochastic depth (the teacher has none)')
    n_local: int = option(0, 'small local views per image (student [CLS] and PKA only; iBOT: 10)')
    local_size: int = option(None, 'local view side in pixels (default: 3/7 of img_size, as 96 for 224)')
    # Optimisation: iBOT's recipe.
    epochs: int = option(None, 'training epochs')
    batch_size: int = option(None, 'images per process and step')
    blr: float = option(5e-4, 'base learning rate: lr = blr * global batch / 256')
    min_lr: float = option(1e-6, 'final learning rate of the cosine schedule')
    warmup_epochs: int = option(None, 'linear learning-rate warm-up epochs')
    weight_decay: float = option(0.04, 'weight decay at the start (cosine schedule)')
    weight_decay_end: float = option(0.4, 'weight decay at the end')
    momentum_teacher: float = option(0.996, 'EMA momentum at the start, cosine to 1 (DINO: 0.9995 for batch 256)')
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


# The CPU preset is shallower than ViT-Tiny (6 blocks instead of 12) and has a narrower head so
# that the quick start trains at a useful speed on a laptop; `base` is iBOT's ViT-B/16 recipe.
PRESETS = {
    'tiny': dict(arch='vit_tiny', depth=6, img_size=128, out_dim=1024, head_hidden=512, epochs=5,
                 batch_size=32, warmup_epochs=1, warmup_teacher_temp_epochs=2),
    'base': dict(arch='vit_base', depth=12, img_size=224, out_dim=8192, head_hidden=2048, epochs=100,
                 batch_size=64, warmup_epochs=10, warmup_teacher_temp_epochs=30),
}
# Fields that change the shapes of the weights: a checkpoint must match them to be resumed.
ARCH_FIELDS = ('arch', 'depth', 'img_size', 'patch_size', 'out_dim', 'head_hidden')


def resolve_preset(cfg, has_gpu):
    """Fill the fields left at None from the preset -> (new config, one-line note on the choice)."""
    auto = cfg.preset == 'auto'
    name = ('base' if has_gpu else 'tiny') if auto else cfg.preset
    values = {k: v for k, v in PRESETS[name].items() if getattr(cfg, k) is None}
    if cfg.local_size is None:   # 3/7 of the global side in whole patches (96 for 224), at least one patch
        local = (values.get('img_size') or cfg.img_size) * 3 // 7 // cfg.patch_size * cfg.patch_size
        values['local_size'] = max(cfg.patch_size, local)
    cfg = dataclasses.replace(cfg, preset=name, **values)
    if not any((cfg.w_cls, cfg.w_pka, cfg.w_mim, cfg.w_pix)):
        raise ValueError('all four loss weights (--w_cls --w_pka --w_mim --w_pix) are 0: nothing to train')
    why = (f"{'a GPU' if has_gpu else 'no GPU'} found and no --preset given: using" if auto else 'using')
    note = (f"{why} the '{name}' preset ({cfg.arch} depth {cfg.depth}, {cfg.img_size} px, out_dim "
            f"{cfg.out_dim}, batch {cfg.batch_size} per process, {cfg.epochs} epochs)")
    return cfg, note


def check_same_architecture(saved, cfg, fields=ARCH_FIELDS):
    """Refuse to resume from a checkpoint whose weights have other shapes, naming the `fields` that differ."""
    diff = [f"{k}={saved.get(k)!r} in the checkpoint but {getattr(cfg, k)!r} now"
            for k in fields if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError("--resume: the checkpoint was trained with another architecture (" + '; '.join(diff) +
                         "). Pass the same flags as the original run, or drop --resume to start afresh.")


# -------- Data: two global views (+ locals) with their affines, block masks, deterministic per sample
@contextlib.contextmanager
def seeded_rngs(seed):
    """Seed Python, NumPy and torch for the block, then restore their states (whatever RNG the
    augmentation uses, sample (epoch, index) always gets the same views, in any worker)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)   # CPU only: the GPU generators are left alone
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class MaskedViews(torch.utils.data.Dataset):
    """Wraps an image dataset whose transform returns dict(views, affines) and adds a block mask
    (N,) per global view. Indexed by (epoch, index) so each sample's randomness is a pure function
    of (seed, epoch, index): the order of workers and a resume cannot change it."""

    def __init__(self, images, grid, mask_ratio, mask_ratio_var, seed):
        self.images, self.grid, self.seed = images, grid, seed
        self.ratio_range = (max(0.0, mask_ratio - mask_ratio_var), min(1.0, mask_ratio + mask_ratio_var))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2 ** 63
        with seeded_rngs(seed):
            sample = self.images[index]
        rng = random.Random(seed)
        masks = [block_mask(*self.grid, rng.uniform(*self.ratio_range), rng).flatten() for _ in range(2)]   # 2 x (N,)
        return dict(views=sample['views'], affines=sample['affines'], masks=masks)


def pretraining_images(root):
    """The image folder to pretrain on: in a FreiHAND-layout folder (e.g. `python data.py synth`),
    training/rgb only, so that the held-out evaluation images are never seen."""
    train_rgb = os.path.join(root, 'training', 'rgb')
    if os.path.isdir(train_rgb) and os.path.isdir(os.path.join(root, 'evaluation')):
        print0(f"{root} has the FreiHAND layout: pretraining on training/rgb only (evaluation/ stays unseen)")
        return train_rgb
    return root


def epoch_keys(n_images, epoch, seed, rank, world, batch_size):
    """This rank's (epoch, index) keys for one epoch: a seeded permutation cut into whole global
    batches; rank r takes rows [r*B, (r+1)*B) of every global batch, so 1 process with batch W*B
    and W processes with batch B see the same global batches."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    steps = n_images // (world * batch_size)
    perm = torch.randperm(n_images, generator=g)[:steps * world * batch_size]
    mine = perm.reshape(steps, world, batch_size)[:, rank].reshape(-1)        # (steps * B,)
    return [(epoch, int(i)) for i in mine]


# -------- Model: student (ViT + heads) and EMA teacher (ViT + projection head)
class Student(nn.Module):
    """ViT + iBOT projection head (shared by [CLS] and patches, iBOT's README recipe) + pixel head + PKA
    head, in one forward so that DDP sees a single call. The projection head runs on the patches only
    when `patch_logits` (it is the one costly head)."""

    def __init__(self, backbone, out_dim, head_hidden):
        super().__init__()
        D = backbone.embed_dim
        self.backbone = backbone
        self.head = M.ProjectionHead(D, out_dim, hidden_dim=head_hidden)
        self.pixel_head = M.PixelHead(D, backbone.patch_size)
        self.pka_head = M.PKAHead(D, backbone.num_heads)   # K pseudo keypoints = one per attention head

    def forward(self, global_views, masks=None, local_views=None, patch_logits=True):
        tokens = self.backbone(global_views, mask=masks)                      # (V*B, 1+N, D)
        logits = self.head(tokens if patch_logits else tokens[:, :1])         # (V*B, 1+N or 1, C)
        out = dict(cls=logits[:, 0], patch=logits[:, 1:], pix=self.pixel_head(tokens[:, 1:]),   # (V*B, N, P)
                   kp=self.pka_head(tokens[:, 0]))                            # (V*B, K, 2)
        if local_views is not None:   # locals: unmasked, [CLS] only (iBOT multi-crop)
            cls_local = self.backbone(local_views)[:, 0]                       # (L*B, D)
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
    """One HandMIM forward -> (weighted total, {name: loss}, {name: diagnostic}, teacher logits).

    batch: dict(views=[V x (B, 3, S, S)], affines=[V x (B, 2, 3)], masks=[2 x (B, N)]), globals first.
    """
    n_local = len(batch['views']) - 2
    g_views = torch.cat(batch['views'][:2])                                    # (2B, 3, S, S)
    masks = torch.cat(batch['masks'])                                          # (2B, N)
    locals_ = torch.cat(batch['views'][2:]) if n_local else None               # (L*B, 3, s, s)

    # Teacher: unmasked global views, no gradients (iBOT).
    with torch.no_grad():
        t_tokens, t_attn = teacher['backbone'](g_views, return_attn=True)      # (2B, 1+N, D), (2B, H, N)
        t_logits = teacher['head'](t_tokens if cfg.w_mim else t_tokens[:, :1]).float()   # (2B, 1+N or 1, C)
    # Without a patch-level loss the student sees unmasked views (DINO + PKA).
    s = student(g_views, masks if cfg.w_mim or cfg.w_pix else None, locals_, patch_logits=cfg.w_mim > 0)

    def per_view(key):   # (V*B, ...) -> V x (B, ...): the global views, then the locals ([CLS] and kp only)
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
    t_kp = attention_keypoints(t_attn, grid).chunk(2)                          # 2 x (B, K, 2)
    if cfg.w_pka:
        sizes = [v.shape[-1] for v in batch['views']]
        parts['pka'] = pka_loss(per_view('kp'), t_kp, batch['affines'], sizes, n_teacher=2)
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
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


# -------- Training
class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (torchrun, pre-emption): finish the step, save, exit (a second Ctrl-C
    aborts at once). Stopping between steps keeps a resumed run exact."""

    def __enter__(self):
        self.requested, self._pid = False, os.getpid()
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if os.getpid() == self._pid:   # DataLoader workers inherit the handler: they stay quiet
            print0("\nstop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg):
    """Run HandMIM pretraining; returns the process exit code (0 done, 130 stopped by Ctrl-C/SIGTERM)."""
    rank, world, device = setup_distributed(cfg.device)
    cfg, note = resolve_preset(cfg, has_gpu=device.type == 'cuda')
    print0(note)
    torch.manual_seed(cfg.seed)
    is_main, global_batch = rank == 0, cfg.batch_size * world
    out = lambda name: os.path.join(cfg.output_dir, name)
    if is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(out('config.json'), 'w') as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        print0(json.dumps(dataclasses.asdict(cfg)))

    # ---- data: views + affines (data.PretrainAugment), block masks, per-(epoch, index) seeding
    augment = PretrainAugment(cfg.img_size, n_local=cfg.n_local, local_size=cfg.local_size)
    grid = (cfg.img_size // cfg.patch_size,) * 2
    dataset = MaskedViews(ImageFolder(pretraining_images(cfg.data), transform=augment), grid, cfg.mask_ratio,
                          cfg.mask_ratio_var, cfg.seed)
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data} has {len(dataset)} usable images, fewer than one global batch "
                         f"({world} x {cfg.batch_size}); lower --batch_size or add images")
    total_steps = cfg.epochs * steps_per_epoch

    # ---- student, EMA teacher, centres, optimizer (iBOT: AdamW, lr = blr * global batch / 256)
    student, teacher, centres = (m.to(device) for m in build_models(cfg))
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay))
    scaler = make_scaler(cfg.amp, device)
    stateful = dict(model=student, teacher=teacher, centres=centres, optimizer=optimizer, scaler=scaler)
    guard = NonFiniteGuard(cfg.max_non_finite)
    epoch, step_in_epoch, step = 0, 0, 0
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        if not isinstance(state.get('config'), dict) or 'teacher' not in state:
            raise ValueError(f"--resume {cfg.resume}: not a pretrain.py checkpoint (no 'config'/'teacher')")
        check_same_architecture(state['config'], cfg)
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        epoch, step_in_epoch, step = state['epoch'], state['step_in_epoch'], state['step']
        if state.get('global_batch') != global_batch and step_in_epoch:
            print0("the global batch differs from the checkpoint's: the interrupted epoch restarts")
            step_in_epoch = 0
        guard.n_skipped = state.get('non_finite_steps', 0)
        print0(f"resumed from {cfg.resume}: epoch {epoch}, step {step}")
    lr_peak = cfg.blr * global_batch / 256
    last_layer = [p for n, p in student.named_parameters() if 'last_layer' in n]

    model, teacher_fwd = student, teacher
    if world > 1:   # heads a loss weight switches off get no gradient: DDP must be told
        model = nn.parallel.DistributedDataParallel(
            student, find_unused_parameters=min(cfg.w_cls, cfg.w_mim, cfg.w_pix, cfg.w_pka) == 0)
    if cfg.compile:   # the raw modules keep the weights: checkpoints and the EMA use them
        model = torch.compile(model)
        teacher_fwd = {k: torch.compile(m) for k, m in teacher.items()}

    if is_main and os.path.exists(out('log.jsonl')):   # drop lines after `step`: a resumed log reads as one run
        lines = [line for line in open(out('log.jsonl')) if json.loads(line)['step'] <= step]
        with open(out('log.jsonl'), 'w') as f:
            f.writelines(lines)
    stop, timed = None, [0, 0.0]   # images and seconds over all steps but the first of each epoch
    with StopOnSignal() as signal_stop:
        while epoch < cfg.epochs and stop is None:
            keys = epoch_keys(len(dataset), epoch, cfg.seed, rank, world, cfg.batch_size)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=cfg.batch_size, sampler=keys[step_in_epoch * cfg.batch_size:],
                num_workers=min(cfg.workers, os.cpu_count() or 1), pin_memory=device.type == 'cuda')
            bar = tqdm(loader, total=steps_per_epoch, initial=step_in_epoch, disable=not is_main,
                       desc=f'epoch {epoch + 1}/{cfg.epochs}', dynamic_ncols=True)
            tic = time.perf_counter()
            for batch in bar:
                # ---- schedules, pure functions of the global step (iBOT)
                lr = cosine_schedule(step, total_steps, lr_peak, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch)
                wd = cosine_schedule(step, total_steps, cfg.weight_decay, cfg.weight_decay_end)
                momentum = cosine_schedule(step, total_steps, cfg.momentum_teacher, 1.0)
                t_temp = cosine_schedule(step, total_steps, cfg.teacher_temp, cfg.teacher_temp,
                                         cfg.warmup_teacher_temp_epochs * steps_per_epoch, cfg.warmup_teacher_temp)
                for g in optimizer.param_groups:
                    g['lr'], g['weight_decay'] = lr * g['lr_scale'], wd * g['wd_scale']
                batch = {k: [t.to(device, non_blocking=True) for t in v] for k, v in batch.items()}
                # Drop path draws from the global RNG: seed it per step so a resumed run replays it.
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + rank)

                with autocast(device, cfg.amp):   # the losses themselves are computed in float32
                    loss, parts, stats, t_logits = handmim_losses(model, teacher_fwd, centres, batch, cfg,
                                                                  t_temp, grid)
                if guard(loss, step):
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)   # clip the true gradients, not the fp16-scaled ones
                    if cfg.clip_grad:
                        clip_gradients(student.parameters(), cfg.clip_grad)
                    if epoch < cfg.freeze_last_layer:   # DINO: a frozen last layer early avoids collapse
                        for p in last_layer:
                            p.grad = None
                    scaler.step(optimizer)
                    scaler.update()
                    ema_update(teacher, student, momentum)
                    centres['cls'].update(t_logits[:, 0])
                    if cfg.w_mim:
                        centres['patch'].update(t_logits[:, 1:])
                optimizer.zero_grad(set_to_none=True)
                step, step_in_epoch = step + 1, step_in_epoch + 1

                # ---- logging
                toc = time.perf_counter()
                img_s, dt, tic = global_batch / (toc - tic), toc - tic, toc
                if step_in_epoch > 1:   # the first step of an epoch also waits for the loader to start
                    timed = [timed[0] + global_batch, timed[1] + dt]
                record = dict(step=step, epoch=epoch, loss=loss.item(), **{k: v.item() for k, v in parts.items()},
                              lr=lr, wd=wd, momentum=momentum, teacher_temp=t_temp, **stats, img_s=img_s)
                bar.set_postfix_str(' '.join(f'{k} {record[k]:.3f}' for k in ('loss', *parts)) +
                                    f' lr {lr:.2e} {img_s:.1f} img/s')
                if is_main and (step % cfg.log_every == 0 or step_in_epoch == steps_per_epoch):
                    log_jsonl(out('log.jsonl'), record)
                if any_rank(signal_stop.requested, device):
                    stop = 130
                elif cfg.max_steps and step >= cfg.max_steps:
                    stop = 0
                if stop is not None:
                    break
            bar.close()
            if step_in_epoch == steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            if is_main:   # every epoch, and where a stop happened
                save_checkpoint({k: v.state_dict() for k, v in stateful.items()} | dict(
                    epoch=epoch, step_in_epoch=step_in_epoch, step=step, global_batch=global_batch,
                    non_finite_steps=guard.n_skipped, config=dataclasses.asdict(cfg)), out('checkpoint.pth'))

    if is_main and stop == 130:
        print0(f"stopped at step {step}: checkpoint saved, continue with --resume {out('checkpoint.pth')}")
    elif is_main:   # the teacher's ViT under the standard MAE/DINO/timm key names, for finetune.py
        save_checkpoint(teacher['backbone'].state_dict(), out('backbone.pth'))
        print0(f"done: {step} steps ({timed[0] / max(timed[1], 1e-9):.1f} img/s), {guard.n_skipped} skipped "
               f"(non-finite); teacher backbone saved to {out('backbone.pth')}")
    teardown_distributed()
    return stop or 0


def main(argv=None):
    return run_cli(PretrainConfig, train, argv)


if __name__ == '__main__':
    sys.exit(main())
