r"""HandMIM ablation at small scale: fine-tuning from HandMIM pretraining vs from scratch, and without each loss.

The paper's claims (HandMIM, Liu et al., arXiv 2307.16061), checked on synthetic hands: HandMIM pretraining on
unlabeled hand images makes the fine-tuned mesh regressor better than one trained from scratch, and each of its
three losses (pseudo keypoint alignment, patch MIM distillation, masked pixel reconstruction) contributes.
Semi-supervised setting: one synthetic set (synthetic.py) is rendered once; all its training images are the
UNLABELED pretraining pool, the first --n_labelled of them (with labels) the fine-tuning set, and its evaluation
split, seen by neither stage, is scored with the official metrics (`evaluate.py --data ... --out ...`).
Runs, every fine-tuning run with the same recipe and budget (only --pretrained and --seed differ):
  mean_hand  MANO mean pose and zero betas for every image
  scratch    no pretraining                                   (fine-tuning seeds 0 .. --seeds - 1)
  full       HandMIM, all losses ([CLS] + PKA + MIM + pixels)  (--seeds)
  no_pka / no_mim / no_pix   HandMIM with --w_pka / --w_mim / --w_pix 0   (--ablation_seeds)
  pix_only   masked pixel reconstruction alone (MAE-style: --w_cls 0 --w_pka 0 --w_mim 0)   (--ablation_seeds)
Each pretraining variant is pretrained once (seed 0); finetune.py keeps the epoch with the best validation score on a
held-out part of the labelled set (best.pth), which is what gets scored.
Run (from the repository root):
    python scripts/ablation.py                # CPU sizes (PROFILES['cpu']), the README's table
    python scripts/ablation.py --gpu          # one GPU: cuda, bf16, 224 px ViT-S/16, larger sets (PROFILES['gpu'])
    python scripts/ablation.py --smoke --out runs/smoke --results runs/smoke/results --report runs/smoke/ablation
Resumable anywhere: each finished run writes its own result file into --results (assets/ablation/ by default; commit
them as they come); the same command skips the runs whose result is there, pretrains a variant only while some of its
runs remain and resumes an interrupted stage from its checkpoint. REPORT.md, .json, .png are rewritten after each run.
"""
import dataclasses
import glob
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine  # noqa: E402
import model as M  # noqa: E402
import synthetic  # noqa: E402
from plot import Chart, save_panels  # noqa: E402

# variant -> (table label, pretrain.py flags; None = no pretraining). The mean hand is always scored.
VARIANTS = {
    'scratch': ('scratch (no pretraining)', None),
    'full': ('HandMIM, all losses', []),
    'no_pka': ('HandMIM without PKA (--w_pka 0)', ['--w_pka', '0']),
    'no_mim': ('HandMIM without patch MIM (--w_mim 0)', ['--w_mim', '0']),
    'no_pix': ('HandMIM without pixel loss (--w_pix 0)', ['--w_pix', '0']),
    'pix_only': ('masked pixels alone (MAE-style)', ['--w_cls', '0', '--w_pka', '0', '--w_mim', '0']),
}
LABELS = {'mean_hand': 'mean hand (MANO mean pose, zero betas)', **{k: v[0] for k, v in VARIANTS.items()}}
MAIN = ('scratch', 'full')  # fine-tuned with --seeds seeds; the others with --ablation_seeds
# (key in result['metrics'], column title, decimals)
METRICS = (('pa_mpjpe_mm', 'PA-MPJPE (mm) ↓', 2), ('pa_mpvpe_mm', 'PA-MPVPE (mm) ↓', 2),
           ('f5', 'F@5 ↑', 3), ('f15', 'F@15 ↑', 3), ('st_mpjpe_mm', 'ST-MPJPE (mm) ↓', 1))
LABEL_FILES = ('K', 'mano', 'xyz', 'verts', 'scale')  # FreiHAND's training_*/evaluation_*.json

# Sizes and recipe per profile; a flag given on the command line wins. --smoke overrides --gpu's sizes only.
PROFILES = {
    'cpu': dict(n_unlabeled=8000, n_labelled=1500, n_eval=400, img_size=64, patch_size=8, arch='vit_tiny', depth=6,
                pretrain_epochs=2, finetune_epochs=14, batch_size=32, workers=2, max_steps=0, device='cpu',
                amp='off', pretrain_args='--freeze_last_layer 0 --warmup_teacher_temp_epochs 1',
                finetune_args='--warmup_epochs 2 --w_hand 50 --w_heatmap 0.3'),  # tiny's weights, as recorded
    'gpu': dict(n_unlabeled=20000, n_labelled=4000, n_eval=1000, img_size=224, patch_size=16, arch='vit_small',
                depth=12, pretrain_epochs=30, finetune_epochs=30, batch_size=64, workers=8, device='cuda',
                amp='bf16', pretrain_args='--warmup_epochs 3 --warmup_teacher_temp_epochs 9',
                finetune_args='--w_hand 5 --warmup_epochs 3'),
    'smoke': dict(n_unlabeled=24, n_labelled=12, n_eval=4, depth=2, pretrain_epochs=1, finetune_epochs=1,
                  batch_size=4, workers=0, max_steps=1),
}


def sized(help, key, **metadata):
    """A profile-dependent flag: default None, filled by `resolve`; the help lists the profiles' values."""
    values = ' | '.join(f'{"default" if p == "cpu" else "--" + p} {PROFILES[p][key]!r}' for p in PROFILES
                        if key in PROFILES[p])
    return engine.option(None, f'{help} [{values}]', **metadata)


@dataclasses.dataclass
class AblationConfig:
    """HandMIM ablation at small scale: scratch vs HandMIM pretraining vs HandMIM without each of its losses."""
    out: str = engine.option('runs/ablation', 'working folder: data, pretraining and fine-tuning runs, logs')
    results: str = engine.option('assets/ablation', 'one result file per finished run (commit them): runs found '
                                                    'here are skipped')
    report: str = engine.option('assets/ablation', 'REPORT.md (table), REPORT.json (rows and runs), REPORT.png')
    variants: str = engine.option(','.join(VARIANTS), 'comma list of variants to run (the mean hand is always scored)')
    seeds: int = engine.option(3, 'fine-tuning seeds (0, 1, ...) of scratch and full')
    ablation_seeds: int = engine.option(1, 'fine-tuning seeds of the other variants')
    gpu: bool = engine.option(False, "scale up (PROFILES['gpu']): --device cuda --amp bf16, 224 px, patch 16, "
                                     "vit_small depth 12, 20000/4000/1000 images, 30 + 30 epochs, batch 64")
    smoke: bool = engine.option(False, 'tiny everything for the test: 24 images, 2 blocks, one step per stage')
    force: bool = engine.option(False, 're-run every run, even those with a result (the data set is reused)')
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
    pretrain_args: str = sized('pretrain.py flags of every variant, verbatim (after ours: they win)', 'pretrain_args')
    finetune_args: str = sized('finetune.py flags of every run, verbatim (after ours: they win)', 'finetune_args')
    threads: int = engine.option(0, 'torch threads: OMP_NUM_THREADS of the stages (0: leave as is)')
    mano: str = engine.option('synthetic', "MANO model: 'synthetic' or the path of MANO_RIGHT.pkl")


# Settings that change results: result files made with other settings are refused (see check_settings).
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
    return engine.read_json(path) if os.path.isfile(path) else default


def write_json(obj, path):
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
    write_json(dict(settings=want, wall_s=wall), os.path.join(pool, 'ablation_data.json'))  # last: complete
    print(f'data: {cfg.n_unlabeled} + {cfg.n_eval} synthetic hands at {cfg.img_size} px ({wall / 60:.1f} min)', flush=True)
    return wall


def make_labelled(pool, dst, n):
    """A FreiHAND-layout folder with the first n training samples of `pool` (images hard-linked, training_*.json
    sliced) and the pool's whole evaluation split, so that finetune.py and the scoring read one root."""
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
            engine.write_atomic(os.path.join(dst, f'training_{key}.json'), first_entries(f.read(), n))
        link_or_copy(os.path.join(pool, f'evaluation_{key}.json'), os.path.join(dst, f'evaluation_{key}.json'))
    shutil.copytree(os.path.join(pool, 'evaluation'), os.path.join(dst, 'evaluation'), copy_function=link_or_copy)
    shutil.copy2(os.path.join(pool, 'synth_config.json'), dst)  # the MANO model the labels were made with
    write_json(want, os.path.join(dst, 'ablation_subset.json'))


# ----------------------------------------------------------------------------------------------------
# Stages as logged subprocesses

def portable(argv, out):
    """A command as stored in JSON: the working folder as $OUT (no path of this machine in the results)."""
    return ['$OUT' + a[len(out):] if a == out or a.startswith(out + os.sep) else a for a in argv]


def run_logged(argv, log_path, threads, resume):
    """Run `python ROOT/argv[0] argv[1:]` with its output streaming to `log_path` -> wall seconds of the run,
    earlier interrupted attempts included (`resume`). Ctrl-C reaches the child too (same process group): it saves
    a checkpoint and exits with 130, which we wait for and pass on as KeyboardInterrupt."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', TQDM_MININTERVAL=os.environ.get('TQDM_MININTERVAL', '5'))
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
        with open(log_path, errors='replace') as f:
            raise RuntimeError(f'{argv[0]} exited with code {code}; the end of {log_path}:\n'
                               + ''.join(f.readlines()[-15:]))
    return spent + time.perf_counter() - tic


def start_or_resume(run_dir, argv, cfg):
    """-> (argv, resumed). An interrupted run of this exact command continues from its checkpoint.pth (both
    stages resume exactly); otherwise the run starts afresh in an emptied folder."""
    ckpt, cmd = os.path.join(run_dir, 'checkpoint.pth'), os.path.join(run_dir, 'command.json')
    if not cfg.force and os.path.isfile(ckpt) and read_json(cmd) == portable(argv, cfg.out):
        return argv + ['--resume', ckpt], True
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    write_json(portable(argv, cfg.out), cmd)
    return argv, False


def common_flags(cfg):
    return ['--arch', cfg.arch, '--depth', str(cfg.depth), '--img_size', str(cfg.img_size), '--patch_size',
            str(cfg.patch_size), '--batch_size', str(cfg.batch_size), '--workers', str(cfg.workers), '--device',
            cfg.device, '--amp', cfg.amp, '--max_steps', str(cfg.max_steps)]


def pretrain_command(cfg, variant, pool, run_dir):
    """pretrain.py flags of a variant: the same for all but the loss weights (seed 0, one run per variant)."""
    argv = ['pretrain.py', '--data', os.path.join(pool, 'training', 'rgb'), '--output_dir', run_dir, '--preset',
            'tiny' if cfg.arch == 'vit_tiny' else 'base', '--epochs', str(cfg.pretrain_epochs), '--seed', '0',
            *common_flags(cfg)]
    return argv + VARIANTS[variant][1] + shlex.split(cfg.pretrain_args)


def finetune_command(cfg, root, seed, run_dir, backbone):
    """finetune.py flags: identical for every run (equal budget) but --pretrained and --seed."""
    argv = ['finetune.py', '--data', root, '--mano', cfg.mano, '--output_dir', run_dir, '--epochs',
            str(cfg.finetune_epochs), '--seed', str(seed), *common_flags(cfg)]
    return argv + (['--pretrained', backbone] if backbone else []) + shlex.split(cfg.finetune_args)


def score(cfg, root, out_dir, log_path, checkpoint=None):
    """`evaluate.py --data root --out out_dir` (the checkpoint's or the mean hand's predictions) -> the metrics
    of scores.json, as the official scorer computes them."""
    argv = ['evaluate.py', '--data', root, '--out', out_dir, '--device', cfg.device, '--amp', cfg.amp,
            '--workers', str(cfg.workers)] + (['--checkpoint', checkpoint] if checkpoint else ['--mean_hand'])
    run_logged(argv, log_path, cfg.threads, resume=False)
    m = read_json(os.path.join(out_dir, 'scores.json'))['metrics']
    return dict(pa_mpjpe_mm=1000 * m['pa_mpjpe'], pa_mpvpe_mm=1000 * m['pa_mpvpe'], f5=m['pa_f5'], f15=m['pa_f15'],
                st_mpjpe_mm=1000 * m['st_mpjpe'])


# ----------------------------------------------------------------------------------------------------
# Runs: each writes its result file; a result file there means the run is done

def recipe(cfg):
    return {k: getattr(cfg, k) for k in RECIPE}


def check_settings(cfg):
    """The result folder holds runs of one setting: refuse to mix in runs made with other sizes or recipes."""
    have = [r for r in load_results(cfg.results) if r.get('recipe') and r['recipe'] != recipe(cfg)]
    if have and not cfg.force:
        diff = [f'{k}: {have[0]["recipe"].get(k)!r} there, {v!r} now' for k, v in recipe(cfg).items()
                if have[0]['recipe'].get(k) != v]
        raise ValueError(f'{cfg.results} holds results made with other settings ({"; ".join(diff)}): give another '
                         f'--results (and --report), or --force to replace them')


def load_results(folder):
    return [read_json(p) for p in sorted(glob.glob(os.path.join(glob.escape(folder), '*.json')))]


def finished(cfg, name):
    return None if cfg.force else read_json(os.path.join(cfg.results, name + '.json'))


def mean_hand_run(cfg, paths):
    result = finished(cfg, 'mean_hand')
    if result is None:
        tic = time.perf_counter()
        metrics = score(cfg, paths['labelled'], os.path.join(cfg.out, 'mean_hand'),
                        os.path.join(cfg.out, 'logs', 'score_mean_hand.log'))
        result = dict(run='mean_hand', variant='mean_hand', seed=None, metrics=metrics,
                      wall_s=dict(score=time.perf_counter() - tic), recipe=recipe(cfg))
        write_json(result, os.path.join(cfg.results, 'mean_hand.json'))
    return result


def pretrained_by(run_dir, command):
    """done.json of the pretraining in run_dir if this (portable) command made its backbone.pth, else None."""
    done = read_json(os.path.join(run_dir, 'done.json'), {})
    return done if done.get('command') == command and os.path.isfile(os.path.join(run_dir, 'backbone.pth')) else None


def pretrain_run(cfg, variant, paths):
    """Pretrain a variant once (seed 0) -> dict(backbone, steps, wall_s, command); re-run where this command's
    backbone is not on this machine (on CPU a pretraining is deterministic: the same backbone again)."""
    run_dir = os.path.join(cfg.out, 'pretrain', variant)
    command = pretrain_command(cfg, variant, paths['pool'], run_dir)
    backbone, done = os.path.join(run_dir, 'backbone.pth'), pretrained_by(run_dir, portable(command, cfg.out))
    if cfg.force or done is None:
        argv, resumed = start_or_resume(run_dir, command, cfg)
        wall = run_logged(argv, os.path.join(cfg.out, 'logs', f'pretrain_{variant}.log'), cfg.threads, resumed)
        done = dict(steps=int(engine.load_checkpoint(os.path.join(run_dir, 'checkpoint.pth'))['step']), wall_s=wall,
                    command=portable(command, cfg.out))
        write_json(done, os.path.join(run_dir, 'done.json'))
    print(f"pretrain {variant:10s} {done['steps']} steps | {done['wall_s'] / 60:.1f} min", flush=True)
    return dict(done, backbone=backbone)


def finetune_run(cfg, variant, seed, pre, paths):
    """Fine-tune one (variant, seed) and score its best.pth on the evaluation split -> result dict."""
    name = f'{variant}_seed{seed}'
    run_dir = os.path.join(cfg.out, 'finetune', name)
    command = finetune_command(cfg, paths['labelled'], seed, run_dir, pre and pre['backbone'])
    argv, resumed = start_or_resume(run_dir, command, cfg)
    wall = run_logged(argv, os.path.join(cfg.out, 'logs', f'finetune_{name}.log'), cfg.threads, resumed)
    tic = time.perf_counter()
    metrics = score(cfg, paths['labelled'], os.path.join(run_dir, 'submission'),
                    os.path.join(cfg.out, 'logs', f'score_{name}.log'), os.path.join(run_dir, 'best.pth'))
    result = dict(run=name, variant=variant, seed=seed, metrics=metrics,
                  steps=int(engine.load_checkpoint(os.path.join(run_dir, 'checkpoint.pth'))['step']),
                  wall_s=dict(finetune=wall, score=time.perf_counter() - tic),
                  pretrain=pre and dict(steps=pre['steps'], wall_s=pre['wall_s'], command=pre['command']),
                  command=portable(command, cfg.out), recipe=recipe(cfg), machine=hardware(cfg))
    write_json(result, os.path.join(cfg.results, name + '.json'))
    return result


def announce(result):
    print(f"{result['run']:16s} " + ' | '.join(f"{t.split(' ')[0]} {result['metrics'][k]:.{d}f}"
                                               for k, t, d in METRICS), flush=True)


# ----------------------------------------------------------------------------------------------------
# Report: pure functions of the result files

def aggregate(results):
    """Per-run results -> one row per variant (mean hand, scratch, full, ablations; unknown ones after): its
    seeds and, per metric, the values, their mean and sample std (ddof = 1; None for a single run)."""
    found = dict.fromkeys(r['variant'] for r in results)
    rows = []
    for variant in [v for v in LABELS if v in found] + [v for v in found if v not in LABELS]:
        runs = sorted((r for r in results if r['variant'] == variant), key=lambda r: r.get('seed') or 0)
        row = dict(variant=variant, label=LABELS.get(variant, variant), seeds=[r.get('seed') for r in runs])
        for key, _, _ in METRICS:
            x = np.array([r['metrics'][key] for r in runs], dtype=np.float64)
            row[key] = dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else None,
                            values=x.tolist())
        rows.append(row)
    return rows


def mean_std(stat, decimals):
    return f"{stat['mean']:.{decimals}f}" + ('' if stat['std'] is None else f" ± {stat['std']:.{decimals}f}")


def markdown(rows, meta):
    """The table and its caption. `meta`: the recipe, pretrain_steps and finetune_steps (lists of the step counts
    seen), processor, threads, device, wall_min."""
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
        'number of steps. PA = after Procrustes alignment; F@5 / F@15 = aligned F-scores at 5 / 15 mm (the official '
        'FreiHAND metrics).', '',
        f"Data: {m['n_unlabeled']} unlabeled synthetic training images (pretraining), the first {m['n_labelled']} "
        f"of them with labels (fine-tuning; finetune.py holds out a part to pick the best epoch), {m['n_eval']} "
        f"held-out evaluation images seen by neither stage; {m['img_size']} px, patch {m['patch_size']}, "
        f"{m['arch']} depth {m['depth']}, batch {m['batch_size']}; steps: pretraining {steps(m['pretrain_steps'])}, "
        f"fine-tuning {steps(m['finetune_steps'])}; extra flags: pretrain.py `{m['pretrain_args'] or '-'}`, "
        f"finetune.py `{m['finetune_args'] or '-'}`. Hardware: {m['processor']}, {m['threads']} torch threads, "
        f"device {m['device']}. Total wall time {m['wall_min']:.1f} min.", ''])


def plot_rows(rows, path):
    """Bars of mean PA-MPVPE per variant with +- std whiskers, the mean hand as a dashed line (plot.py)."""
    bars = [r for r in rows if r['variant'] != 'mean_hand']
    chart = Chart('PA-MPVPE on the held-out evaluation split (lower is better)', 'variant', 'PA-MPVPE (mm)',
                  size=(200 + 110 * len(bars), 360))
    colours = [dict(scratch=(150, 150, 150), full=(40, 100, 200)).get(r['variant'], (130, 170, 225)) for r in bars]
    chart.bars([r['pa_mpvpe_mm']['mean'] for r in bars], [r['variant'] for r in bars], colours,
               err=[r['pa_mpvpe_mm']['std'] or 0 for r in bars])
    base = next((r['pa_mpvpe_mm']['mean'] for r in rows if r['variant'] == 'mean_hand'), None)
    if base is not None:
        chart.hline(base, f'mean hand {base:.2f} mm', color=(200, 30, 30))
    return save_panels([chart], path, columns=1)


def hardware(cfg):
    gpu = cfg.device == 'cuda' and torch.cuda.is_available()
    return dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                threads=cfg.threads or torch.get_num_threads(), torch=torch.__version__,
                device=torch.cuda.get_device_name(0) if gpu else cfg.device)


def report(cfg, data_wall):
    """Rewrite the table, the JSON and the plot from the result files -> the markdown text."""
    runs = [r for r in load_results(cfg.results) if r.get('recipe') == recipe(cfg)]
    rows = aggregate(runs)
    pre = {json.dumps(r['pretrain']['command']): r['pretrain'] for r in runs if r.get('pretrain')}
    wall = data_wall + sum(sum(r['wall_s'].values()) for r in runs) + sum(p['wall_s'] for p in pre.values())
    meta = dict(recipe(cfg), **hardware(cfg), pretrain_steps=sorted({p['steps'] for p in pre.values()}),
                finetune_steps=sorted({r['steps'] for r in runs if 'steps' in r}), wall_min=wall / 60)
    text = markdown(rows, meta)
    engine.write_atomic(cfg.report + '.md', text)
    write_json(dict(meta=meta, std='sample (ddof = 1); null for one run', rows=rows), cfg.report + '.json')
    plot_rows(rows, cfg.report + '.png')
    return text


def run(cfg):
    cfg = resolve(cfg)
    check_settings(cfg)
    print('ablation: ' + json.dumps(dataclasses.asdict(cfg)), flush=True)
    paths = dict(pool=os.path.join(cfg.out, 'hands'), labelled=os.path.join(cfg.out, 'labelled'))
    data_wall = make_pool(cfg, paths['pool'])
    make_labelled(paths['pool'], paths['labelled'], cfg.n_labelled)
    announce(mean_hand_run(cfg, paths))
    todo, pretrained = schedule(variant_list(cfg), cfg.seeds, cfg.ablation_seeds), {}
    for variant, seed in todo:
        result = finished(cfg, f'{variant}_seed{seed}')
        if result is None:
            if VARIANTS[variant][1] is not None and variant not in pretrained:
                pretrained[variant] = pretrain_run(cfg, variant, paths)
            result = finetune_run(cfg, variant, seed, pretrained.get(variant), paths)
            report(cfg, data_wall)
        announce(result)
    text = report(cfg, data_wall)
    print('\n' + text + f'\nwritten: {cfg.report}.md, .json, .png; one result per run in {cfg.results}')
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
