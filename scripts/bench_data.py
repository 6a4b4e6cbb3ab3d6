"""Benchmark of data.py: synthetic rendering rate on one core, and the
pretraining input pipeline (JPEG decode + two global views with photometric jitter) alone, in the
main process and through a DataLoader with worker processes.

Run:  python scripts/bench_data.py [--n 300] [--img_size 224] [--workers 2] [--batch 64]
Prints images/s as wall-clock AND as process CPU time: on a shared machine the wall-clock rate
understates what one free core does.

Measured 2026-11-24, torch 2.13 CPU, a 2-core machine shared with other jobs (load average ~7, so
wall-clock numbers are ~2.5x pessimistic): synth 224 px 55.8 img/s per core (23 wall); decode + two
224 px views 174 img/s per core in the main process; DataLoader with 2 workers 116 img/s per core
including worker start-up and batch transfer (70 wall). Re-measured after the data.py review (same day, same
noisy machine, --n 80 --batch 16 --batches 4): synth 67 img/s per core; decode + two views 180 img/s per core;
DataLoader with 2 workers 124 img/s per core (122 wall).
"""
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from engine import config_from_cli, option  # noqa: E402
import synthetic  # noqa: E402


def bench_synth(out, n, img_size):
    torch.set_num_threads(1)
    synthetic.synthetic_mano()  # build the model once outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    synthetic.synth(out, n, n_eval=0, img_size=img_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f'synth {img_size}px: {n / wall:.1f} img/s wall, {n / cpu:.1f} img/s per core (CPU time), {n} images')


def bench_pretrain_pipeline(folder, img_size, workers, batch, n_batches):
    dataset = data.ImageFolder(folder, transform=data.PretrainAugment(img_size))
    # main process, one image at a time: the cost of decode + two views
    n = min(len(dataset), 128)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        dataset[i]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f'pretrain views, main process: {n / wall:.1f} img/s wall, {n / cpu:.1f} img/s per core (CPU time)')
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True)
    # Worker CPU time is read from RUSAGE_CHILDREN, which counts workers once they have exited.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, cpu, seen = time.perf_counter(), time.process_time(), 0
    while seen < n_batches * batch:  # whole epochs; each ends by shutting its workers down
        for views in (b['views'][0] for b in loader):
            seen += len(views)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    print(f'pretrain views, DataLoader {workers} workers, batch {batch}: {seen / wall:.1f} img/s wall, '
          f'{seen / cpu:.1f} img/s per core (CPU time of main + workers, start-up included)')


@dataclass
class BenchDataConfig:
    """Benchmark of synthetic rendering and of the pretraining data pipeline."""
    n: int = option(300, 'synthetic images to render')
    img_size: int = option(224, 'image side (px)')
    workers: int = option(2, 'DataLoader workers')
    batch: int = option(64, 'batch size')
    batches: int = option(8, 'batches to time')


def main(argv=None):
    args = config_from_cli(BenchDataConfig, argv)
    with tempfile.TemporaryDirectory() as tmp:
        bench_synth(tmp, args.n, args.img_size)
        bench_pretrain_pipeline(os.path.join(tmp, 'training', 'rgb'), args.img_size, args.workers, args.batch,
                                args.batches)


if __name__ == '__main__':
    main()
