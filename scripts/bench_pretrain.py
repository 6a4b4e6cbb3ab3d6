"""Throughput and memory of one HandMIM pretraining step (pretrain.py), on random tensors.

Times the full step (teacher forward, student forward and backward, AdamW, EMA and centre
updates) without data loading, so it measures the model side only; pretrain.py's progress bar
shows the end-to-end number. Prints images/s (and peak GPU memory on CUDA).

Run:  python scripts/bench_pretrain.py                                  # tiny preset on CPU
      python scripts/bench_pretrain.py --preset base --amp bf16 --device cuda
      python scripts/bench_pretrain.py --w_mim 0                       # cost of one loss term
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import pretrain as P  # noqa: E402


def random_batch(cfg, device, B):
    """A batch shaped like MaskedViews' output: 2 global (+ local) views, affines, block masks."""
    import random
    sizes = [cfg.img_size] * 2 + [cfg.local_size] * cfg.n_local
    grid = (cfg.img_size // cfg.patch_size,) * 2
    rng = random.Random(0)
    affine = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(B, 2, 3)
    masks = [torch.stack([P.block_mask(*grid, 0.3, rng).flatten() for _ in range(B)]) for _ in range(2)]
    return dict(views=[torch.randn(B, 3, s, s, device=device) for s in sizes],
                affines=[affine.to(device) for _ in sizes], masks=[m.to(device) for m in masks])


def make_step(cfg, device, amp='off', compile=False):
    """-> (step, student): `step()` runs one full pretraining step on a fixed random batch of
    cfg.batch_size images and returns the loss tensor (not synchronized)."""
    torch.manual_seed(0)
    student, teacher, centres = (m.to(device) for m in P.build_models(cfg))
    model, teacher_fwd = student, teacher
    if compile:
        model, teacher_fwd = torch.compile(student), {k: torch.compile(m) for k, m in teacher.items()}
    optimizer = torch.optim.AdamW(engine.param_groups(student, cfg.weight_decay), lr=1e-4)
    scaler = engine.make_scaler(amp, device)
    batch = random_batch(cfg, device, cfg.batch_size)
    grid = (cfg.img_size // cfg.patch_size,) * 2

    def step():
        with engine.autocast(device, amp):
            loss, parts, _, t_logits = P.handmim_losses(model, teacher_fwd, centres, batch, cfg, 0.04, grid)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        P.clip_gradients(student.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        P.ema_update(teacher, student, 0.996)
        centres['cls'].update(t_logits[:, 0])
        if cfg.w_mim:
            centres['patch'].update(t_logits[:, 1:])
        return loss
    return step, student


@dataclass
class BenchPretrainConfig:
    """Time HandMIM pretraining steps (forward, backward, AdamW, EMA) on random views."""
    preset: str = engine.option('tiny', 'pretrain.py preset', choices=['tiny', 'base'])
    batch_size: int = engine.option(None, "images per step (default: the preset's)")
    device: str = engine.option('auto', 'where to run', choices=['auto', 'cpu', 'cuda'])
    amp: str = engine.option('off', 'mixed precision', choices=['off', 'bf16', 'fp16'])
    compile: bool = engine.option(False, 'torch.compile the student and teacher')
    steps: int = engine.option(5, 'timed steps (after 2 warm-up steps)')
    threads: int = engine.option(0, 'CPU threads (0: torch default)')
    w_cls: float = engine.option(1.0, 'weight of the [CLS] loss')
    w_pka: float = engine.option(1.0, 'weight of the PKA loss')
    w_mim: float = engine.option(1.0, 'weight of the patch MIM loss')
    w_pix: float = engine.option(1.0, 'weight of the pixel loss')


def main(argv=None):
    args = engine.config_from_cli(BenchPretrainConfig, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
                          else 'cpu')
    cfg, note = P.resolve_preset(P.PretrainConfig(preset=args.preset, batch_size=args.batch_size, w_cls=args.w_cls,
                                                  w_pka=args.w_pka, w_mim=args.w_mim, w_pix=args.w_pix),
                                 has_gpu=device.type == 'cuda')
    print(note, f'| device {device}, amp {args.amp}, compile {args.compile}, {torch.get_num_threads()} threads')
    step, student = make_step(cfg, device, args.amp, args.compile)
    for _ in range(2):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        step().item()   # .item() waits for the GPU
        times.append(time.perf_counter() - tic)
    best, median = min(times), sorted(times)[len(times) // 2]
    n_params = sum(p.numel() for p in student.backbone.parameters())
    print(f'{cfg.arch} depth {cfg.depth} ({n_params / 1e6:.1f} M backbone parameters), {cfg.img_size} px, '
          f'batch {cfg.batch_size}: {cfg.batch_size / median:.1f} img/s median, {cfg.batch_size / best:.1f} best '
          f'({median * 1000:.0f} ms/step)')
    if device.type == 'cuda':
        print(f'peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB')


if __name__ == '__main__':
    main()
