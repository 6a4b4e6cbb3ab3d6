"""Benchmark: forward + backward speed of the ViT on the CPU, per attention implementation.

model.py routes attention through `F.scaled_dot_product_attention` (SDPA). This script compares
  * sdpa       - the default dispatch (on CPU: the fused flash-attention kernel),
  * sdpa-math  - SDPA forced onto its unfused reference backend,
  * naive      - softmax(q k^T / sqrt(d)) v written out with matmuls (what most ViT code does),
twice, with the same weights and inputs:
  1. the attention op alone at the model's shape (B, H, T, d), forward + backward;
  2. one training step (forward + backward) of the whole ViT -> images/s.
The output difference between the paths is printed as a sanity check.

Run:  python scripts/bench_model.py                       # vit_small, 224 px, batch 16
      python scripts/bench_model.py --model vit_tiny --img_size 128 --batch 32 --threads 2
Timings on a shared machine are noisy. The implementations run in turn, repetition by repetition,
so that load changes hit all of them alike; the tables give the median and the best (min) time,
the best being the closest to an unloaded machine. Compare rows of one run, not across runs.
"""
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from engine import config_from_cli  # noqa: E402


@dataclass
class BenchConfig:
    """Forward+backward speed of a ViT preset on the CPU for each attention implementation."""
    model: str = field(default='vit_small', metadata={
        'help': 'ViT preset', 'choices': ['vit_tiny', 'vit_small', 'vit_base', 'vit_large']})
    img_size: int = field(default=224, metadata={'help': 'input resolution in pixels'})
    batch: int = field(default=16, metadata={'help': 'images per step'})
    steps: int = field(default=5, metadata={'help': 'timed whole-model steps per implementation'})
    op_reps: int = field(default=20, metadata={'help': 'timed repetitions of the attention op alone'})
    threads: int = field(default=0, metadata={'help': 'torch CPU threads; 0 keeps the default'})
    out: str = field(default='', metadata={'help': 'optional JSON file for the results'})


def naive_attention(q, k, v):
    """The textbook attention: materializes the (B, H, T, T) matrix."""
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, T, T)
    return attn @ v  # (B, H, T, d)


class NaiveAttention(M.Attention):
    """model.Attention with `naive_attention` in place of SDPA (same parameters)."""

    def forward(self, x, return_attn=False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d)
        return self.proj(naive_attention(q, k, v).transpose(1, 2).reshape(B, T, D))  # (B, T, D)


# name, attention class for the whole model, attention function for the op alone, context
VARIANTS = [('sdpa', M.Attention, F.scaled_dot_product_attention, contextlib.nullcontext),
            ('sdpa-math', M.Attention, F.scaled_dot_product_attention,
             lambda: sdpa_kernel(SDPBackend.MATH)),
            ('naive', NaiveAttention, naive_attention, contextlib.nullcontext)]


def timed(fn):
    """Seconds taken by fn() and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def op_step(attention, context, q, k, v, grad):
    q.grad = k.grad = v.grad = None
    with context():
        attention(q, k, v).backward(grad)
    return q.grad.sum().item()


def model_step(vit, images, probe, context):
    vit.zero_grad(set_to_none=True)
    with context():
        loss = (vit(images) @ probe).square().mean()  # (B, T) projections: depends on every feature
        loss.backward()
    return loss.item()


def round_robin(step_fns, reps):
    """{name: [seconds per repetition]}, {name: last result}; one untimed warm-up round first."""
    times, results = {name: [] for name in step_fns}, {}
    for rep in range(reps + 1):
        for name, fn in step_fns.items():
            seconds, results[name] = timed(fn)
            if rep:
                times[name].append(seconds)
    return times, results


def table(title, times, results, per_second):
    print(f'\n{title}')
    print(f'{"attention":<11}{"median ms":>10}{"best ms":>9}{per_second[0]:>12}{"vs best":>9}'
          f'{"|out - sdpa|":>14}')
    rows = [dict(attention=n, median_ms=1e3 * statistics.median(t), best_ms=1e3 * min(t),
                 per_s=per_second[1] / statistics.median(t), check=abs(results[n] - results['sdpa']))
            for n, t in times.items()]
    top = max(r['per_s'] for r in rows)
    for r in rows:
        print(f'{r["attention"]:<11}{r["median_ms"]:>10.1f}{r["best_ms"]:>9.1f}{r["per_s"]:>12.2f}'
              f'{r["per_s"] / top:>9.2f}{r["check"]:>14.2e}')
    return rows


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(json.dumps(dataclasses.asdict(cfg)), f'| torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads', flush=True)
    torch.manual_seed(0)
    vit = getattr(M, cfg.model)(img_size=cfg.img_size).train()
    B, H, d = cfg.batch, vit.num_heads, vit.embed_dim // vit.num_heads
    T = 1 + (cfg.img_size // vit.patch_size) ** 2

    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, d)
    op_fns = {name: (lambda f=fn, c=ctx: op_step(f, c, q, k, v, grad)) for name, _, fn, ctx in VARIANTS}
    op_rows = table(f'attention op alone, (B, H, T, d) = {(B, H, T, d)}, forward + backward',
                    *round_robin(op_fns, cfg.op_reps), per_second=('calls/s', 1))

    images = torch.randn(B, 3, cfg.img_size, cfg.img_size)
    probe = torch.randn(vit.embed_dim)

    def with_attention(cls, ctx):
        for block in vit.blocks:  # swap the forward in place: same parameters
            block.attn.__class__ = cls
        return model_step(vit, images, probe, ctx)

    model_fns = {name: (lambda c=cls, x=ctx: with_attention(c, x)) for name, cls, _, ctx in VARIANTS}
    model_rows = table(f'{cfg.model} at {cfg.img_size} px, batch {B}, forward + backward, fp32 CPU',
                       *round_robin(model_fns, cfg.steps), per_second=('images/s', B))
    if cfg.out:
        with open(cfg.out, 'w') as f:
            json.dump(dict(config=dataclasses.asdict(cfg), attention_op=op_rows, model=model_rows), f,
                      indent=1)


if __name__ == '__main__':
    main(config_from_cli(BenchConfig))
