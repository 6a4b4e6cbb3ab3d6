"""Test of scripts/bench.py: a --quick run on one thread prints the table and writes every section to the
JSON with positive, finite numbers."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numbers(obj):
    """Every number in a nested dict (bools and strings left out)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / 'b.json'
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench.py'), '--quick', '--threads', '1',
                          '--out', str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'section' in run.stdout and 'img/s' in run.stdout and 'poses/s' in run.stdout  # the table
    results = json.loads(out.read_text())
    assert not list(tmp_path.glob('b.json.tmp*'))  # the temporary file was renamed
    assert results['machine']['threads'] == 1 and results['machine']['cpu_count'] >= 1
    for section in ('pretrain', 'finetune', 'inference'):
        assert set(results[section]) == {'tiny', 'small'}
        for row in results[section].values():
            assert {'img_per_s', 'ms_per_step', 'gflop_per_img'} <= set(row)
    for section, key in [('mano', 'poses_per_s'), ('metrics', 'seconds'), ('synth', 'img_per_s'),
                         ('data', 'img_per_s')]:
        assert key in results[section]
    values = [x for section in ('pretrain', 'finetune', 'inference', 'mano', 'metrics', 'synth', 'data')
              for x in _numbers(results[section])]
    assert values and all(math.isfinite(x) and x > 0 for x in values)


def test_unknown_section_is_refused(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench.py'), '--only', 'nope',
                          '--out', str(tmp_path / 'b.json')], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and 'nope' in run.stderr
    assert not (tmp_path / 'b.json').exists()
