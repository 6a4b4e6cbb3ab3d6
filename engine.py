"""Training plumbing shared by pretrain.py and finetune.py (and the CLI of every script), written once.

MAE keeps the same in util/misc.py, DINO/iBOT in utils.py; here in the order a training script meets it:
  1. Config and CLI: a dataclass per script, its fields mapped onto --flags (`config_from_cli`).
  2. Schedules as pure functions of the step. 3. Devices: DDP under torchrun (NCCL / gloo), AMP.
  4. Files: one atomic writer (`atomic_open`), checkpoints of tensors and plain values only, the log.
  5. Robustness: the non-finite-loss guard, Ctrl-C / SIGTERM, the resume architecture check.
  6. Reproducibility: every sample's randomness is a pure function of (seed, epoch, index).
  7. `train_loop`: the epoch/step skeleton both trainers run (progress bar, logging, stops).
  8. `procrustes`: the official FreiHAND alignment (fine-tuning's validation and evaluate.py).
This file imports nothing from the project.

Shape legend (the same letters in every file): B batch, S image side (px), N = h * w patches, D width,
H heads, C channels, V mesh vertices, J = 21 joints.
"""
import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import signal
import sys
import time
import typing
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# -------- 1. Config and CLI
def option(default, help, **metadata):
    """A dataclass field with its --help text (config_from_cli); `positional=True`: an optional positional."""
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


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
        if f.metadata.get('positional'):  # an optional positional; a tuple one takes any number of values
            kw['nargs'] = '*' if 'nargs' in kw else '?'
        parser.add_argument(f.name if f.metadata.get('positional') else '--' + f.name, **kw)
    args = parser.parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    return cls(**values)


def _annotation_type(ann):
    """The first concrete type of an annotation such as `int` or `float | None` (else str)."""
    args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
    return args[0] if args[0] in (int, float) else str


class NonFiniteLossError(RuntimeError):
    """Raised by NonFiniteGuard when the loss stays NaN/inf."""


def run_cli(config_cls, run, argv=None):
    """Parse the flags into `config_cls` and return `run(cfg)`'s exit code; bad input and a loss that stays
    non-finite end with a one-line message instead of a traceback (exit code 2 and 1)."""
    cfg = config_from_cli(config_cls, argv)
    try:
        return run(cfg) or 0
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2


# -------- 2. Schedules
def cosine_schedule(step, total_steps, start, end, warmup_steps=0, warmup_start=0.0):
    """Linear warm-up from `warmup_start` to `start`, then half a cosine to `end` (clamped): iBOT/DINO's
    `cosine_scheduler` as a pure function of the step (lr, weight decay, EMA momentum, teacher temperature)."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay, lr_scale_fn=None):
    """AdamW groups of the trainable parameters, no weight decay on biases, norms, tokens, pos_embed; each
    carries 'wd_scale' (1 or 0) and 'lr_scale' (lr_scale_fn(name), e.g. layer-wise decay), which the
    training loop multiplies with lr(step) and wd(step)."""
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


# -------- 3. Devices: distributed, mixed precision
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


def print0(*args, **kwargs):
    """print() on rank 0 only (DINO/MAE patch builtins.print instead)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def any_rank(flag, device):
    """True if `flag` is True on any rank (so every rank stops at the same step)."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def autocast(device, amp):
    """Mixed-precision context for `amp` in 'off'|'bf16'|'fp16' (a no-op context for 'off')."""
    if amp not in ('off', 'bf16', 'fp16'):
        raise ValueError(f"--amp must be off, bf16 or fp16, got {amp!r}")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(amp)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def make_scaler(amp, device):
    """GradScaler, enabled only for fp16 (bf16 has float32's range and needs no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == 'fp16'))


def to_device(batch, device):
    """A batch (tensors in dicts and lists, any nesting) moved to `device`."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return [to_device(v, device) for v in batch] if isinstance(batch, list) else batch.to(device, non_blocking=True)


# -------- 4. Files: the atomic writer, checkpoints, logs
TMP_SUFFIX = '.tmp'


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Open `path` for writing through `path.tmp<pid>`, fsynced and renamed over `path` when the block ends
    without an error (removed otherwise): an interrupted write never leaves a truncated file or clobbers
    the old one. The one writer behind checkpoints, submissions, results and synthetic sets."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}{TMP_SUFFIX}{os.getpid()}'
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data):
    """Write `data` (str or bytes) to `path` atomically."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def remove_stale_tmp(folder):
    """Remove the temporary files that runs killed mid-write left in `folder` (`atomic_open`'s
    `NAME.tmp<pid>` of a process that no longer runs) -> list of the removed paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), '*' + TMP_SUFFIX + '*')):
        pid = path.rsplit(TMP_SUFFIX, 1)[1]
        try:
            os.kill(int(pid), 0) if pid.isdigit() else None   # signal 0 only asks whether the process exists
        except ProcessLookupError:
            os.remove(path)
            removed.append(path)
        except PermissionError:   # it exists, as someone else's
            pass
    return removed


def save_checkpoint(state, path):
    """torch.save `state` (tensors and plain Python values) through `atomic_open`."""
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """torch.load(weights_only=True) -> dict; a clear ValueError for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist (check the path given to --resume, --pretrained "
                         f"or --checkpoint)")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # truncated zip, pickle with foreign classes, not a torch file at all
        reason = str(e).split('\n')[0]
        refused = 'Weights only load failed' in reason or 'Unsupported global' in str(e)
        why = ("it holds Python objects other than tensors and plain values, and loading those could run code "
               "from the file, so nothing was loaded" if refused else
               f"it is truncated or not a torch file ({type(e).__name__}: {reason[:200]})")
        raise ValueError(f"checkpoint {path!r} was refused: {why}. Checkpoints of this project hold only "
                         f"tensors and plain values; re-save a file you trust as a dict of tensors "
                         f"(torch.save(model.state_dict(), path)).") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a dict")
    return state


def log_jsonl(path, record):
    """Append `record` as one JSON line (tensors and numpy scalars become floats)."""
    with open(path, 'a') as f:
        f.write(json.dumps(record, default=float) + '\n')


def read_json(path):
    """Parse a .json file, or the one .json inside a .zip; a clear error for anything else."""

    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist')
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith('.json')]
                if len(names) != 1:
                    raise ValueError(f'{path}: expected exactly one .json file inside the zip, found {names}')
                return json.loads(z.read(names[0]))
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path} is not valid JSON ({type(e).__name__}: {e})') from None


# -------- 5. Robustness: non-finite losses, signals, resuming
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


def backward_step(loss, step, optimizer, scaler, guard, clip=None, before_update=None):
    """backward + (clip) + optimizer step unless `guard` refuses the loss -> whether the step was taken. `clip()`
    sees the true (unscaled) gradients; `before_update()` may still edit them (DINO's frozen last layer)."""
    taken = guard(loss, step)
    if taken:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)   # clip the true gradients, not the fp16-scaled ones
        if clip is not None:
            clip()
        if before_update is not None:
            before_update()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return taken


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


def apply_preset(cfg, presets, has_gpu):
    """Fill the fields of `cfg` left at None from `presets[cfg.preset]` ('auto': 'base' with a GPU, else 'tiny')
    -> (new config, the start of a note that says which preset and why)."""
    auto = cfg.preset == 'auto'
    name = ('base' if has_gpu else 'tiny') if auto else cfg.preset
    cfg = dataclasses.replace(cfg, preset=name, **{k: v for k, v in presets[name].items() if getattr(cfg, k) is None})
    why = f"{'a GPU' if has_gpu else 'no GPU'} found and no --preset given: using" if auto else 'using'
    return cfg, f"{why} the '{name}' preset"


def check_same_architecture(saved, cfg, fields):
    """Refuse to resume from a checkpoint whose weights have other shapes, naming the `fields` that differ."""
    diff = [f"{k}={saved.get(k)!r} in the checkpoint but {getattr(cfg, k)!r} now"
            for k in fields if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError("--resume: the checkpoint was trained with another architecture (" + '; '.join(diff) +
                         "). Pass the same flags as the original run, or drop --resume to start afresh.")


def prepare_output_dir(path, config, step=0):
    """Create the output folder (only once the inputs are validated: a failed start writes nothing), remove
    what killed runs left there, save the resolved config as config.json, and drop the lines of log.jsonl
    written after `step` (the resumed one), so that a resumed run's log reads as one run."""
    os.makedirs(path, exist_ok=True)
    for stale in remove_stale_tmp(path):
        print0(f'removed {stale}, left by a run that was killed while writing')
    write_atomic(os.path.join(path, 'config.json'), json.dumps(config, indent=1))
    log = os.path.join(path, 'log.jsonl')
    if os.path.exists(log):
        lines = [line for line in open(log) if json.loads(line)['step'] <= step]
        with atomic_open(log, 'w') as f:
            f.writelines(lines)


# -------- 6. Reproducibility: per-sample seeds, the data order
@contextlib.contextmanager
def seeded_rngs(seed):
    """Seed Python, NumPy and torch for the block, then restore their states (whatever RNG the
    augmentation uses, a sample always gets the same draws, in any worker)."""
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


def sample_seed(seed, epoch, index):
    """The seed of sample `index` in `epoch` of a run seeded `seed`."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2 ** 63


class KeyedSamples(torch.utils.data.Dataset):
    """`dataset` indexed by (epoch, index) keys (`epoch_keys`), each sample drawn under RNGs seeded by
    `sample_seed`: in any worker, a resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        with seeded_rngs(sample_seed(self.seed, *key)):
            return self.dataset[key[1]]


def epoch_keys(n_images, epoch, seed, rank, world, batch_size):
    """This rank's (epoch, index) keys for one epoch: a seeded permutation cut into whole global batches;
    rank r takes rows [r*B, (r+1)*B) of each, so 1 process of batch W*B and W of batch B see the same."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    steps = n_images // (world * batch_size)
    perm = torch.randperm(n_images, generator=g)[:steps * world * batch_size]
    mine = perm.reshape(steps, world, batch_size)[:, rank].reshape(-1)        # (steps * B,)
    return [(epoch, int(i)) for i in mine]


# -------- 7. The training loop skeleton
@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in its checkpoints so --resume continues at the same sample."""
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    images: int = 0         # images and seconds of the timed steps (not the first of an epoch, which waits
    seconds: float = 0.0    # for the loader to start): the run's throughput


def train_loop(cfg, dataset, progress, train_step, end_epoch, device, rank=0, world=1, log_path=None, show=()):
    """The epoch/step skeleton of both trainers -> None when done, 0 at --max_steps, 130 on Ctrl-C/SIGTERM.

    `dataset` is indexed by (epoch, index) keys (`KeyedSamples`); `train_step(batch, step)` runs one step on
    the device batch and returns floats to log; `end_epoch(finished, stop)` runs after each epoch and where a
    run stops. The global RNG is seeded per step (drop path), so a resumed run replays the uninterrupted one."""
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(dataset) // global_batch
    stop = None
    with StopOnSignal() as signal_stop:
        while progress.epoch < cfg.epochs and stop is None:
            keys = epoch_keys(len(dataset), progress.epoch, cfg.seed, rank, world, cfg.batch_size)
            loader = torch.utils.data.DataLoader(
                dataset, cfg.batch_size, sampler=keys[progress.step_in_epoch * cfg.batch_size:],
                num_workers=min(cfg.workers, os.cpu_count() or 1), pin_memory=device.type == 'cuda')
            bar = tqdm(loader, total=steps_per_epoch, initial=progress.step_in_epoch, disable=rank > 0,
                       desc=f'epoch {progress.epoch + 1}/{cfg.epochs}', dynamic_ncols=True)
            tic = time.perf_counter()
            for batch in bar:
                torch.manual_seed((cfg.seed * 1_000_003 + progress.step) * 1009 + rank)
                record = train_step(to_device(batch, device), progress.step)
                progress.step, progress.step_in_epoch = progress.step + 1, progress.step_in_epoch + 1
                toc = time.perf_counter()
                if progress.step_in_epoch > 1:
                    progress.images, progress.seconds = progress.images + global_batch, progress.seconds + toc - tic
                record = dict(step=progress.step, epoch=progress.epoch, **record, img_s=global_batch / (toc - tic))
                tic = toc
                bar.set_postfix_str(' '.join(f'{k} {record[k]:.3g}' for k in ('loss', *show, 'lr', 'img_s')))
                if rank == 0 and log_path and (progress.step % cfg.log_every == 0
                                               or progress.step_in_epoch == steps_per_epoch):
                    log_jsonl(log_path, record)
                stop = 130 if any_rank(signal_stop.requested, device) else (
                    0 if cfg.max_steps and progress.step >= cfg.max_steps else None)
                if stop is not None:
                    break
            bar.close()
            if (finished := progress.step_in_epoch == steps_per_epoch):
                progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            end_epoch(finished, stop)
    return stop


# -------- 8. Procrustes alignment (the official FreiHAND `align_w_scale`)
def as_f64(x):
    """An array-like or (any-device) torch tensor as a float64 numpy array (no copy if it is one)."""
    if torch.is_tensor(x):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def procrustes_params(pred, gt):
    """Batched `align_w_scale` pieces: (pred_n, R, s, gt_norm, gt_mean, pred_mean) for torch (B,N,3)."""
    gt_mean, pred_mean = gt.mean(1, keepdim=True), pred.mean(1, keepdim=True)   # (B, 1, 3)
    gt_c, pred_c = gt - gt_mean, pred - pred_mean
    gt_norm = gt_c.flatten(1).norm(dim=1)[:, None, None] + 1e-8                 # (B, 1, 1) Frobenius
    pred_norm = pred_c.flatten(1).norm(dim=1)[:, None, None] + 1e-8
    gt_n, pred_n = gt_c / gt_norm, pred_c / pred_norm
    # scipy.linalg.orthogonal_procrustes(gt_n, pred_n): U W V^T = svd(gt_n^T pred_n), R = U V^T minimises
    # ||gt_n R - pred_n||, scale = sum(W). No sign fix on the last singular vector: R may be a reflection.
    U, W, Vh = torch.linalg.svd(gt_n.transpose(1, 2) @ pred_n)                  # (B, 3, 3), (B, 3)
    return pred_n, U @ Vh, W.sum(-1)[:, None, None], gt_norm, gt_mean, pred_mean


def procrustes(pred, gt):
    """Similarity-align `pred` (B,N,3) to `gt` (B,N,3) exactly as the official `align_w_scale`.

    Works on numpy arrays (float64, returns numpy) and on torch tensors (any device/float dtype,
    returns a tensor: fine-tuning's validation PA-MPVPE)."""
    is_numpy = not torch.is_tensor(pred)
    P = torch.from_numpy(as_f64(pred)) if is_numpy else pred
    G = torch.as_tensor(as_f64(gt) if is_numpy else gt, dtype=P.dtype, device=P.device)
    pred_n, R, s, gt_norm, gt_mean, _ = procrustes_params(P, G)
    aligned = (pred_n @ R.transpose(1, 2)) * s * gt_norm + gt_mean              # (B, N, 3)
    return aligned.numpy() if is_numpy else aligned
