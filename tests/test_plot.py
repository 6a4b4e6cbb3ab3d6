"""Tests of plot.py: charts drawn with pillow alone (training curves, errors) and the demo's drawings."""
import json
import math

import numpy as np
import pytest
from PIL import Image

import evaluate
import plot


def _write_log(folder, records, config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def _not_blank(img, box):
    """Pixels inside `box` that are not white: something was drawn there."""
    a = np.asarray(img.crop(box)).astype(int)
    return (np.abs(a - 255).sum(-1) > 30).mean()


def test_training_curves_of_both_stages(tmp_path):
    pre = [dict(step=s, epoch=0, loss=9 - s / 10, cls=6 - s / 20, pka=0.3, mim=2.0 - s / 50, pix=1 / (1 + s),
                t_entropy=6.9 - s / 100, kp_spread=0.01 * s) for s in range(1, 21)]
    fine = [dict(step=s, epoch=s // 10, loss=1 / s, j3d=0.02 / s, v3d=0.02 / s, hand=0.01, j2d=0.2, rot=0.1, beta=0.5)
            for s in range(1, 31)]
    fine += [dict(step=10 * e, epoch=e, val_pa_mpjpe_mm=12 - e, val_pa_mpvpe_mm=11 - e) for e in (1, 2, 3)]
    fine.insert(0, dict(step=0, epoch=0, val_mean_hand_pa_mpvpe_mm=11.5, val_mean_hand_pa_mpjpe_mm=13.0))
    for name, records, panels in (('pre', pre, 3), ('fine', fine, 2)):
        run = _write_log(tmp_path / name, records, dict(out_dim=1024))
        assert evaluate.main(['--plot', str(run)]) == 0
        img = Image.open(run / 'curves.png')
        W, H = img.size[0] // 2, 320                         # two columns of equal cells, each a panel (480
        assert W >= 480 and img.size == (2 * W, H * math.ceil(panels / 2))  # px, wider for a long title)
        for k in range(panels):                              # inside every panel's axes something was drawn
            x0, y0 = (k % 2) * W, (k // 2) * H
            assert _not_blank(img, (x0 + 70, y0 + 32, x0 + W - 16, y0 + H - 60)) > 0.005


@pytest.mark.parametrize('records, message', [([dict(step=1, loss=1.0)], 'one logged step'),
                                              ([dict(step=1, loss=1.0, j3d=1), dict(step=2, loss=0.5, j3d=1)],
                                               'no validation yet'),
                                              ([], 'empty')])
def test_curves_of_a_short_or_partial_log_are_a_clear_message(tmp_path, capsys, records, message):
    run = _write_log(tmp_path / 'run', records, {})
    assert evaluate.main(['--plot', str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err and not (run / 'curves.png').exists()


def test_error_chart_and_bars(tmp_path):
    t = np.linspace(0, 50, 100)
    profile = dict(joint_mm=np.linspace(5, 15, 21), thresholds_mm=t, pck_j=np.clip(t / 30, 0, 1), auc_j=0.6,
                   pck_v=np.clip(t / 25, 0, 1), auc_v=0.7)
    img = Image.open(plot.plot_errors(profile, str(tmp_path / 'errors.png')))
    assert img.size == (640, 640)
    assert _not_blank(img, (70, 32, 620, 260)) > 0.05          # the bars
    assert _not_blank(img, (70, 352, 620, 580)) > 0.005        # the curves


def test_a_title_wider_than_its_panel_widens_the_panel_and_its_sheet(tmp_path):
    title = 'a title far wider than the narrow panel it belongs to'
    wide, narrow = plot.Chart(title, 'x', 'y', size=(150, 120)), plot.Chart('t', 'x', 'y', size=(150, 120))
    for c in (wide, narrow):
        c.line([0, 1], [0, 1])
    assert wide.image().width >= plot._font(13).getlength(title) + 8 and narrow.image().size == (150, 120)
    with Image.open(plot.save_panels([narrow, wide], str(tmp_path / 'sheet.png'))) as sheet:
        assert sheet.size == (2 * wide.image().width, 120)   # equal cells, none cut by its neighbour


def test_a_title_that_fits_but_meets_the_y_label_widens_the_panel():
    ylabel = 'PA-MPVPE on every image (mm)'
    fits = plot.Chart('a title of 330 pixels or so, which fits the panel', 'x', ylabel, size=(360, 120))
    fits.line([0, 1], [0, 1])
    W = fits.image().width
    assert (W - plot._font(13).getlength(fits.title)) / 2 > 4 + plot._font(11).getlength(ylabel)


def test_skeleton_and_translucent_mesh_keep_the_image_visible():
    import torch
    from data import resolve_mano
    layer = resolve_mano('synthetic')
    with torch.no_grad():
        out = layer(torch.zeros(1, 48))
    verts = out.vertices[0].double().numpy() + [0, 0, 0.5]
    K = np.array([[300.0, 0, 63.5], [0, 300.0, 63.5], [0, 0, 1]])
    bg = np.zeros((128, 128, 3), np.uint8)
    bg[:, ::2] = 255                                             # stripes: seen through the mesh
    over = plot.overlay_mesh(bg, verts, layer.faces.numpy(), K, opacity=0.5)
    covered = np.abs(over.astype(int) - bg).sum(-1) > 0
    assert 0.05 < covered.mean() < 0.9
    inside = over[covered]
    assert inside[:, 0].std() > 20                               # the stripes still show under the mesh
    uv = plot.project(out.joints[0].double().numpy() + [0, 0, 0.5], K)
    drawn = plot.draw_skeleton(bg, uv)
    assert drawn.shape == bg.shape and (drawn != bg).any()
