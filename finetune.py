"""Supervised fine-tuning of ViT + PyMAF mesh regressor on MANO labels.

The second stage of HandMIM (Liu et al., arXiv 2307.16061): a plain ViT, initialized from HandMIM
pretraining (or an official MAE / DINO / iBOT / timm checkpoint, or from scratch), carries a PyMAF
iterative regressor (model.MeshRegressor) that predicts MANO pose, shape and a weak-perspective camera.
Every regressor iteration is supervised (PyMAF-X, SUPV_LAST False):
    L = sum over iterations of  w_j3d L1(root-relative 3D joints) + w_v3d L1(root-relative vertices)
        + w_j2d L1(2D joints, normalized crop coords) + w_rot MSE(16 rotation matrices) + w_beta MSE(betas)
        + w_hand L1(vertices in the hand frame: root-relative, global rotation undone)
    + w_heatmap KL(21 joint heat maps on the finest pyramid level),
the MANO terms only on samples with MANO labels. The hand-frame term is the finger pose and shape error
alone (what the Procrustes-aligned metrics score; PyMAF has no such term); the heat maps are the hand
counterpart of PyMAF's auxiliary dense supervision. Optimisation as MAE fine-tuning (main_finetune.py):
AdamW, lr = blr * global batch / 256, layer-wise lr decay, linear warm-up + cosine, drop path.
A held-out part of the TRAINING set (--val_fraction; never the evaluation split) is scored with
PA-MPJPE / PA-MPVPE after every epoch. Loss weights are our choice (the paper does not give them).

Run:   python finetune.py --data ./hands --pretrained runs/pretrain/backbone.pth --depth 6       (CPU)
       python finetune.py --data FreiHAND_pub_v2 --mano mano/MANO_RIGHT.pkl --arch vit_base --img_size 224 \
           --pretrained mae_pretrain_vit_base.pth --blr 5e-4 --layer_decay 0.65 --device cuda --amp bf16 \
           --batch_size 64 --epochs 100                                        (MAE ViT-B fine-tuning values)
       torchrun --nproc_per_node=4 finetune.py ...                          (DDP; gloo on CPU, NCCL on GPU)
Outputs in --output_dir: config.json, log.jsonl, checkpoint.pth (every epoch and on Ctrl-C; --resume)
and best.pth (the epoch with the lowest validation PA-MPVPE), which `python evaluate.py --checkpoint`
predicts and scores. The plumbing (CLI, schedules, DDP, AMP, checkpoints, the loop) is engine.py's.

Shapes (README legend): B batch, S crop side (px), V vertices, J = 21 joints (FreiHAND order).
"""
import copy
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from data import HO3D, FreiHAND, resolve_mano
from engine import (KeyedSamples, NonFiniteGuard, Progress, apply_preset, autocast, backward_step,
                    check_same_architecture,
                    cosine_schedule, load_checkpoint, log_jsonl, make_scaler, option, param_groups, prepare_output_dir,
                    print0, procrustes, run_cli, save_checkpoint, setup_distributed, teardown_distributed,
                    train_loop)
from mano import axis_angle_to_matrix
from model import ARCHS, build_regressor
from plot import draw_curves

# Config fields that shape the weights: a checkpoint must match them to be resumed.
ARCH_FIELDS = ('arch', 'depth', 'img_size', 'patch_size', 'n_iter', 'head_width')
# The CPU preset fine-tunes pretrain.py's tiny backbone in minutes (README, Results: what each setting bought).
# In so few steps the network learns the hand's orientation first; a heavy hand-frame term with lighter heat maps
# turns it towards the finger pose (validation PA-MPVPE after its 7 epochs, two seeds: 8.56 and 8.72 mm with 50
# and 0.3, 8.88 and 9.03 with 5 and 1). `base` is MAE's ViT-B fine-tuning recipe at HandMIM's scale, with
# PyMAF's weight 1 on the dense loss.
PRESETS = {
    'tiny': dict(arch='vit_tiny', depth=6, img_size=64, patch_size=8, head_width=64, epochs=7, batch_size=32,
                 blr=5e-3, warmup_epochs=1, layer_decay=1.0, w_hand=50.0, w_heatmap=0.3),
    'base': dict(arch='vit_base', depth=12, img_size=224, patch_size=16, head_width=256, epochs=100, batch_size=64,
                 blr=5e-4, warmup_epochs=5, layer_decay=0.75, w_hand=0.0, w_heatmap=1.0),
}


# ----------------------------------------------------------------------------------------------------
# Losses (pure functions)

def masked_mean(per_sample, mask):
    """Mean of (B,) values over the samples where `mask` is True; 0 (not NaN) when none is."""
    mask = mask.to(per_sample.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def heatmap_targets(uv, size, sigma):
    """Normalized Gaussians (B, J, h, w) centred at map-pixel points uv (B, J, 2) (pixel centres at integers)."""
    h, w = size
    ys, xs = torch.arange(h, dtype=uv.dtype, device=uv.device), torch.arange(w, dtype=uv.dtype, device=uv.device)
    gx = torch.exp(-0.5 * ((xs - uv[..., :1]) / sigma) ** 2)                     # (B, J, w)
    gy = torch.exp(-0.5 * ((ys - uv[..., 1:]) / sigma) ** 2)                     # (B, J, h)
    g = gy[..., :, None] * gx[..., None, :]                                       # (B, J, h, w)
    return g / g.sum((-2, -1), keepdim=True).clamp(min=1e-12)


def heatmap_loss(logits, joints2d, crop_size):
    """KL(target || softmax over the map) per joint, averaged over the joints inside the crop -> ((B,), (B,) has
    any). logits (B, J, h, w); joints2d (B, J, 2) crop pixels. Target: a Gaussian of sigma = 1/32 of the map side
    (2 px on a 64 px map, as SimpleBaseline's heat maps) at the joint moved onto the map's pixel grid."""
    B, J, h, w = logits.shape
    uv = (joints2d + 0.5) * (torch.tensor([w, h], device=logits.device) / crop_size) - 0.5   # (B, J, 2) map px
    target = heatmap_targets(uv.float(), (h, w), sigma=w / 32)                  # (B, J, h, w)
    log_p = logits.float().flatten(2).log_softmax(-1)                            # (B, J, h*w)
    t = target.flatten(2)
    kl = (t * (t.clamp(min=1e-12).log() - log_p)).sum(-1)                      # (B, J)
    inside = ((uv >= -0.5) & (uv <= torch.tensor([w, h], device=uv.device) - 0.5)).all(-1).float()   # (B, J)
    return (kl * inside).sum(1) / inside.sum(1).clamp(min=1), inside.any(1)


def mesh_losses(outputs, batch, weights):
    """Weighted loss summed over the regressor iterations -> (total, {term: value of the last iteration}).

    3D terms compare wrist-relative joints and vertices (the prediction lives in MANO's frame, the
    labels in the camera frame); 2D joints are compared in the crop's [-1, 1] coordinates (contract:
    uv = 2 u / S - 1). A term missing from `weights` is computed and reported, not trained."""
    B, S = batch['image'].shape[0], batch['image'].shape[-1]
    root = batch['joints3d'][:, :1]                                   # (B, 1, 3)
    gt_j3d, gt_v3d = batch['joints3d'] - root, batch['verts'] - root  # (B, J, 3), (B, V, 3)
    gt_j2d = batch['joints2d'] * (2.0 / S) - 1.0                      # (B, J, 2)
    gt_rot = axis_angle_to_matrix(batch['pose'].view(B, 16, 3))       # (B, 16, 3, 3)
    gt_hand = gt_v3d @ gt_rot[:, 0]                                   # (B, V, 3) hand frame
    has_3d, has_mano = batch['has_3d'], batch['has_mano']
    has_verts = batch['has_verts'] & has_3d
    total = 0.0
    for out in outputs:
        out = {k: v.float() for k, v in out.items()}  # losses in float32 under AMP
        pred_root = out['joints'][:, :1]
        # the hand frame: root-relative, each mesh's own global rotation undone (R^T x = x R)
        pred_hand = (out['vertices'] - pred_root) @ out['rotmat'][:, 0]        # (B, V, 3)
        terms = dict(j3d=masked_mean((out['joints'] - pred_root - gt_j3d).abs().mean((1, 2)), has_3d),
                     hand=masked_mean((pred_hand - gt_hand).abs().mean((1, 2)), has_verts & has_mano),
                     v3d=masked_mean((out['vertices'] - pred_root - gt_v3d).abs().mean((1, 2)), has_verts),
                     j2d=masked_mean((out['joints2d'] - gt_j2d).abs().mean((1, 2)), has_3d),
                     rot=masked_mean((out['rotmat'] - gt_rot).pow(2).mean((1, 2, 3)), has_mano),
                     beta=masked_mean((out['betas'] - batch['betas']).pow(2).mean(1), has_mano))
        total = total + sum(weights.get(k, 0.0) * v for k, v in terms.items())  # unweighted: logged only
    if 'heatmaps' in outputs[-1]:
        kl, has_any = heatmap_loss(outputs[-1]['heatmaps'], batch['joints2d'], S)
        terms['heatmap'] = masked_mean(kl, has_3d & has_any)
        total = total + weights.get('heatmap', 0.0) * terms['heatmap']
    return total, {k: v.item() for k, v in terms.items()}


def lr_decay_scale(name, num_layers, layer_decay):
    """MAE's param_groups_lrd: embeddings are layer 0, ViT block i layer i + 1, everything after the
    blocks (final norm, regressor) layer L + 1; a parameter of layer l trains at lr * decay^(L + 1 - l)."""
    if name.startswith('vit.blocks.'):
        layer = int(name.split('.')[2]) + 1
    elif name.startswith(('vit.cls_token', 'vit.pos_embed', 'vit.mask_token', 'vit.patch_embed')):
        layer = 0
    else:
        layer = num_layers + 1
    return layer_decay ** (num_layers + 1 - layer)


def load_pretrained(vit, path, key='teacher'):
    """Initialize `vit` in place from `path` -> (loaded, missing, unexpected) key lists.

    Our backbone.pth is a plain ViT state dict; our pretrain checkpoint.pth holds the teacher under
    'teacher' and the student under 'model' (both with a 'backbone.' prefix); a finetune.py checkpoint
    gives its ViT ('vit.' under 'model'; the regressor starts afresh); official files are
    unwrapped by `ViT.load_pretrained` (containers, prefixes, heads dropped, pos_embed interpolated).
    A file without ViT weights, or made for a ViT of another width or depth, is a ValueError."""
    ckpt = load_checkpoint(path)
    model = ckpt.get('model')
    if isinstance(model, dict) and any(k.startswith('vit.') for k in model):  # finetune.py's: its backbone only
        ckpt = {k[len('vit.'):]: v for k, v in model.items() if k.startswith('vit.')}
    elif key == 'student':  # ours keeps the student under 'model', DINO under 'student'
        ckpt = next((ckpt[k] for k in ('student', 'model') if isinstance(ckpt.get(k), dict)), ckpt)
    try:
        loaded, missing, unexpected = vit.load_pretrained(ckpt)
    except ValueError as e:
        raise ValueError(f'--pretrained {path}: {e}') from None
    own = vit.state_dict()
    wrong = [k for k in unexpected if k in own] + [k for k in missing + unexpected if k.startswith('blocks.')]
    if wrong:
        depth = 1 + max((int(k.split('.')[1]) for k in loaded + unexpected if k.startswith('blocks.')), default=-1)
        raise ValueError(f'--pretrained {path} was made for another ViT ({depth} blocks; mismatched: {wrong[:3]}); '
                         f'this one has {vit.num_layers} blocks of width {vit.embed_dim}: '
                         f'pass the --arch and --depth of the pretraining run')
    if not loaded:
        raise ValueError(f'--pretrained {path}: no ViT weights under the standard names (cls_token, pos_embed, '
                         f'blocks.N.*); its keys start with {unexpected[:4]}')
    return loaded, missing, unexpected


def load_regressor(model, path):
    """Start everything but the ViT (pyramid, heat-map head, regressor) from the finetune.py checkpoint at
    `path` -> the loaded keys. Transfer between labelled sets (HO3Dv2 from a FreiHAND model) keeps what the
    regressor learned: on synthetic hands a fresh one cost a 588-step fine-tuning 0.6 mm (README, "Any
    pretrained ViT"). A checkpoint of another --head_width or --n_iter is a ValueError; the MANO model is not
    stored, so pass the same --mano."""
    sd = load_checkpoint(path).get('model')
    if not isinstance(sd, dict) or not any(k.startswith('vit.') for k in sd):
        raise ValueError(f'--keep_regressor: {path} is not a finetune.py checkpoint (no ViT and regressor)')
    head = {k: v for k, v in sd.items() if not k.startswith('vit.')}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith('vit.')}
    wrong = sorted(set(own) ^ set(head)) + [k for k in head if k in own and head[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f'--keep_regressor: the regressor of {path} differs from this one ({wrong[:3]}): '
                         f'pass the --head_width and --n_iter of its run')
    model.load_state_dict(head, strict=False)
    return list(head)


# ----------------------------------------------------------------------------------------------------
# Configuration, data, validation

@dataclass
class FinetuneConfig:
    """Fine-tune ViT + PyMAF regressor on MANO-labelled hands (FreiHAND layout or HO3Dv2)."""
    data: str = option('./hands', 'dataset root: FreiHAND v2 layout (real, or `python synthetic.py`) or HO3Dv2')
    dataset: str = option('freihand', 'layout of --data', choices=['freihand', 'ho3d'])
    mano: str = option('synthetic', "MANO model: 'synthetic' or the path of MANO_RIGHT.pkl / .npz")
    output_dir: str = option('./runs/finetune', 'checkpoints, logs and config.json go here')
    pretrained: str = option('', "ViT init: our backbone.pth / checkpoint.pth, a finetune.py checkpoint (its ViT; "
                                 "the regressor starts afresh unless --keep_regressor), or an official MAE, DINO, "
                                 "iBOT or timm file; empty = from scratch")
    key: str = option('teacher', 'network of a pretraining checkpoint.pth to load', choices=['teacher', 'student'])
    keep_regressor: bool = option(False, 'with a finetune.py checkpoint as --pretrained: start the regressor from '
                                         'it too, not afresh (e.g. HO3Dv2 from a FreiHAND model)')
    preset: str = option('auto', "tiny (CPU, pretrain.py's tiny backbone) | base (paper scale) | auto: base with a GPU, "
                                 "else tiny; fills every field left unset", choices=['auto', 'tiny', 'base'])
    # Architecture; None = the preset's value.
    arch: str = option(None, 'backbone', choices=list(ARCHS))
    depth: int = option(None, "ViT blocks (default: the arch's)")
    img_size: int = option(None, 'input crop side in pixels (paper: 224)')
    patch_size: int = option(None, 'ViT patch size')
    n_iter: int = option(3, 'PyMAF regressor iterations')
    head_width: int = option(None, 'channels of the first deconvolution level, halved at each next one (PyMAF: 256); '
                                   'at 64 px the 256/128/64 pyramid costs twice the ViT-Tiny, so tiny uses 64')
    drop_path: float = option(0.1, 'ViT stochastic depth rate (MAE fine-tuning: 0.1)')
    # Optimisation (MAE fine-tuning recipe) and loss weights (ours: the paper gives none)
    epochs: int = option(None, 'training epochs')
    batch_size: int = option(None, 'images per process and step')
    blr: float = option(None, 'base lr; lr = blr * global batch / 256 (MAE ViT-B: 5e-4 at batch 1024)')
    min_lr: float = option(1e-6, 'final lr of the cosine schedule')
    warmup_epochs: int = option(None, 'linear lr warm-up epochs')
    layer_decay: float = option(None, 'layer-wise lr decay (MAE: 0.75 for a converged pretrained ViT); 1 = off')
    weight_decay: float = option(0.05, 'AdamW weight decay (none on biases, norms, tokens, pos_embed)')
    clip_grad: float = option(1.0, 'clip the global gradient norm to this; 0 = off')
    augment: bool = option(True, 'box scale, camera roll, shift and colour augmentation of training crops')
    val_fraction: float = option(0.1, 'held-out part of the TRAINING set, scored after every epoch')
    w_j3d: float = option(1.0, 'weight of the L1 on root-relative 3D joints (metres)')
    w_v3d: float = option(1.0, 'weight of the L1 on root-relative vertices (metres)')
    w_hand: float = option(None, 'weight of the L1 on vertices in the hand frame (root-relative, global rotation '
                                'undone): finger pose error alone (PyMAF has none)')
    w_j2d: float = option(0.1, 'weight of the L1 on 2D joints ([-1, 1] crop coordinates)')
    w_rot: float = option(1.0, 'weight of the MSE on the 16 MANO rotation matrices')
    w_heatmap: float = option(None, 'weight of the auxiliary 2D heat-map loss on the finest pyramid level (KL to a '
                                   'Gaussian at each joint; PyMAF\'s auxiliary dense supervision); 0 = no heat-map head')
    w_beta: float = option(0.05, 'weight of the MSE on the 10 MANO shape coefficients (keeps the shape '
                                'plausible: without it the network shrinks hands it cannot orient yet)')
    # Machinery
    device: str = option('auto', 'auto | cpu | cuda', choices=['auto', 'cpu', 'cuda'])
    amp: str = option('off', 'mixed precision', choices=['off', 'bf16', 'fp16'])
    compile: bool = option(False, 'torch.compile the model')
    workers: int = option(2, 'data-loading worker processes per rank')
    seed: int = option(0, 'seed of initialisation, validation split, data order and augmentation')
    log_every: int = option(10, 'write a log.jsonl line every this many steps')
    max_steps: int = option(0, 'stop (validate and save) after this many steps, schedules unchanged; 0 = all')
    max_non_finite: int = option(10, 'stop after this many non-finite losses in a row')
    resume: str = option('', 'checkpoint.pth to continue from')


def make_datasets(cfg):
    """(train, val) parts of the TRAINING split; val is unaugmented. Whole groups are held out, so no
    validation hand is trained on in another form: FreiHAND's image versions of one annotation, HO3D's
    sequences (neighbouring frames are near duplicates)."""
    if cfg.dataset == 'freihand':
        train = FreiHAND(cfg.data, 'training', cfg.img_size, augment=cfg.augment, mano=cfg.mano)
        groups = [i % train.n for i in range(len(train))]  # image i shows annotation i mod n
    else:
        train = HO3D(cfg.data, 'train', cfg.img_size, augment=cfg.augment, mano=cfg.mano)
        groups = [name.split('/')[0] for name in train.ids]
    val = copy.copy(train)  # shares the (large) annotation arrays
    val.augment = None
    names = sorted(set(groups))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = min(len(names) - 1, max(1, round(cfg.val_fraction * len(names)))) if cfg.val_fraction > 0 else 0
    held_out = {names[i] for i in order[:n_val]}
    one_version = train.n if cfg.dataset == 'freihand' else len(train)  # FreiHAND: validate on version 0
    train_ids = [i for i, g in enumerate(groups) if g not in held_out]
    val_ids = [i for i, g in enumerate(groups) if g in held_out and i < one_version]
    return torch.utils.data.Subset(train, train_ids), torch.utils.data.Subset(val, val_ids)


@torch.no_grad()
def validate(model, dataset, cfg, device, rank=0, world=1, mean_hand=False):
    """{'pa_mpjpe_mm', 'pa_mpvpe_mm'} on `dataset`, sharded over the processes and all-reduced; with
    `mean_hand`, of the MANO mean hand (hands_mean fingers, zero betas) instead of the network's predictions."""
    model.eval()
    if world > 1:  # DDP updates the pyramid's BatchNorm statistics per rank: score rank 0's, the ones it saves
        for b in model.buffers():
            dist.broadcast(b, 0)
    if mean_hand:
        with torch.no_grad():
            mean = model.mano(torch.cat([torch.zeros(1, 3, device=device), model.mano.hands_mean[None]], 1))
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # joint error, vertex error, samples
    for batch in torch.utils.data.DataLoader(shard, cfg.batch_size, num_workers=cfg.workers):
        gt_j, gt_v = batch['joints3d'].to(device), batch['verts'].to(device)
        if mean_hand:
            out = dict(joints=mean.joints.expand_as(gt_j), vertices=mean.vertices.expand_as(gt_v))
        else:
            with autocast(device, cfg.amp):
                out = model(batch['image'].to(device))[-1]
        # Official protocol: joints and vertices each get their own similarity alignment.
        err_j = (procrustes(out['joints'].float(), gt_j) - gt_j).norm(dim=-1).mean(1)  # (B,)
        err_v = (procrustes(out['vertices'].float(), gt_v) - gt_v).norm(dim=-1).mean(1)
        sums += torch.stack([err_j.sum(), err_v.sum(), torch.tensor(len(err_j), device=device)]).double()
    if world > 1:
        dist.all_reduce(sums)
    n = sums[2].clamp(min=1)
    return dict(pa_mpjpe_mm=1000 * float(sums[0] / n), pa_mpvpe_mm=1000 * float(sums[1] / n))


# ----------------------------------------------------------------------------------------------------
# Training

def train(cfg):
    """Fine-tune as configured; returns the process exit code (0 done, 130 stopped by Ctrl-C)."""
    rank, world, device = setup_distributed(cfg.device)
    cfg, note = apply_preset(cfg, PRESETS, has_gpu=device.type == 'cuda')
    print0(note)
    torch.manual_seed(cfg.seed)
    is_main, out = rank == 0, lambda name: os.path.join(cfg.output_dir, name)

    # ---- data: held-out validation groups, (epoch, index)-seeded training samples
    train_set, val_set = make_datasets(cfg)
    steps_per_epoch = len(train_set) // (world * cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f'{cfg.data} has {len(train_set)} training samples after holding out {len(val_set)}, '
                         f'fewer than one global batch ({world} x {cfg.batch_size}); lower --batch_size')
    print0(f'{len(train_set)} training and {len(val_set)} held-out validation samples from {cfg.data}'
           + ('' if len(val_set) else ' (validation needs --val_fraction > 0 and two hands or sequences)'))
    total_steps = cfg.epochs * steps_per_epoch

    # ---- model, optimizer with layer-wise lr decay, resume or pretrained initialization
    model = build_regressor(asdict(cfg), resolve_mano(cfg.mano, cfg.data)).to(device)
    model.vit.mask_token.requires_grad_(False)  # used by masked pretraining only (DDP needs every grad)
    decay = lambda name: lr_decay_scale(name, model.vit.num_layers, cfg.layer_decay)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, decay))
    scaler = make_scaler(cfg.amp, device)
    guard, progress, best = NonFiniteGuard(cfg.max_non_finite), Progress(), float('inf')
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        if not isinstance(state.get('config'), dict) or 'optimizer' not in state:
            raise ValueError(f"--resume {cfg.resume}: not a finetune.py checkpoint.pth (no 'config'/'optimizer')")
        check_same_architecture(state['config'], cfg, ARCH_FIELDS)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        progress, best = Progress(state['epoch'], state['step_in_epoch'], state['step']), state['best']
        guard.n_skipped = state['non_finite_steps']
        print0(f'resumed from {cfg.resume}: epoch {progress.epoch}, step {progress.step}')
    elif cfg.pretrained:
        loaded, missing, unexpected = load_pretrained(model.vit, cfg.pretrained, cfg.key)
        print0(f'--pretrained {cfg.pretrained}: loaded {len(loaded)} tensors; missing (left at init): '
               f'{missing or "none"}; unexpected (ignored): {unexpected or "none"}')
        if cfg.keep_regressor:
            print0(f'--keep_regressor: {len(load_regressor(model, cfg.pretrained))} regressor tensors loaded too')
    elif cfg.keep_regressor:
        raise ValueError('--keep_regressor needs --pretrained: the finetune.py checkpoint to start from')
    else:
        print0('no --pretrained: the ViT starts from scratch')
    if is_main:  # only now that data and weights are known to be good: a failed start writes nothing
        prepare_output_dir(cfg.output_dir, asdict(cfg), progress.step)
    if len(val_set) and progress.step == 0:   # the baseline every validation is read against
        base = validate(model, val_set, cfg, device, rank, world, mean_hand=True)
        print0('mean hand | validation ' + ' | '.join(f'{k[:-3]} {v:.2f} mm' for k, v in base.items()))
        if is_main:
            log_jsonl(out('log.jsonl'), dict(step=0, epoch=0, **{'val_mean_hand_' + k: v for k, v in base.items()}))
    peak_lr = cfg.blr * cfg.batch_size * world / 256
    weights = dict(j3d=cfg.w_j3d, v3d=cfg.w_v3d, hand=cfg.w_hand, j2d=cfg.w_j2d, rot=cfg.w_rot, beta=cfg.w_beta,
                   heatmap=cfg.w_heatmap)
    net = torch.compile(model) if cfg.compile else model  # `model` stays the plain module we save
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda'
                                                        else None)
    net.train()

    def train_step(batch, step):
        lr = cosine_schedule(step, total_steps, peak_lr, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch)
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_scale']
        with autocast(device, cfg.amp):
            outputs = net(batch['image'])
        loss, terms = mesh_losses(outputs, batch, weights)
        clip = (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)) if cfg.clip_grad else None
        backward_step(loss, step, optimizer, scaler, guard, clip)
        return dict(loss=loss.item(), **terms, lr=lr)

    def save(path, metrics, full=True):
        extra = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step_in_epoch=progress.step_in_epoch,
                     step=progress.step, best=best, non_finite_steps=guard.n_skipped) if full else {}
        save_checkpoint(dict(model=model.state_dict(), config=asdict(cfg), epoch=progress.epoch, metrics=metrics,
                             **extra), out(path))

    def end_epoch(finished, stop):
        nonlocal best
        metrics = {}
        if finished or stop == 0:  # validate after every epoch and at a --max_steps stop
            # The plain module: DDP would broadcast buffers per forward and shards differ in length.
            metrics = validate(model, val_set, cfg, device, rank, world) if len(val_set) else {}
            net.train()
            print0(f'epoch {progress.epoch} step {progress.step} | validation '
                   + (' | '.join(f'{k[:-3]} {v:.2f} mm' for k, v in metrics.items()) or 'skipped'))
            if is_main:
                log_jsonl(out('log.jsonl'), dict(step=progress.step, epoch=progress.epoch,
                                                 **{'val_' + k: v for k, v in metrics.items()}))
            if metrics.get('pa_mpvpe_mm', float('inf')) < best or not metrics:
                best = metrics.get('pa_mpvpe_mm', best)
                if is_main:
                    save('best.pth', metrics, full=False)
        if is_main:
            save('checkpoint.pth', metrics)  # every epoch, and where a stop happened

    stop = train_loop(cfg, KeyedSamples(train_set, cfg.seed), progress, train_step, end_epoch, device, rank, world,
                      out('log.jsonl'), show=('j3d', 'hand'))
    if stop == 130:
        print0(f'stopped by a signal at step {progress.step}: checkpoint saved, continue with --resume '
               f'{out("checkpoint.pth")}')
    else:
        score = f'best validation PA-MPVPE {best:.2f} mm; ' if best < float('inf') else ''
        print0(f'done: {progress.step} steps, {guard.n_skipped} skipped (non-finite); {score}model in {out("best.pth")}')
        if is_main:
            draw_curves(cfg.output_dir)
    teardown_distributed()
    return stop or 0


def main(argv=None):
    return run_cli(FinetuneConfig, train, argv)


if __name__ == '__main__':
    sys.exit(main())
