r"""HandMIM ablation at small scale: fine-tuning from HandMIM pretraining vs from scratch, and without each loss.

The paper's claims (HandMIM, Liu et al., arXiv 2307.16061), checked here on synthetic hands: HandMIM pretraining on
unlabeled hand images makes the fine-tuned mesh regressor better than one trained from scratch, and each of its
three losses (pseudo keypoint alignment, patch MIM distillation, masked pixel reconstruction) contributes.
Semi-supervised setting: one synthetic set (synthetic.py) is rendered once; all its training images are the
UNLABELED pretraining pool, the first --n_labelled of them (with labels) the fine-tuning set, and its evaluation
split, seen by neither stage, is scored with the official metrics (evaluate.score_files, as `evaluate.py --score`).
Runs, every fine-tuning run with the same recipe and budget (only --pretrained and --seed differ):
  mean_hand  MANO mean pose and zero betas for every image (the baseline of scripts/quickstart.sh)
  scratch    no pretraining                                   (fine-tuning seeds 0 .. --seeds - 1)
  full       HandMIM, all losses ([CLS] + PKA + MIM + pixels)  (--seeds)
  no_pka / no_mim / no_pix   HandMIM with --w_pka / --w_mim / --w_pix 0   (--ablation_seeds)
Each pretraining variant is pretrained once (seed 0); finetune.py keeps the epoch with the best validation score on a
held-out part of the labelled set (best.pth), which is what gets scored.

Run (from the repository root):
    python scripts/ablation.py                # CPU sizes (PROFILES['cpu']), 60 min on 2 cores (the README's table)
    python scripts/ablation.py --gpu          # one GPU: cuda, bf16, 224 px ViT-S/16, larger sets (PROFILES['gpu'])
    python scripts/ablation.py --smoke --out runs/smoke --table runs/smoke/ablation.md \
        --json runs/smoke/ablation.json --plot runs/smoke/ablation.png   # ~30 s: 24 images, one step per stage
Ctrl-C stops it; the same command again skips finished runs (their result.json exists) and resumes the interrupted
one from its checkpoint; --force re-runs every run. Each stage's output streams to OUT/logs/<run>.log. Writes
assets/ablation.md (table), assets/ablation.json (every run) and assets/ablation.png (PA-MPVPE bars), refreshed after
every finished run.
"""
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import synthetic  # noqa: E402
import engine  # noqa: E402
import evaluate  # noqa: E402
import model as M  # noqa: E402

# variant -> (table label, pretrain.py flags; None = no pretraining). The mean hand is always scored.
VARIANTS = {
    'scratch': ('scratch (no pretraining)', None),
    'full': ('HandMIM, all losses', []),
    'no_pka': ('HandMIM without PKA (--w_pka 0)', ['--w_pka', '0']),
    'no_mim': ('HandMIM without patch MIM (--w_mim 0)', ['--w_mim', '0']),
    'no_pix': ('HandMIM without pixel loss (--w_pix 0)', ['--w_pix', '0']),
}
LABELS = {'mean_hand': 'mean hand (MANO mean pose, zero betas)', **{k: v[0] for k, v in VARIANTS.items()}}
MAIN = ('scratch', 'full')  # fine-tuned with --seeds seeds; the others with --ablation_seeds
# (key in result['metrics'], column title, decimals)
METRICS = (('pa_mpjpe_mm', 'PA-MPJPE (mm) ↓', 2), ('pa_mpvpe_mm', 'PA-MPVPE (mm) ↓', 2),
           ('f5', 'F@5 ↑', 3), ('f15', 'F@15 ↑', 3), ('st_mpjpe_mm', 'ST-MPJPE (mm) ↓', 1))
LABEL_FILES = ('K', 'mano', 'xyz', 'verts', 'scale')  # FreiHAND's training_*/evaluation_*.json

# Sizes and recipe per profile; a flag given on the command line wins. --smoke overrides --gpu's sizes only.
PROFILES = {
    'cpu': dict(n_unlabeled=6000, n_labelled=1500, n_eval=400, img_size=64, patch_size=8, arch='vit_tiny', depth=6,
                pretrain_epochs=3, finetune_epochs=8, batch_size=32, workers=2, max_steps=0, device='cpu',
                amp='off'),
    'gpu': dict(n_unlabeled=20000, n_labelled=4000, n_eval=1000, img_size=224, patch_size=16, arch='vit_small',
                depth=12, pretrain_epochs=30, finetune_epochs=30, batch_size=64, workers=8, device='cuda',
                amp='bf16'),
    'smoke': dict(n_unlabeled=24, n_labelled=12, n_eval=4, depth=2, pretrain_epochs=1, finetune_epochs=1,
                  batch_size=4, workers=0, max_steps=1),
}


def sized(help, key, **metadata):
    """A profile-dependent flag: default None, filled by `resolve`; the help lists the profiles' values."""
    values = ' | '.join(f'{"default" if p == "cpu" else "--" + p} {PROFILES[p][key]}' for p in PROFILES
                        if key in PROFILES[p])
    return engine.option(None, f'{help} [{values}]', **metadata)


@dataclass
class AblationConfig:
    """HandMIM ablation at small scale: scratch vs HandMIM pretraining vs HandMIM without each of its losses."""
    out: str = engine.option('runs/ablation', 'working folder: data, pretraining and fine-tuning runs, logs, results')
    table: str = engine.option('assets/ablation.md', 'markdown table of mean +- std per variant')
    json: str = engine.option('assets/ablation.json', 'every per-run result, the table rows and the settings')
    plot: str = engine.option('assets/ablation.png', 'bar chart of PA-MPVPE per variant (pillow)')
    variants: str = engine.option(','.join(VARIANTS), 'comma list of variants to run (the mean hand is always scored)')
    seeds: int = engine.option(3, 'fine-tuning seeds (0, 1, ...) of scratch and full')
    ablation_seeds: int = engine.option(1, 'fine-tuning seeds of no_pka, no_mim and no_pix')
    gpu: bool = engine.option(False, "scale up (PROFILES['gpu']): --device cuda --amp bf16, 224 px, patch 16, vit_small "
                                "depth 12 (pretrain.py's base head), 20000/4000/1000 images, 30 + 30 epochs, batch 64")
    smoke: bool = engine.option(False, 'tiny everything for the test: 24 images, 2 blocks, one step per stage')
    force: bool = engine.option(False, 're-run every run, even those with a result (the data set is reused if it matches)')
    n_unlabeled: int = sized('training images rendered: the unlabeled pretraining pool', 'n_unlabeled')
    n_labelled: int = sized('the first this many of them, with labels, are the fine-tuning set', 'n_labelled')
    n_eval: int = sized('held-out evaluation images (scored; never trained on)', 'n_eval')
    img_size: int = sized('image and crop side in pixels', 'img_size')
    patch_size: int = sized('ViT patch size', 'patch_size')
    arch: str = sized('ViT of both stages', 'arch', choices=list(M.ARCHS))
    depth: int = sized('ViT blocks', 'depth')
    pretrain_epochs: int = sized('pretraining epochs (every pretraining variant)', 'pretrain_epochs')
    finetune_epochs: int = sized('fine-tuning epochs (every run: equal budget)', 'finetune_epochs')
    batch_size: int = sized('batch of both stages', 'batch_size')
    max_steps: int = sized('stop each stage after this many steps (0 = all)', 'max_steps')
    workers: int = sized('data-loading workers of both stages', 'workers')
    device: str = sized('both stages and scoring', 'device', choices=['cpu', 'cuda'])
    amp: str = sized('mixed precision of both stages and scoring', 'amp', choices=['off', 'bf16', 'fp16'])
    threads: int = engine.option(0, 'torch threads: OMP_NUM_THREADS / MKL_NUM_THREADS of the stages, set_num_threads of '
                               'rendering and scoring (0: leave as is)')
    mano: str = engine.option('synthetic', "MANO model: 'synthetic' or the path of MANO_RIGHT.pkl")
    pretrain_args: str = engine.option('', 'extra pretrain.py flags, verbatim (shlex-split, after ours: they win)')
    finetune_args: str = engine.option('', 'extra finetune.py flags, verbatim (shlex-split, after ours: they win)')


# Settings that change results: a working folder holds runs of one setting only (see check_settings).
RECIPE = ('n_unlabeled', 'n_labelled', 'n_eval', 'img_size', 'patch_size', 'arch', 'depth', 'pretrain_epochs',
          'finetune_epochs', 'batch_size', 'max_steps', 'device', 'amp', 'mano', 'pretrain_args', 'finetune_args')


def resolve(cfg):
    """Fill the flags left at None from the profile (cpu, then --gpu, then --smoke) and check the values."""
    profile = {**PROFILES['cpu'], **(PROFILES['gpu'] if cfg.gpu else {}), **(PROFILES['smoke'] if cfg.smoke else {})}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in profile.items() if getattr(cfg, k) is None})
    unknown = set(variant_list(cfg)) - set(VARIANTS)
    if unknown:
        raise ValueError(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not 1 <= cfg.n_labelled <= cfg.n_unlabeled:
        raise ValueError(f'--n_labelled must be between 1 and --n_unlabeled ({cfg.n_unlabeled}), got {cfg.n_labelled}')
    if cfg.seeds < 1 or cfg.ablation_seeds < 1 or cfg.n_eval < 1:
        raise ValueError('--seeds, --ablation_seeds and --n_eval must be at least 1')
    return cfg


def variant_list(cfg):
    return [v.strip() for v in cfg.variants.split(',') if v.strip() and v.strip() != 'mean_hand']


def schedule(variants, seeds, ablation_seeds):
    """(variant, seed) fine-tuning runs in the order they run: the headline pair (scratch, full) seed by seed
    first, so that an interrupted ablation has already answered the main question, then the loss ablations."""
    main = [(v, s) for s in range(seeds) for v in MAIN if v in variants]
    return main + [(v, s) for v in VARIANTS if v in variants and v not in MAIN for s in range(ablation_seeds)]


# ----------------------------------------------------------------------------------------------------
# Data: one rendered pool, a labelled subset folder in the FreiHAND layout

def read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    """Atomically (engine.write_atomic): an interrupted write never leaves a half result that would be skipped."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    engine.write_atomic(path, json.dumps(obj, indent=1))


def link_or_copy(src, dst):
    """Hard link (no extra disk for thousands of images), a copy where the file system refuses."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def first_entries(text, n):
    """The JSON text of the first n entries of the JSON list `text`, byte for byte. Entries are decoded one at a
    time, so an annotation file of thousands of meshes never becomes Python objects all at once."""
    decoder, end = json.JSONDecoder(), text.index('[') + 1
    for _ in range(n):
        while text[end] in ' \t\r\n,':
            end += 1
        _, end = decoder.raw_decode(text, end)
    return text[:end] + ']'


def make_pool(cfg, pool):
    """Render the synthetic set once -> seconds it took (then or before). Rendering is deterministic (sample i of
    a split draws from the seeds [0, split, i]): a pool with the same settings is reused, even with --force."""
    want = dict(n=cfg.n_unlabeled, n_eval=cfg.n_eval, img_size=cfg.img_size, mano=cfg.mano)
    done = read_json(os.path.join(pool, 'ablation_data.json'), {})
    if done.get('settings') == want:
        return done['wall_s']
    shutil.rmtree(pool, ignore_errors=True)
    tic = time.perf_counter()
    synthetic.synth(pool, cfg.n_unlabeled, mano=cfg.mano, n_eval=cfg.n_eval, img_size=cfg.img_size)
    wall = time.perf_counter() - tic
    write_json(dict(settings=want, wall_s=wall), os.path.join(pool, 'ablation_data.json'))  # written last: complete
    print(f'data: {cfg.n_unlabeled} + {cfg.n_eval} synthetic hands at {cfg.img_size} px in {pool} '
          f'({wall / 60:.1f} min)', flush=True)
    return wall


def make_labelled(pool, dst, n):
    """A FreiHAND-layout folder with the first n training samples of `pool` (images hard-linked, training_*.json
    sliced) and the pool's whole evaluation split, so that finetune.py and the scoring read one root. Rebuilt
    when n or the pool (ablation_data.json) changed."""
    want = dict(n=n, pool=read_json(os.path.join(pool, 'ablation_data.json')))
    if read_json(os.path.join(dst, 'ablation_subset.json')) == want:
        return
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(os.path.join(dst, 'training', 'rgb'))
    for i in range(n):  # FreiHAND reads image j + v n as version v of sample j: only the first n may exist
        name = os.path.join('training', 'rgb', '%08d.jpg' % i)
        link_or_copy(os.path.join(pool, name), os.path.join(dst, name))
    for key in LABEL_FILES:
        with open(os.path.join(pool, f'training_{key}.json')) as f:
            text = first_entries(f.read(), n)
        with open(os.path.join(dst, f'training_{key}.json'), 'w') as f:
            f.write(text)
        link_or_copy(os.path.join(pool, f'evaluation_{key}.json'), os.path.join(dst, f'evaluation_{key}.json'))
    shutil.copytree(os.path.join(pool, 'evaluation'), os.path.join(dst, 'evaluation'), copy_function=link_or_copy)
    shutil.copy2(os.path.join(pool, 'synth_config.json'), dst)  # the MANO model the labels were made with
    write_json(want, os.path.join(dst, 'ablation_subset.json'))


# ----------------------------------------------------------------------------------------------------
# Stages as logged subprocesses, scoring in process

def portable(argv, out):
    """A command as stored in JSON: the working folder as $OUT (no path of this machine in the results)."""
    return ['$OUT' + a[len(out):] if a == out or a.startswith(out + os.sep) else a for a in argv]


def tail(path, lines=15):
    with open(path, errors='replace') as f:
        return ''.join(f.readlines()[-lines:])


def run_logged(argv, log_path, threads, resume):
    """Run `python ROOT/argv[0] argv[1:]` with its output streaming to `log_path` -> wall seconds of the run,
    earlier interrupted attempts included (`resume`; kept beside the log). Ctrl-C reaches the child too (same
    process group): it saves a checkpoint and exits with 130, which we wait for and pass on as KeyboardInterrupt."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.setdefault('TQDM_MININTERVAL', '5')  # a progress update every 5 s in the log, not every step
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    spent_path = os.path.splitext(log_path)[0] + '.wall.json'
    spent, tic = read_json(spent_path, 0.0) if resume else 0.0, time.perf_counter()
    with open(log_path, 'a' if resume else 'w') as log:
        log.write('$ python ' + shlex.join(argv) + '\n')
        log.flush()
        child = subprocess.Popen([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            code = child.wait()
        finally:
            write_json(spent + time.perf_counter() - tic, spent_path)
    if code == 130:  # stopped by a signal, checkpoint saved (pretrain.py and finetune.py)
        raise KeyboardInterrupt
    if code:
        raise RuntimeError(f'{argv[0]} exited with code {code}; the end of {log_path}:\n{tail(log_path)}')
    return spent + time.perf_counter() - tic


def start_or_resume(run_dir, argv, cfg):
    """-> (argv, resumed). An interrupted run of this exact command continues from its checkpoint.pth (both
    stages resume exactly); otherwise the run starts afresh in an emptied folder."""
    ckpt, cmd = os.path.join(run_dir, 'checkpoint.pth'), os.path.join(run_dir, 'command.json')
    if not cfg.force and os.path.isfile(ckpt) and read_json(cmd) == portable(argv, cfg.out):
        return argv + ['--resume', ckpt], True
    shutil.rmtree(run_dir, ignore_errors=True)
    write_json(portable(argv, cfg.out), cmd)
    return argv, False


def checkpoint_step(path):
    return int(engine.load_checkpoint(path)['step'])


def pretrain_command(cfg, variant, pool, run_dir):
    """pretrain.py flags of a variant: the same for all but the loss weights (seed 0, one run per variant)."""
    E, preset = cfg.pretrain_epochs, 'tiny' if cfg.arch == 'vit_tiny' else 'base'
    argv = ['pretrain.py', '--data', os.path.join(pool, 'training', 'rgb'), '--output_dir', run_dir,
            '--preset', preset, '--arch', cfg.arch, '--depth', str(cfg.depth), '--img_size', str(cfg.img_size),
            '--patch_size', str(cfg.patch_size), '--epochs', str(E), '--batch_size', str(cfg.batch_size),
            '--workers', str(cfg.workers), '--seed', '0', '--device', cfg.device, '--amp', cfg.amp,
            '--max_steps', str(cfg.max_steps)]
    if preset == 'base':  # its warm-ups (10 and 30 of 100 epochs) scaled to our epochs
        argv += ['--warmup_epochs', str(max(1, E // 10)), '--warmup_teacher_temp_epochs', str(max(1, 3 * E // 10))]
    return argv + VARIANTS[variant][1] + shlex.split(cfg.pretrain_args)


def finetune_command(cfg, root, seed, run_dir, backbone):
    """finetune.py flags: identical for every run (equal budget) but --pretrained and --seed."""
    argv = ['finetune.py', '--data', root, '--mano', cfg.mano, '--output_dir', run_dir, '--arch', cfg.arch,
            '--depth', str(cfg.depth), '--img_size', str(cfg.img_size), '--patch_size', str(cfg.patch_size),
            '--epochs', str(cfg.finetune_epochs), '--batch_size', str(cfg.batch_size), '--workers', str(cfg.workers),
            '--seed', str(seed), '--device', cfg.device, '--amp', cfg.amp, '--max_steps', str(cfg.max_steps)]
    return argv + (['--pretrained', backbone] if backbone else []) + shlex.split(cfg.finetune_args)


def headline(scores):
    """The four reported numbers from evaluate.score's dict: aligned errors in mm, aligned F-scores."""
    return dict(pa_mpjpe_mm=1000 * scores['pa_mpjpe'], pa_mpvpe_mm=1000 * scores['pa_mpvpe'],
                f5=scores['pa_f5'], f15=scores['pa_f15'], st_mpjpe_mm=1000 * scores['st_mpjpe'])


def score_submission(xyz, verts, root, out_dir):
    """Write the official pred.json and score it exactly as `evaluate.py --score` does -> evaluate.score dict."""
    pred = evaluate.write_submission(xyz, verts, out_dir)
    scores, _, _ = evaluate.score_files(pred, root)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in scores.items()}  # JSON has no NaN


def score_mean_hand(cfg, root, out_dir):
    """The mean hand for every evaluation image (identity global rotation: Procrustes finds the best one)."""
    layer = data.resolve_mano(cfg.mano)
    with torch.no_grad():
        mean = layer(pose=torch.cat([torch.zeros(1, 3), layer.hands_mean[None]], 1))
    tile = lambda a: np.repeat(a.numpy(), cfg.n_eval, axis=0)  # noqa: E731
    return score_submission(tile(mean.joints), tile(mean.vertices), root, out_dir)


def score_checkpoint(cfg, path, root, out_dir):
    model, ft = evaluate.load_finetuned(path, cfg.device)
    evaluation = data.FreiHAND(root, 'evaluation', ft['img_size'], mano=ft['mano'])
    loader = torch.utils.data.DataLoader(evaluation, batch_size=cfg.batch_size, num_workers=cfg.workers)
    return score_submission(*evaluate.predict(model, loader, cfg.device, cfg.amp), root, out_dir)


def minutes(result):
    return sum(v for v in result['wall_s'].values()) / 60


def announce(result, skipped):
    m, note = result['metrics'], ' (done before)' if skipped else ''
    print(f"{result['run']:16s} PA-MPJPE {m['pa_mpjpe_mm']:6.2f} mm | PA-MPVPE {m['pa_mpvpe_mm']:6.2f} mm | "
          f"F@5 {m['f5']:.3f} | F@15 {m['f15']:.3f} | {minutes(result):.1f} min{note}", flush=True)


def mean_hand_run(cfg, paths):
    path = os.path.join(cfg.out, 'mean_hand', 'result.json')
    result = None if cfg.force else read_json(path)
    skipped = result is not None
    if not skipped:
        tic = time.perf_counter()
        scores = score_mean_hand(cfg, paths['labelled'], os.path.join(cfg.out, 'mean_hand', 'submission'))
        result = dict(run='mean_hand', variant='mean_hand', seed=None, metrics=headline(scores), scores=scores,
                      wall_s=dict(score=time.perf_counter() - tic), config=dict(mano=cfg.mano, n_eval=cfg.n_eval))
        write_json(result, path)
    announce(result, skipped)
    return result


def pretrain_run(cfg, variant, paths):
    """Pretrain a variant once (seed 0) -> its result dict (backbone path, steps, wall time, command)."""
    run_dir = os.path.join(cfg.out, 'pretrain', variant)
    path = os.path.join(run_dir, 'result.json')
    result = None if cfg.force else read_json(path)
    skipped = result is not None
    if not skipped:
        command = pretrain_command(cfg, variant, paths['pool'], run_dir)
        argv, resumed = start_or_resume(run_dir, command, cfg)
        wall = run_logged(argv, os.path.join(cfg.out, 'logs', f'pretrain_{variant}.log'), cfg.threads, resumed)
        result = dict(run=f'pretrain_{variant}', variant=variant, wall_s=dict(pretrain=wall),
                      steps=checkpoint_step(os.path.join(run_dir, 'checkpoint.pth')), config=portable(command, cfg.out))
        write_json(result, path)
    print(f"{result['run']:16s} {result['steps']} steps | {minutes(result):.1f} min"
          + (' (done before)' if skipped else ''), flush=True)
    return dict(result, backbone=os.path.join(run_dir, 'backbone.pth'))


def finetune_run(cfg, variant, seed, pre, paths):
    """Fine-tune one (variant, seed) and score its best.pth on the evaluation split -> result dict."""
    name = f'{variant}_seed{seed}'
    run_dir = os.path.join(cfg.out, 'finetune', name)
    path = os.path.join(run_dir, 'result.json')
    result = None if cfg.force else read_json(path)
    if result is not None:
        announce(result, skipped=True)
        return result
    command = finetune_command(cfg, paths['labelled'], seed, run_dir, pre and pre['backbone'])
    argv, resumed = start_or_resume(run_dir, command, cfg)
    wall = run_logged(argv, os.path.join(cfg.out, 'logs', f'finetune_{name}.log'), cfg.threads, resumed)
    tic = time.perf_counter()
    scores = score_checkpoint(cfg, os.path.join(run_dir, 'best.pth'), paths['labelled'],
                              os.path.join(run_dir, 'submission'))
    result = dict(run=name, variant=variant, seed=seed, metrics=headline(scores), scores=scores,
                  steps=checkpoint_step(os.path.join(run_dir, 'checkpoint.pth')),
                  wall_s=dict(finetune=wall, score=time.perf_counter() - tic),
                  pretrain=pre and dict(steps=pre['steps'], wall_s=pre['wall_s']['pretrain']),
                  config=dict(finetune=portable(command, cfg.out), pretrain=pre and pre['config'],
                              **{k: getattr(cfg, k) for k in RECIPE}))
    write_json(result, path)
    announce(result, skipped=False)
    return result


def check_settings(cfg):
    """A working folder holds runs of one setting: refuse to mix in runs made with other sizes or recipes."""
    path, want = os.path.join(cfg.out, 'settings.json'), {k: getattr(cfg, k) for k in RECIPE}
    have = read_json(path)
    diff = [f'{k}: {have.get(k)!r} there, {v!r} now' for k, v in want.items() if have and have.get(k) != v]
    if diff and not cfg.force:
        raise ValueError(f'{cfg.out} holds runs made with other settings ({"; ".join(diff)}): pass --force to '
                         f're-run them all there, or give another --out')
    write_json(want, path)


# ----------------------------------------------------------------------------------------------------
# Report: pure functions of the results

def aggregate(results):
    """Per-run results -> one row per variant (mean hand, scratch, full, ablations; unknown ones after): its
    seeds and, per metric, the values, their mean and sample std (ddof = 1; None for a single run)."""
    groups = {}
    for r in results:
        groups.setdefault(r['variant'], []).append(r)
    order = [v for v in LABELS if v in groups] + [v for v in groups if v not in LABELS]
    rows = []
    for variant in order:
        runs = sorted(groups[variant], key=lambda r: -1 if r.get('seed') is None else r['seed'])
        row = dict(variant=variant, label=LABELS.get(variant, variant), seeds=[r.get('seed') for r in runs])
        for key, _, _ in METRICS:
            x = np.array([r['metrics'][key] for r in runs], dtype=np.float64)
            row[key] = dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else None,
                            values=x.tolist())
        rows.append(row)
    return rows


def mean_std(stat, decimals):
    if stat['std'] is None:
        return f"{stat['mean']:.{decimals}f}"
    return f"{stat['mean']:.{decimals}f} ± {stat['std']:.{decimals}f}"


def markdown(rows, meta):
    """The table and its caption. `meta`: n_unlabeled, n_labelled, n_eval, img_size, patch_size, arch, depth,
    batch_size, pretrain_steps, finetune_steps (lists of the step counts seen), processor, threads, device,
    wall_min."""
    seeds = lambda row: '—' if row['seeds'] == [None] else str(len(row['seeds']))  # noqa: E731
    steps = lambda s: '/'.join(map(str, s)) or '—'  # noqa: E731
    lines = ['| variant | seeds | ' + ' | '.join(title for _, title, _ in METRICS) + ' |',
             '|---|---:|' + '---:|' * len(METRICS)]
    lines += [f"| {row['label']} | {seeds(row)} | " + ' | '.join(mean_std(row[k], d) for k, _, d in METRICS) + ' |'
              for row in rows]
    m = meta
    return '\n'.join([
        '### HandMIM ablation on synthetic hands (held-out evaluation split)', '', *lines, '',
        'Mean ± sample standard deviation (ddof = 1) over fine-tuning seeds; a single value where a variant has one '
        'run. Each pretraining variant is pretrained once (seed 0); every fine-tuning run uses the same recipe and '
        'number of steps. PA = after Procrustes alignment; F@5 / F@15 = aligned F-scores at 5 / 15 mm '
        '(evaluate.score, the official FreiHAND metrics).', '',
        f"Data: {m['n_unlabeled']} unlabeled synthetic training images (pretraining), the first {m['n_labelled']} "
        f"of them with labels (fine-tuning; finetune.py holds out a part to pick the best epoch), {m['n_eval']} "
        f"held-out evaluation images seen by neither stage; "
        f"{m['img_size']} px, patch {m['patch_size']}, {m['arch']} depth {m['depth']}, batch {m['batch_size']}; "
        f"steps: pretraining {steps(m['pretrain_steps'])}, fine-tuning {steps(m['finetune_steps'])}. "
        f"Hardware: {m['processor']}, {m['threads']} torch threads, device {m['device']}. "
        f"Total wall time {m['wall_min']:.1f} min.", ''])


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _nice_step(span, ticks=5):
    """A round tick spacing (1, 2 or 5 x 10^k) giving about `ticks` ticks over `span`."""
    raw = span / ticks
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def plot(rows, path, size=(800, 450)):
    """Horizontal bars of mean PA-MPVPE per variant with ±std whiskers and a dot per seed; the mean hand as a
    dashed line. Pillow only (PIL's default font)."""
    W, H = size
    bars = [r for r in rows if r['variant'] != 'mean_hand']
    base = next((r['pa_mpvpe_mm']['mean'] for r in rows if r['variant'] == 'mean_hand'), None)
    img = Image.new('RGB', size, 'white')
    draw, font, small = ImageDraw.Draw(img), _font(15), _font(13)
    left, right, top, bottom = 290, W - 30, 55, H - 55
    draw.text((W // 2, 18), 'PA-MPVPE on the held-out evaluation split (mm, lower is better)', fill='black',
              font=font, anchor='mm')
    ends = [v for r in bars for v in r['pa_mpvpe_mm']['values']]
    ends += [r['pa_mpvpe_mm']['mean'] + (r['pa_mpvpe_mm']['std'] or 0) for r in bars] + ([base] if base else [])
    step = _nice_step(max(ends + [1e-3]))
    x_max = step * math.ceil(1.22 * max(ends + [1e-3]) / step)  # room for the value labels
    x = lambda v: left + (right - left) * v / x_max  # noqa: E731
    for k in range(int(round(x_max / step)) + 1):  # vertical grid and tick labels
        v = k * step
        draw.line([(x(v), top), (x(v), bottom)], fill=(225, 225, 225))
        draw.text((x(v), bottom + 6), f'{v:g}', fill='black', font=small, anchor='mt')
    draw.line([(left, bottom), (right, bottom)], fill='black')
    draw.text(((left + right) // 2, H - 14), 'PA-MPVPE (mm); bar: mean, whiskers: ± std (ddof = 1), dots: seeds',
              fill='black', font=small, anchor='mm')
    slot = (bottom - top) / max(1, len(bars))
    colours = dict(scratch=(150, 150, 150), full=(40, 100, 200))
    for i, row in enumerate(bars):
        stat, cy = row['pa_mpvpe_mm'], top + (i + 0.5) * slot
        half = min(18, 0.32 * slot)
        draw.rectangle([x(0), cy - half, x(stat['mean']), cy + half], fill=colours.get(row['variant'],
                                                                                       (130, 170, 225)))
        draw.text((left - 10, cy), row['label'], fill='black', font=small, anchor='rm')
        end = stat['mean'] + (stat['std'] or 0)
        if stat['std']:
            lo = max(0.0, stat['mean'] - stat['std'])
            draw.line([(x(lo), cy), (x(end), cy)], fill='black', width=2)
            for v in (lo, end):
                draw.line([(x(v), cy - half / 2), (x(v), cy + half / 2)], fill='black', width=2)
        n = len(stat['values'])
        for j, v in enumerate(stat['values']):  # spread vertically so that equal values stay visible
            dy = (j - (n - 1) / 2) * min(6, 1.6 * half / max(1, n))
            draw.ellipse([x(v) - 3.5, cy + dy - 3.5, x(v) + 3.5, cy + dy + 3.5], fill='white', outline='black')
        draw.text((x(max([end] + stat['values'])) + 8, cy), mean_std(stat, 2), fill='black', font=small,
                  anchor='lm')
    if base is not None:  # dashed vertical line: the mean hand
        for y0 in range(top, bottom, 10):
            draw.line([(x(base), y0), (x(base), min(y0 + 5, bottom))], fill=(200, 30, 30), width=2)
        draw.text((x(base), top - 6), f'mean hand {base:.2f} mm', fill=(200, 30, 30), font=small, anchor='mb')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def hardware(cfg):
    gpu = cfg.device == 'cuda' and torch.cuda.is_available()
    return dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                threads=cfg.threads or torch.get_num_threads(), torch=torch.__version__,
                device=torch.cuda.get_device_name(0) if gpu else cfg.device)


def report(cfg, runs, pretrained, data_wall):
    """Rewrite the table, the JSON and the plot from the runs so far -> the markdown text."""
    rows = aggregate(runs)
    meta = dict({k: getattr(cfg, k) for k in RECIPE}, **hardware(cfg),
                pretrain_steps=sorted({p['steps'] for p in pretrained}),
                finetune_steps=sorted({r['steps'] for r in runs if 'steps' in r}),
                wall_min=(data_wall + sum(minutes(r) * 60 for r in [*runs, *pretrained])) / 60)
    text = markdown(rows, meta)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.table)), exist_ok=True)
    with open(cfg.table, 'w') as f:
        f.write(text)
    write_json(dict(meta=meta, std='sample (ddof = 1); null for one run', rows=rows, runs=runs,
                    pretraining=[{k: v for k, v in p.items() if k != 'backbone'} for p in pretrained]), cfg.json)
    plot(rows, cfg.plot)
    return text


def run(cfg):
    cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_settings(cfg)
    print('ablation: ' + json.dumps(dataclasses.asdict(cfg)), flush=True)
    paths = dict(pool=os.path.join(cfg.out, 'hands'), labelled=os.path.join(cfg.out, 'labelled'))
    data_wall = make_pool(cfg, paths['pool'])
    make_labelled(paths['pool'], paths['labelled'], cfg.n_labelled)
    runs, pretrained = [mean_hand_run(cfg, paths)], {}
    text = report(cfg, runs, [], data_wall)
    for variant, seed in schedule(variant_list(cfg), cfg.seeds, cfg.ablation_seeds):
        if VARIANTS[variant][1] is not None and variant not in pretrained:
            pretrained[variant] = pretrain_run(cfg, variant, paths)
        runs.append(finetune_run(cfg, variant, seed, pretrained.get(variant), paths))
        text = report(cfg, runs, list(pretrained.values()), data_wall)
    print('\n' + text + f'\nwritten: {cfg.table}, {cfg.json}, {cfg.plot}')
    return 0


def main(argv=None):
    cfg = engine.config_from_cli(AblationConfig, argv)
    try:
        return run(cfg)
    except KeyboardInterrupt:
        print('\nstopped: run the same command again to resume (finished runs are skipped)', file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2 if not isinstance(e, RuntimeError) else 1


if __name__ == '__main__':
    sys.exit(main())
