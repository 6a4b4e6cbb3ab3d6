"""The project's layout as rules: stages are leaves (pretrain.py, finetune.py and evaluate.py import no other
stage), no import cycle between the project's files, mano.py / model.py stand alone so they can be copied, and
the README's file table, the commands of the README and the lab notes and their links match the files."""
import ast
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {'pretrain', 'finetune', 'evaluate'}


def project_imports():
    """{module: set of project modules it imports anywhere in the file (top level or inside functions)}."""
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    graph = {}
    for name in modules:
        tree = ast.parse(open(os.path.join(ROOT, name + '.py')).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split('.')[0])
        graph[name] = (found & modules) - {name}
    return graph


def test_stages_are_leaves():
    graph = project_imports()
    assert STAGES <= set(graph)
    for stage in STAGES:
        assert not graph[stage] & STAGES, f'{stage}.py imports the stage(s) {graph[stage] & STAGES}'
    assert not graph['mano'] and not graph['model'], 'mano.py and model.py must import nothing from the project'


def test_no_import_cycle():
    graph, state = project_imports(), {}

    def visit(node, path):
        if state.get(node) == 'open':
            raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(node):] + [node]))
        if state.get(node) != 'done':
            state[node] = 'open'
            for nxt in sorted(graph[node]):
                visit(nxt, path + [node])
            state[node] = 'done'
    for node in sorted(graph):
        visit(node, [])


def test_mano_layer_alone_from_a_model_file(tmp_path):
    """`import mano; mano.MANO(mano.load_mano(PATH))` needs no other project file: the synthetic module (which
    wrote the file here) is not in the import graph of the run that loads it."""
    import synthetic
    path = tmp_path / 'MANO_RIGHT.pkl'
    synthetic.save_mano(synthetic.synthetic_mano(), path)
    code = ('import sys, torch, mano; layer = mano.MANO(mano.load_mano(sys.argv[1])); '
            'out = layer(torch.zeros(2, 48)); '
            'print(sorted(m for m in sys.modules if m in {"synthetic", "engine", "data", "model", "plot"})); '
            'print(out.vertices.shape[1], float(out.joints.abs().sum()))')
    res = subprocess.run([sys.executable, '-c', code, str(path)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    loaded, numbers = res.stdout.splitlines()
    assert loaded == '[]'
    V, total = numbers.split()
    assert int(V) == len(synthetic.synthetic_mano()['v_template']) and np.isfinite(float(total))


def test_files_stay_readable_and_the_readme_counts_their_lines():
    """Every project file within the line budget (500, model.py 600; synthetic.py, the licence-free stand-in
    for MANO and its datasets, is the README's stated exception), and the README's file table gives each
    file's true line count."""
    limits = {'model.py': 600, 'synthetic.py': None}
    files = sorted(f for f in os.listdir(ROOT) if f.endswith('.py'))
    files += sorted('scripts/' + f for f in os.listdir(os.path.join(ROOT, 'scripts')) if f.endswith('.py'))
    counts = {}
    for f in files:
        with open(os.path.join(ROOT, f)) as text:
            counts[f] = sum(1 for _ in text)
    for f, n in counts.items():
        limit = limits.get(f, 500)
        assert limit is None or n <= limit, f'{f} has {n} lines, over {limit}'
    with open(os.path.join(ROOT, 'README.md')) as text:
        readme = text.read()
    table = dict(re.findall(r'^\| `([\w/]+\.py)` \| (\d+) \|', readme, flags=re.M))
    assert {'mano.py', 'model.py', 'finetune.py', 'synthetic.py'} <= set(table), table
    wrong = {f: (int(n), counts.get(f)) for f, n in table.items() if counts.get(f) != int(n)}
    assert not wrong, f'README file table (said, actual): {wrong}'


def documented_commands(doc):
    """Every `python FILE.py ...` command of the markdown file `doc`, from its code blocks (continuation lines
    joined, comments dropped) and its inline code (which may wrap), as (file, argv). Inline ones with a
    placeholder ([--flag], ...) are templates, not commands, and are left out."""
    text = open(os.path.join(ROOT, doc), encoding='utf-8').read()
    lines = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        lines += [line.split(' #')[0] for line in block.replace('\\\n', ' ').splitlines()]
    lines += [c for c in re.findall(r'`(python [^`]+)`', text.replace('\n', ' ')) if '[' not in c]
    found = []
    for line in lines:
        words = shlex.split(line.strip())
        if len(words) > 1 and words[0] == 'python' and words[1].endswith('.py') and '...' not in words:
            found.append((words[1], words[2:]))
    return found


def test_documented_commands_parse_with_their_scripts_flags(capsys, monkeypatch):
    """Each command of the README and the lab notes has the flags of its script (doc rot: a renamed or removed
    flag, a value of the wrong type or outside the choices). Parsed only, with the script's own dataclass
    config, nothing run; tested to fail on a flag the script does not have."""
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'scripts'))   # as when a script runs: its folder first
    from engine import config_from_cli

    def config_class(path):
        spec = importlib.util.spec_from_file_location('readme_' + re.sub(r'\W', '_', path), os.path.join(ROOT, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes = [c for n, c in vars(module).items() if n.endswith('Config') and dataclasses.is_dataclass(c)
                   and c.__module__ == module.__name__]
        assert len(classes) == 1, f'{path}: expected one *Config dataclass, found {classes}'
        return classes[0]

    commands = documented_commands('README.md') + documented_commands(os.path.join('docs', 'results.md'))
    files = {f for f, _ in commands}
    assert {'synthetic.py', 'pretrain.py', 'finetune.py', 'evaluate.py', 'scripts/bench.py'} <= files, files
    classes = {f: config_class(f) for f in files}
    bad = []
    for f, argv in commands:
        try:
            config_from_cli(classes[f], argv)
        except SystemExit as e:   # 0 for --help
            if e.code:
                bad.append(f'python {f} {" ".join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]}')
    assert not bad, 'documented commands that their scripts reject:\n' + '\n'.join(bad)
    with pytest.raises(SystemExit):   # the check itself can fail
        config_from_cli(classes['finetune.py'], ['--no_such_flag', '1'])


def heading_anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.lstrip('#').strip().lower()).replace(' ', '-')


def broken_links(root, doc):
    """(relative links of root/doc, those whose file is missing or whose '#anchor' no heading of it has)."""
    def read(path):
        with open(os.path.join(root, path), encoding='utf-8') as f:
            return f.read()

    targets = [t for t in re.findall(r'\]\(([^)\s]+)\)', read(doc)) if not re.match(r'\w+://', t)]
    anchors, bad = {}, []   # {linked file: its headings' anchors}, each file read once
    for target in targets:
        path, _, anchor = target.partition('#')
        path = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(root, path)):
            bad.append(f'{doc}: {target} (no such file)')
        elif anchor:
            if path not in anchors:
                anchors[path] = {heading_anchor(line) for line in read(path).splitlines() if line.startswith('#')}
            if anchor not in anchors[path]:
                bad.append(f'{doc}: {target} (no such heading)')
    return targets, bad


def test_links_between_the_docs_resolve(tmp_path):
    """Each relative link of the README and the lab notes names a file that exists and, after '#', a heading of
    that file (doc rot: a section renamed, a result file moved); tested to fail on an anchor no heading has."""
    for doc, least in (('README.md', 5), (os.path.join('docs', 'results.md'), 0)):
        targets, bad = broken_links(ROOT, doc)
        assert not bad, '\n'.join(bad)
        assert len(targets) >= least, doc
    assert heading_anchor('## A tie (3 seeds): 2% `--keep_regressor`') == 'a-tie-3-seeds-2---keep_regressor'
    (tmp_path / 'a.md').write_text('# A tie (3 seeds)\n[ok](#a-tie-3-seeds) [bad](#a-tie) [gone](b.md)\n')
    assert broken_links(str(tmp_path), 'a.md')[1] == ['a.md: #a-tie (no such heading)', 'a.md: b.md (no such file)']
