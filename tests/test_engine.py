"""Tests for engine.py: the training plumbing both trainers share (CLI, schedules, devices, files, guards,
reproducible data order, the loop skeleton, the Procrustes alignment)."""
import json
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import engine as E


@dataclass
class _Cfg:
    """A test config."""
    name: str = 'a'
    lr: float = 1e-3
    steps: int = 3
    amp: bool = False
    sizes: tuple = (1, 2)
    maybe: int | None = None
    choice: str = field(default='x', metadata={'help': 'pick', 'choices': ['x', 'y']})


def test_config_from_cli_types_and_bools():
    c = E.config_from_cli(_Cfg, [])
    assert c == _Cfg()
    c = E.config_from_cli(_Cfg, ['--lr', '0.5', '--steps', '7', '--amp', '--sizes', '3', '4', '5',
                                 '--maybe', '9', '--choice', 'y', '--name', 'b'])
    assert (c.lr, c.steps, c.amp, c.sizes, c.maybe, c.choice, c.name) == (0.5, 7, True, (3, 4, 5), 9, 'y', 'b')
    assert E.config_from_cli(_Cfg, ['--no-amp']).amp is False
    with pytest.raises(SystemExit):
        E.config_from_cli(_Cfg, ['--choice', 'z'])


def test_cosine_schedule_endpoints_and_warmup():
    assert E.cosine_schedule(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert E.cosine_schedule(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert E.cosine_schedule(500, 100, 1.0, 0.1) == pytest.approx(0.1)          # clamped after the end
    assert E.cosine_schedule(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)   # cosine midpoint
    assert E.cosine_schedule(5, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) == pytest.approx(0.6)
    vals = [E.cosine_schedule(s, 50, 0.996, 1.0) for s in range(51)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))                         # EMA momentum rises


def test_autocast_and_scaler():
    with E.autocast('cpu', 'bf16'):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with E.autocast('cpu', 'off'):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    assert E.make_scaler('fp16', 'cpu').is_enabled() and not E.make_scaler('bf16', 'cpu').is_enabled()
    with pytest.raises(ValueError):
        E.autocast('cpu', 'fp8')


def test_setup_distributed_single_process(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    assert E.setup_distributed('cpu') == (0, 1, torch.device('cpu'))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='no GPU'):
            E.setup_distributed('cuda')


def test_checkpoint_roundtrip_atomic_and_bad_files(tmp_path):
    path = str(tmp_path / 'sub' / 'ck.pth')
    state = {'w': torch.arange(3.0), 'epoch': 2, 'config': {'a': 1, 't': (1, 2)}}
    E.save_checkpoint(state, path)
    back = E.load_checkpoint(path)
    assert torch.equal(back['w'], state['w']) and back['epoch'] == 2 and back['config']['t'] == (1, 2)
    assert os.listdir(tmp_path / 'sub') == ['ck.pth']                          # no tmp file left
    with pytest.raises(ValueError, match='does not exist'):
        E.load_checkpoint(str(tmp_path / 'nope.pth'))
    (tmp_path / 'trunc.pth').write_bytes(open(path, 'rb').read()[:50])
    with pytest.raises(ValueError, match='truncated'):
        E.load_checkpoint(str(tmp_path / 'trunc.pth'))
    torch.save({'obj': _Cfg()}, tmp_path / 'foreign.pth')                     # a pickled Python object
    with pytest.raises(ValueError, match='could run code from the file, so nothing was loaded'):
        E.load_checkpoint(str(tmp_path / 'foreign.pth'))


def test_param_groups_no_decay_on_bias_norm_tokens():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    m = M()
    groups = E.param_groups(m, 0.05, lr_scale_fn=lambda n: 0.5 if n.startswith('fc') else 1.0)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for g in groups if g['wd_scale'] == 1.0 for p in g['params']}
    assert decayed == {'fc.weight'}
    assert sum(len(g['params']) for g in groups) == 6                          # frozen one left out
    for g in groups:
        for p in g['params']:
            assert g['lr_scale'] == (0.5 if names[id(p)].startswith('fc') else 1.0)
    torch.optim.AdamW(groups)                                                  # accepted by the optimizer


def test_log_jsonl(tmp_path):
    E.log_jsonl(tmp_path / 'l.jsonl', {'step': 1, 'loss': torch.tensor(0.5)})
    E.log_jsonl(tmp_path / 'l.jsonl', {'step': 2, 'loss': 0.25})
    lines = [json.loads(l) for l in open(tmp_path / 'l.jsonl')]
    assert lines == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25}]


def test_non_finite_guard_skips_then_raises():
    g = E.NonFiniteGuard(max_consecutive=3)
    assert g(torch.tensor(1.0)) and g(torch.tensor(float('nan'))) is False
    assert g(torch.tensor(2.0)) and g.consecutive == 0 and g.n_skipped == 1
    assert g(torch.tensor(float('inf'))) is False and g(float('nan')) is False
    with pytest.raises(RuntimeError, match='3 steps in a row'):
        g(torch.tensor(float('nan')))


def test_epoch_keys_split_global_batches_across_ranks():
    one = E.epoch_keys(50, epoch=3, seed=1, rank=0, world=1, batch_size=8)         # 6 steps of 8
    two = [E.epoch_keys(50, epoch=3, seed=1, rank=r, world=2, batch_size=4) for r in range(2)]
    assert len(one) == 48 and len({k for k in one}) == 48 and all(e == 3 for e, _ in one)
    for step in range(6):   # the same global batch, split in halves
        assert one[8 * step:8 * step + 8] == two[0][4 * step:4 * step + 4] + two[1][4 * step:4 * step + 4]
    assert E.epoch_keys(50, 4, 1, 0, 1, 8) != one                                  # reshuffled each epoch


def test_stale_temporary_files_of_killed_runs_are_removed_at_start(tmp_path, capsys):
    """A run killed while writing leaves NAME.tmp<pid>; the next start in that folder removes it (and says so),
    but not the temporary file of a writer that is still running, nor other files."""
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / f'checkpoint.pth.tmp{dead.pid}'
    live = tmp_path / f'checkpoint.pth.tmp{os.getpid()}'
    for p in (stale, live, tmp_path / 'checkpoint.pth'):
        p.write_bytes(b'x')
    E.prepare_output_dir(str(tmp_path), dict(a=1))
    assert sorted(os.listdir(tmp_path)) == sorted(['checkpoint.pth', live.name, 'config.json'])
    assert 'removed' in capsys.readouterr().out


def test_atomic_open_leaves_no_temporary_file_on_error(tmp_path):
    path = tmp_path / 'f.bin'
    path.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with E.atomic_open(str(path)) as f:
            f.write(b'half')
            raise RuntimeError('killed mid-write')
    assert os.listdir(tmp_path) == ['f.bin'] and path.read_bytes() == b'old'
