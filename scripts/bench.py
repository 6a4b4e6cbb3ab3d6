"""One speed benchmark of the whole project: prints a table and writes it as JSON.

Sections (pick some with --only):
  pretrain   images/s of one HandMIM pretraining step (teacher forward, student forward + backward,
             AdamW, EMA; pretrain.py) on random tensors, per ViT preset
  finetune   images/s of one fine-tuning step (ViT + PyMAF regressor + MANO forward, mesh_losses,
             backward, AdamW; finetune.py) on a random labelled batch, per preset
  inference  images/s of the fine-tuned network in eval mode under torch.no_grad, per preset
  mano       poses/s of the MANO layer forward (mano.MANO, batch 1024); beside smplx's MANO, timed in turns,
             where smplx is installed (optional: never a dependency; scripts/bench_mano.py for more sizes)
  metrics    seconds of evaluate.score on 3960 samples x 778 vertices (FreiHAND's evaluation size)
  synth      images/s of synthetic rendering at 224 px (synthetic.synth)
  data       images/s of the pretraining augmentation (two 224 px views) through a DataLoader
Presets: tiny (both trainers' tiny preset: ViT-Ti, 6 blocks, 64 px, 8-px patches, 64/32/16-channel head with
heat maps: the CPU quick start), small (ViT-S/16, 224 px), base (ViT-B/16, 224 px: the paper's). Model rows give
GFLOP/img (forward FLOPs from model.model_summary; a training step counts as 3 forwards) and the TFLOP/s
achieved; on CUDA also the peak memory and MFU = achieved / peak FLOP/s, the peak being the dense bf16 one
whatever --amp (H100 SXM and H200 989, A100 312; --peak_tflops).
Each number is the median of --repeats timed repeats after --warmup untimed ones, in wall-clock time;
the JSON (--out) holds them with their units in the key names, and the machine they ran on.

Run:  python scripts/bench.py                                       # CPU, 2 threads, tiny and small
      python scripts/bench.py --quick --threads 1                   # seconds: checks that it all runs
      python scripts/bench.py --device cuda --presets base --amp bf16 --only pretrain,finetune,inference
"""
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'scripts')]
import data  # noqa: E402
import synthetic  # noqa: E402
import engine  # noqa: E402
import evaluate  # noqa: E402
import finetune as FT  # noqa: E402
import mano as mano_lib  # noqa: E402
import pretrain as P  # noqa: E402
from bench_eval import make_data  # noqa: E402
from bench_mano import random_official_sizes, smplx_forward, time_in_turns  # noqa: E402
from bench_pretrain import make_step  # noqa: E402
from model import build_regressor, model_summary  # noqa: E402

SECTIONS = ('pretrain', 'finetune', 'inference', 'mano', 'metrics', 'synth', 'data')
MODEL_SECTIONS = ('pretrain', 'finetune', 'inference')  # run once per preset
CPU = torch.device('cpu')  # metrics, synth and data run on the CPU whatever --device
# name -> pretrain.py preset (fills the projection head), backbone and default batch; both stages use the backbone
PRESETS = {
    'tiny': dict(preset='tiny', arch='vit_tiny', depth=6, img_size=64, patch_size=8, head_width=64, w_hand=5.0,
                 batch=32),
    'small': dict(preset='base', arch='vit_small', depth=12, img_size=224, patch_size=16, head_width=256, w_hand=0.0,
                  batch=32),  # iBOT ViT-S/16 head
    'base': dict(preset='base', arch='vit_base', depth=12, img_size=224, patch_size=16, head_width=256, w_hand=0.0,
                 batch=64),
}
# Dense bf16/fp16 tensor-core peak in TFLOP/s by device name, first match wins (spec sheets).
PEAK_TFLOPS = [('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0)]


@dataclass
class BenchConfig:
    """Speed of every stage of the project (training steps, inference, MANO, metrics, data)."""
    device: str = engine.option('auto', 'auto | cpu | cuda', choices=['auto', 'cpu', 'cuda'])
    amp: str = engine.option('off', 'mixed precision of the model sections', choices=['off', 'bf16', 'fp16'])
    threads: int = engine.option(2, 'torch CPU threads (torch.set_num_threads)')
    presets: str = engine.option('tiny,small', 'comma list of model presets: ' + ', '.join(PRESETS))
    only: str = engine.option('', 'comma list of sections to run (empty: all): ' + ', '.join(SECTIONS))
    quick: bool = engine.option(False, 'tiny sizes and 2 timed steps: checks that everything runs, in seconds')
    batch: int = engine.option(0, "images per step of the model sections (0: the preset's)")
    warmup: int = engine.option(2, 'untimed repeats before the timed ones')
    repeats: int = engine.option(5, 'timed repeats (the median is reported)')
    mano: str = engine.option('synthetic', "MANO model: 'synthetic' (1128 vertices), 'random' (random arrays "
                                      "of the official sizes, 778 vertices) or a MANO_RIGHT.pkl path")
    workers: int = engine.option(2, 'DataLoader worker processes of the data section')
    peak_tflops: float = engine.option(0.0, "the GPU's peak TFLOP/s for MFU (0: from a table of device names)")
    out: str = engine.option('bench.json', 'JSON file for the results (written atomically)')


# -------- timing helpers
def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def median_seconds(fn, repeats, warmup, device):
    """Median wall seconds of fn() over `repeats` calls after `warmup` untimed ones, and the peak GPU
    memory (GiB) of the timed calls (None on the CPU). The GPU is synchronized around every call."""
    gc.collect()  # models of earlier runs, if a reference cycle kept them, are freed before memory is measured
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == 'cuda' else None
    return statistics.median(times), peak


def forward_flops(model, img_size):
    """Forward FLOPs of one image (model.model_summary, its printed line swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return model_summary(model, img_size)['flops']


def model_row(cfg, spec, seconds, peak, flops_per_img, device):
    """The numbers of one model section for one preset: speed, FLOPs, and on CUDA memory and MFU."""
    img_s = spec['batch'] / seconds
    row = dict(arch=spec['arch'], depth=spec['depth'], img_size=spec['img_size'], batch=spec['batch'],
               img_per_s=img_s, ms_per_step=1000 * seconds, gflop_per_img=flops_per_img / 1e9,
               tflop_per_s=flops_per_img * img_s / 1e12)
    if device.type == 'cuda':
        row['peak_mem_gib'] = peak
        if cfg.peak_tflops:
            row['mfu'] = row['tflop_per_s'] / cfg.peak_tflops
    return row


def preset_spec(cfg, name):
    """A preset's backbone and batch; --quick keeps the width but cuts depth, image side and batch."""
    spec = dict(PRESETS[name])
    if cfg.quick:
        spec.update(depth=2, img_size=64, batch=2)
    if cfg.batch:
        spec['batch'] = cfg.batch
    return spec


# -------- model sections
def bench_pretrain(cfg, spec, device):
    head = dict(out_dim=256, head_hidden=256) if cfg.quick else {}
    pcfg, _ = P.resolve_preset(P.PretrainConfig(preset=spec['preset'], arch=spec['arch'], depth=spec['depth'],
                                                img_size=spec['img_size'], patch_size=spec['patch_size'],
                                                batch_size=spec['batch'], **head),
                               has_gpu=device.type == 'cuda')
    step, student = make_step(pcfg, device, cfg.amp)
    # per image: 2 global views, each a teacher forward and a student forward + backward (3 forwards)
    flops = 2 * (1 + 3) * forward_flops(student, pcfg.img_size)
    return model_row(cfg, spec, *median_seconds(step, cfg.repeats, cfg.warmup, device), flops, device)


def regressor(cfg, spec, device):
    """finetune.py's network (ViT + MeshRegressor + MANO layer) and a random batch shaped like its loader's."""
    torch.manual_seed(0)
    layer = mano_lib.MANO(random_official_sizes() if cfg.mano == 'random' else synthetic.mano_model(cfg.mano))
    B, S = spec['batch'], spec['img_size']
    pose, betas = torch.randn(B, 48) * 0.3, torch.randn(B, 10)
    with torch.no_grad():
        hand = layer(pose, betas)  # on the CPU, before the model (and the layer in it) moves to `device`
    model = build_regressor(dict(arch=spec['arch'], depth=spec['depth'], img_size=spec['img_size'],
                                patch_size=spec['patch_size'], head_width=spec['head_width'], n_iter=3,
                                drop_path=0.1, w_heatmap=1.0), layer).to(device)
    ahead = torch.tensor([0.0, 0.0, 0.5])  # labels are in the camera frame: put the hand half a metre ahead
    K = torch.tensor([[S, 0, S / 2], [0, S, S / 2], [0, 0, 1.0]]).repeat(B, 1, 1)
    batch = dict(image=torch.randn(B, 3, S, S), K=K, joints3d=hand.joints + ahead, verts=hand.vertices + ahead,
                 pose=pose, betas=betas, joints2d=torch.rand(B, 21, 2) * S, root=hand.joints[:, 0] + ahead,
                 scale=torch.full((B,), 0.1), **{k: torch.ones(B, dtype=torch.bool)
                                                 for k in ('has_3d', 'has_verts', 'has_mano')})
    return model, {k: v.to(device) for k, v in batch.items()}


def bench_finetune(cfg, spec, device):
    model, batch = regressor(cfg, spec, device)
    model.vit.mask_token.requires_grad_(False)  # as finetune.train: only masked pretraining uses it
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=1e-4)
    scaler = engine.make_scaler(cfg.amp, device)
    weights = dict(j3d=1.0, v3d=1.0, hand=spec['w_hand'], j2d=0.1, rot=1.0, beta=0.05, heatmap=1.0)

    def step():  # finetune.train's step without the schedules and logging
        with engine.autocast(device, cfg.amp):
            outputs = model(batch['image'])
        loss, _ = FT.mesh_losses(outputs, batch, weights)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    flops = 3 * forward_flops(model, spec['img_size'])
    return model_row(cfg, spec, *median_seconds(step, cfg.repeats, cfg.warmup, device), flops, device)


def bench_inference(cfg, spec, device):
    model, batch = regressor(cfg, spec, device)
    model.eval()

    @torch.no_grad()
    def forward():
        with engine.autocast(device, cfg.amp):
            return model(batch['image'])

    flops = forward_flops(model, spec['img_size'])
    return model_row(cfg, spec, *median_seconds(forward, cfg.repeats, cfg.warmup, device), flops, device)


# -------- MANO, metrics, data
def bench_mano(cfg, device, tmp=None):
    B = 256 if cfg.quick else 1024
    model = random_official_sizes() if cfg.mano == 'random' else synthetic.mano_model(cfg.mano)
    layer = mano_lib.MANO(model).to(device)
    pose, betas = torch.randn(B, 48, device=device) * 0.5, torch.randn(B, 10, device=device)
    with torch.no_grad():
        seconds, _ = median_seconds(lambda: layer(pose, betas), cfg.repeats, cfg.warmup, device)
        row = dict(batch=B, vertices=layer.num_verts, poses_per_s=B / seconds, ms_per_batch=1000 * seconds)
        theirs = smplx_forward(model) if device.type == 'cpu' else None
        if theirs is not None:  # in turns, so that load drifting over the run hits both alike
            cpu_pose, cpu_betas = pose.cpu(), betas.cpu()
            poses, times = time_in_turns({'ours': lambda: layer(cpu_pose, cpu_betas),
                                          'smplx': lambda: theirs(cpu_pose, cpu_betas)}, B, max(cfg.repeats, 3))
            row.update(turns_poses_per_s=poses / float(np.median(times['ours'])),
                       smplx_poses_per_s=poses / float(np.median(times['smplx'])),
                       smplx_ratio=float(np.median(times['smplx'] / times['ours'])))
    return row


def bench_metrics(cfg, device, tmp=None):
    n, V = (200, 778) if cfg.quick else (3960, 778)
    arrays = make_data(n, V)  # pred_xyz, pred_verts, gt_xyz, gt_verts (bench_eval.py)
    evaluate.score(*(a[:20] for a in arrays))  # warm-up on a slice: a full call takes seconds
    seconds, _ = median_seconds(lambda: evaluate.score(*arrays), min(cfg.repeats, 3), 0, CPU)
    return dict(samples=n, vertices=V, seconds=seconds, samples_per_s=n / seconds)


def synth_size(cfg):
    return (4 if cfg.quick else 32), 224


def bench_synth(cfg, device, tmp):
    n, size = synth_size(cfg)
    calls = itertools.count()  # a new folder per call
    render = lambda: synthetic.synth(os.path.join(tmp, f'synth{next(calls)}'), n, n_eval=0, img_size=size)  # noqa: E731
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
        seconds, _ = median_seconds(render, cfg.repeats, cfg.warmup, CPU)
    return dict(images=n, img_size=size, img_per_s=n / seconds)


def bench_data(cfg, device, tmp):
    n, size = synth_size(cfg)
    folder = os.path.join(tmp, 'synth0')
    if not os.path.isdir(folder):  # the synth section was skipped: render the images (untimed)
        with contextlib.redirect_stderr(io.StringIO()):
            synthetic.synth(folder, n, n_eval=0, img_size=size)
    batch, per_repeat, workers = (2, 2, 1) if cfg.quick else (16, 4, cfg.workers)
    dataset = data.ImageFolder(os.path.join(folder, 'training', 'rgb'), transform=data.PretrainAugment(size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)

    def batches():  # endless: epoch after epoch, the persistent workers stay up (until the loader is freed)
        while True:
            yield from loader
    it = batches()
    # a repeat = `per_repeat` batches; the first warm-up repeat includes the workers' start-up
    seconds, _ = median_seconds(lambda: [next(it) for _ in range(per_repeat)], cfg.repeats,
                                max(cfg.warmup, 1), CPU)
    return dict(batch=batch, workers=workers, img_size=size, img_per_s=batch * per_repeat / seconds)


BENCHES = dict(pretrain=bench_pretrain, finetune=bench_finetune, inference=bench_inference, mano=bench_mano,
               metrics=bench_metrics, synth=bench_synth, data=bench_data)


# -------- report
def machine_info(device):
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    return dict(torch=torch.__version__, python=platform.python_version(), device=str(device), device_name=name,
                threads=torch.get_num_threads(), cpu_count=os.cpu_count())


def table(results):
    """Rows of (section, setting, result, details) as fixed-width text."""
    rows = []
    for name in MODEL_SECTIONS:
        for preset, r in results.get(name, {}).items():
            extra = f", {r['peak_mem_gib']:.2f} GiB peak" if 'peak_mem_gib' in r else ''
            extra += f", MFU {100 * r['mfu']:.1f}%" if 'mfu' in r else ''
            rows.append((name, f"{preset}: {r['arch']} d{r['depth']} {r['img_size']}px b{r['batch']}",
                         f"{r['img_per_s']:,.1f} img/s", f"{r['ms_per_step']:.0f} ms/step, "
                         f"{r['gflop_per_img']:.2f} GFLOP/img, {r['tflop_per_s']:.3f} TFLOP/s{extra}"))
    if 'mano' in results:
        r = results['mano']
        rows.append(('mano', f"batch {r['batch']}, {r['vertices']} vertices", f"{r['poses_per_s']:,.0f} poses/s",
                     f"{r['ms_per_batch']:.1f} ms/batch" + (
                         f"; in turns with smplx: {r['turns_poses_per_s']:,.0f} vs {r['smplx_poses_per_s']:,.0f} "
                         f"poses/s, ratio {r['smplx_ratio']:.2f}" if 'smplx_ratio' in r
                         else '; smplx not installed (optional)')))
    if 'metrics' in results:
        r = results['metrics']
        rows.append(('metrics', f"{r['samples']} x {r['vertices']} vertices", f"{r['seconds']:.2f} s",
                     f"{r['samples_per_s']:,.0f} samples/s"))
    if 'synth' in results:
        r = results['synth']
        rows.append(('synth', f"{r['images']} images, {r['img_size']}px", f"{r['img_per_s']:.1f} img/s", ''))
    if 'data' in results:
        r = results['data']
        rows.append(('data', f"2 views {r['img_size']}px, b{r['batch']}, {r['workers']} workers",
                     f"{r['img_per_s']:.1f} img/s", 'DataLoader, steady state'))
    widths = [max(len(str(x)) for x in col) for col in zip(('section', 'setting', 'result', ''), *rows)]
    lines = [f"{'section':<{widths[0]}}  {'setting':<{widths[1]}}  {'result':>{widths[2]}}  details"]
    lines += [f'{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}'.rstrip() for a, b, c, d in rows]
    return '\n'.join(lines)


def main(argv=None):
    cfg = engine.config_from_cli(BenchConfig, argv)
    sections = [s for s in cfg.only.split(',') if s] or list(SECTIONS)
    presets = [p for p in cfg.presets.split(',') if p]
    unknown = sorted(set(sections) - set(SECTIONS)) + sorted(set(presets) - set(PRESETS))
    if unknown:
        sys.exit(f'error: unknown section or preset {unknown}; sections: {SECTIONS}, presets: {tuple(PRESETS)}')
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda was asked for but torch sees no GPU')
    device = torch.device('cuda' if cfg.device != 'cpu' and torch.cuda.is_available() else 'cpu')
    torch.set_num_threads(cfg.threads)
    if cfg.quick:
        cfg.warmup, cfg.repeats = 1, 2
    if device.type == 'cuda' and not cfg.peak_tflops:
        name = torch.cuda.get_device_name(device)
        cfg.peak_tflops = next((t for key, t in PEAK_TFLOPS if key in name), 0.0)
        if not cfg.peak_tflops:
            print(f'{name}: peak FLOP/s unknown, no MFU (pass --peak_tflops)')

    results = dict(machine=machine_info(device), config=asdict(cfg))
    print(f"torch {torch.__version__}, {results['machine']['device_name']} ({device}), amp {cfg.amp}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs{', quick' if cfg.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            tic, fn = time.perf_counter(), BENCHES[section]
            if section in MODEL_SECTIONS:
                results[section] = {p: fn(cfg, preset_spec(cfg, p), device) for p in presets}
            else:
                results[section] = fn(cfg, device, tmp)
            print(f'{section}: done in {time.perf_counter() - tic:.1f} s', flush=True)
    print(table(results))
    engine.write_atomic(cfg.out, json.dumps(results, indent=1))
    print(f'results written to {cfg.out}')
    return results


if __name__ == '__main__':
    main()
