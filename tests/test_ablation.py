"""Tests of scripts/ablation.py: the report functions (aggregate, markdown, plot) on hand-made results, its small
helpers, and an end-to-end --smoke run (one step per stage) that resumes from its result files alone."""
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import ablation  # noqa: E402

KEYS = [key for key, _, _ in ablation.METRICS]
COUNTS = dict(mean_hand=1, scratch=3, full=3, no_pka=1, no_mim=1, no_pix=1, pix_only=1)  # runs per variant


def hand_made_results(seed=0):
    """Results as the driver writes them (metrics only), the ablations listed before the main runs."""
    rng = np.random.default_rng(seed)
    results = []
    for variant in ['pix_only', 'no_pix', 'no_mim', 'no_pka', 'full', 'scratch', 'mean_hand']:
        for s in range(COUNTS[variant]):
            metrics = dict(pa_mpjpe_mm=rng.uniform(5, 20), pa_mpvpe_mm=rng.uniform(5, 20), f5=rng.uniform(0, 1),
                           f15=rng.uniform(0, 1), st_mpjpe_mm=rng.uniform(20, 90))
            results.append(dict(variant=variant, seed=None if variant == 'mean_hand' else s, metrics=metrics))
    return results


META = dict(n_unlabeled=8000, n_labelled=2000, n_eval=500, img_size=64, patch_size=8, arch='vit_tiny', depth=6,
            batch_size=32, pretrain_steps=[1000], finetune_steps=[560], processor='x86_64', threads=2, device='cpu',
            wall_min=118.4, pretrain_args='', finetune_args='--w_hand 5')


def test_aggregate_matches_numpy_sample_std():
    results = hand_made_results()
    rows = ablation.aggregate(results)
    assert [r['variant'] for r in rows] == list(COUNTS)  # the table order, whatever the order of the results
    for row in rows:
        runs = [r for r in results if r['variant'] == row['variant']]
        assert len(row['seeds']) == COUNTS[row['variant']]
        for key in KEYS:
            x = np.array([r['metrics'][key] for r in runs])
            assert row[key]['mean'] == pytest.approx(x.mean(), rel=1e-12)
            assert sorted(row[key]['values']) == pytest.approx(sorted(x))
            if len(x) > 1:
                assert row[key]['std'] == pytest.approx(x.std(ddof=1), rel=1e-12)
            else:
                assert row[key]['std'] is None  # one run has no spread to report


def test_markdown_lists_every_variant_with_mean_and_std():
    rows = ablation.aggregate(hand_made_results())
    text = ablation.markdown(rows, META)
    for row in rows:
        assert f"| {row['label']} |" in text
    scratch = next(r for r in rows if r['variant'] == 'scratch')
    line = next(line for line in text.splitlines() if line.startswith(f"| {scratch['label']} |"))
    s = scratch['pa_mpvpe_mm']
    assert '| 3 |' in line and f"{s['mean']:.2f} ± {s['std']:.2f}" in line
    no_pix = next(line for line in text.splitlines() if 'without pixel' in line and line.startswith('|'))
    assert '±' not in no_pix  # one seed: the value alone
    assert 'ddof = 1' in text and '8000 unlabeled' in text and 'Total wall time 118.4 min' in text
    assert text.count('\n|') == len(rows) + 2  # header, rule, one line per variant


def test_plot_draws_bars_and_mean_hand_line(tmp_path):
    rows = ablation.aggregate(hand_made_results())
    path = ablation.plot_rows(rows, str(tmp_path / 'sub' / 'ablation.png'))
    with Image.open(path) as img:
        assert img.size == (200 + 110 * (len(rows) - 1), 360)
        pixels = np.asarray(img.convert('RGB')).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert (40, 100, 200) in colours and (150, 150, 150) in colours  # the full and scratch bars
    assert (200, 30, 30) in colours  # the mean hand's dashed line


def test_plot_of_one_variant_is_wide_enough_for_its_title(tmp_path):
    from plot import _font
    rows = [r for r in ablation.aggregate(hand_made_results()) if r['variant'] in ('mean_hand', 'full')]
    path = ablation.plot_rows(rows, str(tmp_path / 'one.png'))
    title = 'PA-MPVPE on the held-out evaluation split (lower is better)'
    with Image.open(path) as img:
        assert _font(13).getlength(title) + 8 <= img.size[0]   # was clipped at 310 px for one variant


def test_helpers():
    entries = [[[0.5, -1.25e-3]], {'a': [1, 2]}, 'x', 3]
    for text in (json.dumps(entries, separators=(',', ':')), json.dumps(entries, indent=1)):
        for n in range(len(entries) + 1):
            assert json.loads(ablation.first_entries(text, n)) == entries[:n]
    assert ablation.schedule(['no_mim', 'full', 'scratch'], 2, 1) == [('scratch', 0), ('full', 0), ('scratch', 1),
                                                                      ('full', 1), ('no_mim', 0)]
    cfg = ablation.resolve(ablation.AblationConfig(smoke=True, n_unlabeled=30))
    assert (cfg.n_unlabeled, cfg.n_labelled, cfg.depth, cfg.img_size, cfg.device) == (30, 12, 2, 64, 'cpu')
    cfg = ablation.resolve(ablation.AblationConfig(gpu=True, amp='off'))
    assert (cfg.device, cfg.amp, cfg.img_size, cfg.patch_size, cfg.arch) == ('cuda', 'off', 224, 16, 'vit_small')
    with pytest.raises(ValueError, match='no_cls'):
        ablation.resolve(ablation.AblationConfig(variants='full,no_cls'))


def test_a_pretraining_is_reused_only_for_its_own_command(tmp_path):
    """A finished pretraining made with other flags (say --pretrain_epochs) in the same --out is not reused."""
    command = ['pretrain.py', '--data', '$OUT/hands/training/rgb', '--epochs', '2']
    ablation.write_json(dict(steps=500, wall_s=1.0, command=command), str(tmp_path / 'done.json'))
    assert ablation.pretrained_by(str(tmp_path), command) is None  # no backbone.pth
    (tmp_path / 'backbone.pth').write_bytes(b'')
    assert ablation.pretrained_by(str(tmp_path), command)['steps'] == 500
    assert ablation.pretrained_by(str(tmp_path), command[:-1] + ['10']) is None


def _finetune_recipe(command):
    """A fine-tuning command without the flags that may differ between runs."""
    out, skip = [], False
    for a in command:
        if not skip and a not in ('--seed', '--pretrained', '--output_dir'):
            out.append(a)
        skip = a in ('--seed', '--pretrained', '--output_dir')
    return out


def test_smoke_run_end_to_end_then_resumes_from_its_result_files(tmp_path):  # ~12 stage processes
    """--smoke with three variants: data, two pretrainings, three fine-tunings, the mean hand; one result file
    per run, table, JSON and plot. The same command again runs nothing; on another machine
    (no working folder) with one result file missing, only that run (and its pretraining) runs again."""
    argv = [sys.executable, os.path.join(ROOT, 'scripts', 'ablation.py'), '--smoke', '--seeds', '1', '--threads', '1',
            '--variants', 'scratch,full,pix_only', '--out', 'out', '--results', 'results', '--report', 'report/abl']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    first = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    counts = dict(mean_hand=1, scratch=1, full=1, pix_only=1)
    names = sorted(p.name for p in (tmp_path / 'results').iterdir())
    assert names == sorted(['mean_hand.json', 'scratch_seed0.json', 'full_seed0.json', 'pix_only_seed0.json'])

    text = (tmp_path / 'report' / 'abl.md').read_text()
    rows = json.loads((tmp_path / 'report' / 'abl.json').read_text())['rows']
    results = [json.loads((tmp_path / 'results' / n).read_text()) for n in names]
    for variant, n in counts.items():
        assert f'| {ablation.LABELS[variant]} |' in text
        runs = [r for r in results if r['variant'] == variant]
        assert len(runs) == n and next(r for r in rows if r['variant'] == variant)['seeds'] == [r['seed'] for r in
                                                                                                sorted(runs, key=lambda
                                                                                                r: r['seed'] or 0)]
        for r in runs:
            assert all(math.isfinite(r['metrics'][k]) for k in KEYS) and 0 < r['metrics']['pa_mpvpe_mm'] < 100
    finetuned = [r for r in results if r['variant'] != 'mean_hand']
    assert len({json.dumps(_finetune_recipe(r['command'])) for r in finetuned}) == 1  # equal budget
    assert all(r['steps'] == 1 for r in finetuned)
    assert str(tmp_path) not in ''.join((tmp_path / 'results' / n).read_text() for n in names)  # $OUT/... paths
    with Image.open(tmp_path / 'report' / 'abl.png') as img:
        assert img.size == (200 + 110 * 3, 360)
    labelled = tmp_path / 'out' / 'labelled'
    assert len(json.loads((labelled / 'training_K.json').read_text())) == 12

    logs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'out' / 'logs').iterdir()}
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'out' / 'logs').iterdir()} == logs  # nothing ran
    assert (tmp_path / 'report' / 'abl.md').read_text() == text

    shutil.rmtree(tmp_path / 'out')                     # another machine: only the committed result files
    kept = (tmp_path / 'results' / 'scratch_seed0.json').read_text()
    os.remove(tmp_path / 'results' / 'full_seed0.json')
    third = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    ran = sorted(p.name for p in (tmp_path / 'out' / 'logs').iterdir() if p.suffix == '.log')
    assert ran == ['finetune_full_seed0.log', 'pretrain_full.log', 'score_full_seed0.log']
    assert (tmp_path / 'results' / 'scratch_seed0.json').read_text() == kept
    assert (tmp_path / 'results' / 'full_seed0.json').exists()


def test_committed_table_is_generated_from_committed_results():
    """assets/ablation.md and the README's table are what `aggregate` + `markdown` make of assets/ablation/*.json."""
    results = ablation.load_results(os.path.join(ROOT, 'assets', 'ablation'))
    if not results:
        pytest.skip('no committed ablation results')
    rows = ablation.aggregate(results)
    with open(os.path.join(ROOT, 'assets', 'ablation.md'), encoding='utf-8') as f:
        report = f.read()
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    meta = ablation.read_json(os.path.join(ROOT, 'assets', 'ablation.json'))['meta']
    table = [line for line in ablation.markdown(rows, meta).splitlines() if line.startswith('|')]
    assert len(table) == len(rows) + 2
    for line in table:
        assert line in report.splitlines() and line in readme.splitlines(), line


def _cells(folder):
    """PA-MPVPE of each variant in assets/<folder>/*.json as the tables write it: '9.07 +- 0.11' for the mean
    +- std and '9.07' for each single run -> {variant: (set of strings, number of runs)}."""
    rows = ablation.aggregate(ablation.load_results(os.path.join(ROOT, 'assets', folder)))
    out = {}
    for row in rows:
        stat = row['pa_mpvpe_mm']
        texts = {f'{v:.2f}' for v in stat['values']} | {_as_written(stat['values'])}
        out[row['variant']] = (texts, len(stat['values']))
    return out


def _as_written(values):
    """PA-MPVPE values in mm -> their mean +- std as the tables write it ('9.07 +- 0.11', or '9.07' for one)."""
    x = np.array(values)
    return ablation.mean_std(dict(mean=x.mean(), std=x.std(ddof=1) if len(x) > 1 else None), 2).replace(' ± ', ' +- ')


def _per_run(folder):
    """assets/<folder>/*.json, one file per run with its `start` -> {start: [pa_mpvpe_mm, ...]}."""
    runs = {}
    for path in glob.glob(os.path.join(ROOT, 'assets', folder, '*.json')):
        with open(path, encoding='utf-8') as f:
            run = json.load(f)
        runs.setdefault(run['start'], []).append(run['pa_mpvpe_mm'])
    return runs


def test_table_of_attempts_matches_committed_results():
    """Every number of docs/results.md's table of attempts to make pretraining lead is in the result files its row
    names: the HandMIM column in that row's folders (the full variant, or masked pixels alone where the folder
    has no full), the scratch column there too, or, for a row that changes only the pretraining, in another
    setting's folder; and the row's seed count is at most the runs behind its HandMIM number. A row naming a
    folder of single runs (`name/`: one file per run with its `start`) has its HandMIM (or MAE baseline) column
    from those files, and its scratch column too where they hold scratch runs, else from another setting's; its
    seed count is the number of files behind each column ('1 / 2': scratch / HandMIM where the two differ)."""
    with open(os.path.join(ROOT, 'docs', 'results.md'), encoding='utf-8') as f:
        lines = f.read().splitlines()
    start = lines.index('| setting | seeds | scratch | HandMIM | results |')
    table = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        table.append([c.strip() for c in line.strip('|').split('|')])
    folders = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, 'assets', 'ablation*.json')))
    cells_of = {f: _cells(f) for f in folders}  # each folder's result files read once
    every_scratch = set().union(*(c.get('scratch', (set(), 0))[0] for c in cells_of.values()))
    # five scratch seeds of the 128 px fine-tuning: the ablation's seeds 0-2 and the per-run files of seeds 3 and 4
    rows = ablation.aggregate(ablation.load_results(os.path.join(ROOT, 'assets', 'ablation_128')))
    five = next(r for r in rows if r['variant'] == 'scratch')['pa_mpvpe_mm']['values']
    five = list(five) + _per_run(os.path.join('handmim_long', 'e100_seeds34'))['scratch']
    assert len(five) == 5
    every_scratch.add(_as_written(five))
    checked = 0
    for setting, seeds, scratch, handmim, results in table:
        if results == 'docs only':
            continue
        if results.endswith('/`'):   # a folder of per-run files, each with its `start` and `pa_mpvpe_mm`
            runs = _per_run(results.strip('`'))
            # seeds: one count for both columns, or 'scratch / HandMIM' where the two starts have different counts
            counts = [int(n) for n in seeds.split(' / ')]
            starts = [('handmim' if 'handmim' in runs else 'mae', handmim, counts[-1])]   # HandMIM or MAE baseline
            if 'scratch' in runs:
                starts.append(('scratch', scratch, counts[0]))
            else:   # a pretraining-only row: its scratch runs are another setting's
                assert scratch in every_scratch, f'{setting}: scratch {scratch} is not in {sorted(every_scratch)}'
            for start, text, n in starts:
                said = _as_written(runs[start])
                assert text == said and n == len(runs[start]), f'{setting}: {start} {text} ({n}), files {said}'
            checked += 1
            continue
        names, named = [n.strip(' `') for n in results.split(',')], []
        for n in names:  # `ablation_mae75`, `_long`: a suffix of the previous name
            named.append(named[-1] + n if n.startswith('_') else n)
        cells = [cells_of.get(n, {}) for n in named]
        assert all(cells), f'{setting}: no results in assets/ for {named}'
        texts = handmim.split(' / ')  # '9.42 +- 0.11 / 9.59 +- 0.06': one per named folder
        per_text = cells * len(texts) if len(cells) == 1 else cells
        assert len(per_text) == len(texts), f'{setting}: {len(texts)} HandMIM numbers for {named}'
        for text, c in zip(texts, per_text):
            allowed, runs = c['full'] if 'full' in c else c['pix_only']
            assert text in allowed, f'{setting}: HandMIM {text} is not in {sorted(allowed)}'
            assert int(seeds) <= runs, setting
        own = set().union(*(c.get('scratch', (set(), 0))[0] for c in cells))
        allowed = own or every_scratch
        assert scratch in allowed, f'{setting}: scratch {scratch} is not in {sorted(allowed)}'
        checked += 1
    assert checked >= 10
