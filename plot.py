"""Pictures drawn with pillow alone: charts of runs and scores, and the demo's pictures of predicted hands.

  `Chart`             one panel: axes with ticks and labels, lines, bars, dashed reference lines.
  `save_panels`       several panels in one PNG.
  `plot_run`          the training curves of a pretrain.py or finetune.py run from its log.jsonl
                      (`python evaluate.py --plot RUN_DIR`; both stages also draw them when they end).
  `plot_errors`       where the error is: the aligned error per joint, grouped by finger, and the PCK
                      curves behind AUC_J and AUC_V (`python evaluate.py --score` draws it).
  `draw_skeleton`, `overlay_mesh`   the 21 joints and a translucent mesh over an image.
  `run_demo`          `python evaluate.py --images DIR --checkpoint CKPT --out DIR`: per hand crop a
                      picture [input | mesh and joints over it (| side view)], an OBJ mesh, the MANO fit.
No matplotlib: the project runs on torch, numpy, pillow, scipy and tqdm only.
"""
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data import _show, find_images, load_rgb, normalize, to_tensor
from engine import atomic_open, write_atomic
from mano import matrix_to_axis_angle
from model import camera_translation
from synthetic import project, render_mesh

# FreiHAND's `plot_hand` colours (utils/fh_utils.py), channel-reversed as it draws them: wrist grey, then
# each finger base to tip in four shades: thumb blue, index cyan, middle green, ring orange, pinky magenta.
FREIHAND_COLORS = np.array([
    [0.4, 0.4, 0.4],
    [0.4, 0.0, 0.0], [0.6, 0.0, 0.0], [0.8, 0.0, 0.0], [1.0, 0.0, 0.0],
    [0.4, 0.4, 0.0], [0.6, 0.6, 0.0], [0.8, 0.8, 0.0], [1.0, 1.0, 0.0],
    [0.0, 0.4, 0.2], [0.0, 0.6, 0.3], [0.0, 0.8, 0.4], [0.0, 1.0, 0.5],
    [0.0, 0.2, 0.4], [0.0, 0.3, 0.6], [0.0, 0.4, 0.8], [0.0, 0.5, 1.0],
    [0.4, 0.0, 0.4], [0.6, 0.0, 0.6], [0.7, 0.0, 0.8], [1.0, 0.0, 1.0]])[:, ::-1]  # (21, 3) RGB
HAND_BONES = [(0 if k % 4 == 1 else k - 1, k) for k in range(1, 21)]  # wrist -> base -> ... -> tip
FINGERS = ('thumb', 'index', 'middle', 'ring', 'pinky')
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (23, 190, 207)]


def _rgb(c):
    return tuple(int(round(255 * v)) for v in c)


def _font(size):
    try:   # a scalable font where pillow has one (pillow >= 10.1 ships one), else its bitmap font
        return ImageFont.load_default(size)
    except TypeError:
        return ImageFont.load_default()


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [t for t in np.arange(math.floor(lo / step) * step, hi + step / 2, step) if lo - 1e-9 <= t <= hi + 1e-9]


class Chart:
    """One panel of `size` px (wider where its title needs it): call line/bars/hline/text in data coordinates,
    then `image()`. The y axis is linear, or logarithmic with `log_y`; ranges are fitted to what was drawn unless
    given."""

    def __init__(self, title, xlabel, ylabel, size=(480, 320), log_y=False, xlim=None, ylim=None):
        self.title, self.xlabel, self.ylabel, self.size, self.log_y = title, xlabel, ylabel, size, log_y
        self.xlim, self.ylim, self.items = xlim, ylim, []

    def line(self, x, y, label=None, color=None, width=2):
        x, y = np.asarray(x, float), np.asarray(y, float)
        ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if self.log_y else True)
        self.items.append(('line', x[ok], y[ok], label, color or PALETTE[len(self.items) % len(PALETTE)], width))

    def hline(self, y, label=None, color=(120, 120, 120)):
        self.items.append(('hline', None, np.array([y], float), label, color, 1))

    def bars(self, y, labels, colors=None, err=None):
        """Bars at x = 0, 1, ... with category `labels` under them and optional +- `err` whiskers."""
        y = np.asarray(y, float)
        self.items.append(('bars', np.arange(len(y)), y, labels, colors, None if err is None else np.asarray(err)))
        self.xlim = self.xlim or (-0.7, len(y) - 0.3)

    def _range(self):
        xs = np.concatenate([i[1] for i in self.items if i[0] != 'hline'] or [np.zeros(1)])
        ys = np.concatenate([i[2] if i[0] != 'bars' else np.r_[0, i[2] + (0 if i[5] is None else i[5])]
                             for i in self.items] or [np.ones(1)])
        x0, x1 = self.xlim or (xs.min(), xs.max() if xs.max() > xs.min() else xs.min() + 1)
        if self.ylim:
            return x0, x1, *self.ylim
        y0, y1 = ys.min(), ys.max()
        if self.log_y:
            return x0, x1, 10 ** math.floor(math.log10(y0)), 10 ** math.ceil(math.log10(y1))
        pad = 0.05 * (y1 - y0 or abs(y1) or 1)
        return x0, x1, (0 if y0 >= 0 and any(i[0] == 'bars' for i in self.items) else y0 - pad), y1 + pad

    def image(self):
        font, small = _font(13), _font(11)
        W, H = self.size
        # The centred title shares its rows with the y label at the top left: widen the panel until they do not meet.
        W = max(W, math.ceil(font.getlength(self.title) + 2 * (small.getlength(self.ylabel) + 12)))
        img = Image.new('RGB', (W, H), 'white')
        d = ImageDraw.Draw(img)
        left, right, top, bottom = 64, W - 12, 28, H - 56
        x0, x1, y0, y1 = self._range()
        ty = (lambda v: math.log10(v)) if self.log_y else (lambda v: v)
        X = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
        Y = lambda v: bottom - (ty(v) - ty(y0)) / ((ty(y1) - ty(y0)) or 1) * (bottom - top)
        d.text((W / 2, 6), self.title, fill='black', font=font, anchor='mt')
        d.text((W / 2, H - 4), self.xlabel, fill='black', font=small, anchor='mb')
        d.text((4, top - 16), self.ylabel, fill='black', font=small)
        yt = ([10 ** k for k in range(round(ty(y0)), round(ty(y1)) + 1)] if self.log_y else _ticks(y0, y1))
        for t in yt:
            d.line([(left, Y(t)), (right, Y(t))], fill=(232, 232, 232))
            d.text((left - 4, Y(t)), f'{t:g}', fill='black', font=small, anchor='rm')
        if not any(i[0] == 'bars' for i in self.items):
            for t in _ticks(x0, x1):
                d.text((X(t), bottom + 4), f'{t:g}', fill='black', font=small, anchor='mt')
        d.rectangle([left, top, right, bottom], outline='black')
        legend = []
        for kind, x, y, label, color, extra in self.items:
            if kind == 'line' and len(x):
                pts = [(X(a), Y(b)) for a, b in zip(x, y)]
                d.line(pts, fill=color, width=extra) if len(pts) > 1 else None
                for p in pts if len(pts) < 30 else []:
                    d.ellipse([p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5], fill=color)
            elif kind == 'hline':
                for a in np.arange(left, right, 8):
                    d.line([(a, Y(y[0])), (min(a + 4, right), Y(y[0]))], fill=color, width=2)
            elif kind == 'bars':
                w = 0.7 * (X(1) - X(0))
                for k, (a, b) in enumerate(zip(x, y)):
                    c = color[k] if isinstance(color, list) else (color or PALETTE[0])
                    d.rectangle([X(a) - w / 2, Y(b), X(a) + w / 2, Y(max(y0, 0))], fill=c)
                    if extra is not None:
                        d.line([(X(a), Y(b - extra[k])), (X(a), Y(b + extra[k]))], fill='black', width=2)
                    d.text((X(a), bottom + 4), str(label[k]), fill='black', font=small, anchor='mt')
                label = None
            if label:
                legend.append((label, color))
        if legend:   # top right, on white so that the lines under it do not cross the text
            d.rectangle([right - 156, top + 3, right - 3, top + 9 + 15 * len(legend)], fill='white', outline=(200,) * 3)
        for k, (label, color) in enumerate(legend):
            y = top + 6 + 15 * k
            d.rectangle([right - 150, y + 3, right - 140, y + 9], fill=color)
            d.text((right - 136, y), label, fill='black', font=small)
        return img


def save_panels(charts, path, columns=2):
    """Draw `charts` on a grid of `columns` into one PNG (atomically) -> path."""
    imgs = [c.image() for c in charts]
    W, H = max(im.width for im in imgs), max(im.height for im in imgs)   # cells fit the widest panel
    rows = math.ceil(len(imgs) / columns)
    sheet = Image.new('RGB', (W * min(columns, len(imgs)), H * rows), 'white')
    for k, im in enumerate(imgs):
        sheet.paste(im, ((k % columns) * W, (k // columns) * H))
    with atomic_open(path) as f:
        sheet.save(f, format='PNG')
    return path


# -------- training curves
def read_log(path):
    """log.jsonl -> list of records; a clear error for a missing or empty log."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} does not exist: --plot needs the folder of a pretrain.py or finetune.py run')
    records = [json.loads(line) for line in open(path) if line.strip()]
    if not records:
        raise ValueError(f'{path} is empty: nothing to plot yet')
    return records


def _series(records, key):
    rows = [(r['step'], r[key]) for r in records if r.get(key) is not None]
    return np.array(rows, float).T if rows else (np.zeros(0), np.zeros(0))


def plot_run(run_dir, path=None):
    """curves.png of a run: pretraining's four losses, teacher [CLS] entropy against its uniform ceiling and
    the pseudo-keypoint spread; fine-tuning's loss terms and the validation PA-MPVPE next to the mean hand's."""
    records = read_log(os.path.join(run_dir, 'log.jsonl'))
    steps = {r['step'] for r in records}
    if len(steps) < 2:
        raise ValueError(f'{run_dir}/log.jsonl has one logged step: run longer (or lower --log_every) to plot curves')
    cfg_path = os.path.join(run_dir, 'config.json')
    cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
    if 'w_pix' in cfg or any(k in r for r in records for k in ('pix', 'mim', 't_entropy')):   # pretrain.py
        losses = Chart('HandMIM pretraining losses', 'step', 'loss')
        for k, name in (('cls', '[CLS] distillation'), ('pka', 'pseudo keypoints'), ('mim', 'patch MIM'),
                        ('pix', 'pixels (normalized)')):
            if any(k in r for r in records):
                losses.line(*_series(records, k), name)
        charts = [losses]
        if any('t_entropy' in r for r in records):   # the teacher's signs (runs with a teacher-based loss)
            entropy = Chart('teacher [CLS] distribution', 'step', 'entropy (nats)')
            entropy.line(*_series(records, 't_entropy'), 'centred teacher')
            if cfg.get('out_dim'):
                entropy.hline(math.log(cfg['out_dim']), 'uniform (collapse)')
            spread = Chart('pseudo keypoints', 'step', 'spread across images ([-1, 1] units)')
            spread.line(*_series(records, 'kp_spread'), 'std over the batch')
            charts += [entropy, spread]
    else:   # finetune.py
        terms = Chart('fine-tuning loss terms (last regressor iteration)', 'step', 'value', log_y=True)
        for k in ('j3d', 'v3d', 'hand', 'j2d', 'rot', 'beta', 'heatmap'):
            if any(k in r for r in records):
                terms.line(*_series(records, k), k)
        val = Chart('validation (held-out part of the training set)', 'step', 'PA-MPVPE (mm)')
        x, y = _series(records, 'val_pa_mpvpe_mm')
        if not len(x):
            raise ValueError(f'{run_dir}/log.jsonl has no validation yet: it is logged at the end of each epoch')
        val.line(x, y, 'fine-tuned')
        mean = [r['val_mean_hand_pa_mpvpe_mm'] for r in records if 'val_mean_hand_pa_mpvpe_mm' in r]
        if mean:
            val.hline(mean[0], 'mean hand')
        charts = [terms, val]
    return save_panels(charts, path or os.path.join(run_dir, 'curves.png'))


def draw_curves(run_dir):
    """`plot_run` at the end of a stage: says where the picture went, or why there is none (a short run)."""
    try:
        print(f'training curves: {plot_run(run_dir)}')
    except (ValueError, FileNotFoundError) as e:
        print(f'no training curves: {e}')


# -------- where the error is
def plot_errors(profile, path):
    """Per-joint aligned error bars (FreiHAND colours, grouped by finger) and the aligned PCK curves of joints
    and vertices. `profile`: evaluate.error_profile's dict."""
    joints = Chart('aligned error per joint (PA-MPJPE)', 'joint: wrist, then base -> tip per finger', 'mm',
                   size=(640, 320))
    names = ['W'] + [f'{f[0].upper()}{k}' for f in FINGERS for k in range(1, 5)]
    joints.bars(profile['joint_mm'], names, colors=[_rgb(c) for c in FREIHAND_COLORS])
    pck = Chart('PCK after Procrustes alignment', 'threshold (mm)', 'fraction within', size=(640, 320),
                ylim=(0, 1.02))
    pck.line(profile['thresholds_mm'], profile['pck_j'], f"joints (AUC_J {profile['auc_j']:.3f})")
    if profile.get('pck_v') is not None:
        pck.line(profile['thresholds_mm'], profile['pck_v'], f"vertices (AUC_V {profile['auc_v']:.3f})")
    return save_panels([joints, pck], path, columns=1)


# -------- hand drawings (the demo)
def draw_skeleton(image, uv, radius=3.0, width=2):
    """(H, W, 3) uint8 with the 21 joints (FreiHAND order, pixels (21, 2)) as FreiHAND-coloured bones
    and dots, as FreiHAND's plot_hand draws them."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    rgb = [_rgb(c) for c in FREIHAND_COLORS]
    for a, b in HAND_BONES:
        draw.line([tuple(uv[a]), tuple(uv[b])], fill=rgb[b], width=width)
    for (u, v), col in zip(uv, rgb):
        draw.ellipse([u - radius, v - radius, u + radius, v + radius], fill=col, outline=(255, 255, 255))
    return np.asarray(pil)


def overlay_mesh(image, verts, faces, K, opacity=0.55, color=(0.55, 0.75, 1.0)):
    """(H, W, 3) uint8: a shaded mesh blended over `image` at `opacity`, so the hand under it stays visible."""
    shaded, mask = render_mesh(verts, faces, K, image=image, color=color, return_mask=True)
    out = image.astype(np.float64)
    out[mask] = (1 - opacity) * out[mask] + opacity * shaded[mask]
    return np.rint(out).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# DEMO: a fine-tuned network on a folder of hand crops -> overlay PNG, OBJ mesh, MANO parameters (.npz)
#
# Each image is taken to be a hand crop (as FreiHAND's are): its centred square of side L = min(width,
# height) is resized to the network's input side S. Pixel centres sit at integer coordinates (as in
# data.py), so that crop maps image pixel u to u' = (u - x0 + 1/2) S / L - 1/2, an affine map A. A single
# image has no calibration, so the crop's pinhole camera is ASSUMED: focal f = focal x S (--focal, in
# units of the crop side; 2.34 = 525 px on a 224 px crop, the middle of FreiHAND's range as data.py's
# synthetic sets use it), principal point at the crop centre (S - 1)/2. The same camera in the pixels of
# the input image is A^-1 K. `model.camera_translation` turns the regressor's weak-perspective camera
# into the translation that puts the mesh in that camera's frame; its depth is only as right as the
# focal length is (a wrong focal scales the depth, the 2D overlay stays where the network put it).
#
# Left hands (--left): the network knows right hands only. The crop is mirrored (u' -> S - 1 - u', which
# with the principal point at the centre is x -> -x in the camera frame), the right hand predicted, and
# its mesh mirrored back: x of vertices and joints negated, the faces' winding reversed (a mirror turns
# an outward counter-clockwise surface inside out). The MANO parameters stored are those of the RIGHT
# hand seen in the MIRRORED crop; MANO_right(pose, betas) + transl, with x negated, is the left hand.
# (For the official MANO_LEFT model, which is close to the mirror image of the right one, the usual
# conversion is pose.reshape(16, 3) * (1, -1, -1) per joint, i.e. M R M with M = diag(-1, 1, 1), and
# transl * (-1, 1, 1); we store the right-hand values, which are exact for the model we ran.)

DEMO_KEYS = ('pose', 'betas', 'cam', 'transl', 'joints', 'vertices', 'K', 'K_crop', 'K_image', 'left')


def centre_square(width, height):
    """PIL box (x0, y0, x1, y1) of an image's centred square, in pixel-edge coordinates."""
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def crop_affine(box, size):
    """(3, 3) map from image pixels to the pixels of the square PIL `box` resized to `size` x `size`."""
    x0, y0, x1, _ = box
    k = size / (x1 - x0)
    return np.array([[k, 0, (0.5 - x0) * k - 0.5], [0, k, (0.5 - y0) * k - 0.5], [0, 0, 1.0]])


def crop_intrinsics(focal, size):
    """(3, 3) pinhole intrinsics of a `size` px crop: focal `focal * size` px, principal point at its centre."""
    f, c = focal * size, (size - 1) / 2
    return np.array([[f, 0, c], [0, f, c], [0, 0, 1.0]])


def mirror_x(points):
    """Mirror (..., 3) camera-frame points in the x = 0 plane (a horizontally flipped crop)."""
    return points * np.array([-1.0, 1.0, 1.0], dtype=points.dtype)


def obj_text(verts, faces):
    """Wavefront OBJ of a triangle mesh: `v x y z` lines (metres), then `f a b c` with 1-based indices."""
    lines = [f'v {x:.6f} {y:.6f} {z:.6f}' for x, y, z in verts]
    lines += [f'f {a + 1} {b + 1} {c + 1}' for a, b, c in faces]
    return '\n'.join(lines) + '\n'


def _output_names(paths, root):
    """Output path stem per image: its path under `root` without the extension; images that would
    share one (hand.jpg, hand.png) keep their extension in the name (hand_jpg, hand_png)."""
    stems = [os.path.splitext(os.path.relpath(p, root))[0] for p in paths]
    clash = {s for s, n in Counter(stems).items() if n > 1}
    return [s + '_' + os.path.splitext(p)[1][1:].lower() if s in clash else s for s, p in zip(stems, paths)]


@torch.no_grad()
def predict_hand(model, crop, focal, left=False, device='cpu'):
    """MANO fit of one square RGB crop (PIL, the network's input side S) -> dict of numpy arrays:
    pose (48,) absolute axis-angle, betas (10,), cam (3,) = (s, tx, ty), transl (3,), and joints (21, 3),
    vertices (V, 3) in the crop's camera frame (metres), K_crop (3, 3). With `left` the crop is mirrored
    first; pose/betas/cam/transl describe that mirrored right hand, joints/vertices the left hand."""
    S = crop.size[0]
    if left:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    out = model(normalize(to_tensor(crop))[None].to(device))[-1]  # the last regressor iteration
    K = torch.as_tensor(crop_intrinsics(focal, S), dtype=torch.float32, device=device)
    transl = camera_translation(out['cam'].float(), K[None], S)[0]  # (3,)
    joints, verts = out['joints'][0] + transl, out['vertices'][0] + transl  # (21, 3), (V, 3)
    res = dict(pose=matrix_to_axis_angle(out['rotmat'][0]).reshape(48), betas=out['betas'][0], cam=out['cam'][0],
               transl=transl, joints=joints, vertices=verts, K_crop=K)
    res = {k: v.float().cpu().numpy() for k, v in res.items()}
    if left:
        res['joints'], res['vertices'] = mirror_x(res['joints']), mirror_x(res['vertices'])
    return res


def demo_picture(image, box, res, faces, S, size, side=False):
    """The picture of one prediction, `size` px per panel: [the crop `box` of `image` (PIL) | the same crop with
    the predicted mesh, translucent, and its 21 joints | with `side`: the mesh turned 90 degrees about the
    vertical axis, on grey]. Returns it (uint8) and the crop camera's intrinsics K at `size` px."""
    K = crop_affine(box, size) @ np.linalg.inv(crop_affine(box, S)) @ res['K_crop']  # S px -> size px
    crop = np.asarray(image.resize((size, size), Image.BICUBIC, box=box))
    uv = project(res['joints'].astype(np.float64), K)  # (21, 2) pixels
    drawn = draw_skeleton(overlay_mesh(crop, res['vertices'], faces, K), uv, radius=max(2.0, size / 100),
                          width=max(1, round(size / 160)))
    panels = [crop, drawn]
    if side:  # about the vertical axis through the hand's centre, seen by the same camera
        c = res['vertices'].mean(0)
        turn = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # 90 degrees about y
        panels.append(render_mesh((res['vertices'] - c) @ turn.T + c, faces, K,
                                  image=np.full((size, size, 3), 200, np.uint8), color=(0.55, 0.75, 1.0)))
    return np.concatenate(panels, 1), K


def save_hand(stem, png, res, faces):
    """Write stem.png (the overlay), stem.obj (the mesh) and stem.npz, each atomically. The npz holds
    pose (48,) absolute axis-angle, betas (10,), cam (3,) = (s, tx, ty) on the network crop's [-1, 1]
    coordinates, transl (3,): MANO(pose, betas) + transl is the right hand in that crop's camera frame
    (metres; for a left hand: of the MIRRORED crop); joints (21, 3) (FreiHAND order) and vertices (V, 3)
    of the hand as it appears in the image (left hands mirrored back); the intrinsics of that camera in
    the overlay PNG's pixels (K), the network crop's (K_crop) and the input image's (K_image); left."""
    import io
    os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(png).save(buf, format='PNG')
    write_atomic(stem + '.png', buf.getvalue())
    # A mirrored mesh is inside out: reversing each face's winding makes its normals point outward again.
    write_atomic(stem + '.obj', obj_text(res['vertices'], faces[:, ::-1] if res['left'] else faces))
    buf = io.BytesIO()
    np.savez(buf, **{k: res[k] for k in DEMO_KEYS})
    write_atomic(stem + '.npz', buf.getvalue())


def run_demo(cfg, load_model):
    """Predict every image under cfg.images and write <name>.png (overlay), <name>.obj, <name>.npz into
    cfg.out (same sub-folders). Checks the checkpoint and the folder before writing anything; files that
    do not decode are skipped with a warning and counted; `load_model(path)` -> (network, its config) is
    evaluate.load_finetuned. Returns dict(written=..., skipped=...)."""
    if not cfg.checkpoint or not cfg.out:
        raise ValueError('the demo needs --images DIR --checkpoint CKPT --out DIR')
    if cfg.focal <= 0 or cfg.overlay_size < 16:
        raise ValueError(f'--focal must be > 0 and --overlay_size >= 16, got {cfg.focal} and {cfg.overlay_size}')
    # Outputs inside the image folder (--out DIR/demo) must not become inputs of the next run.
    out_dir = os.path.realpath(cfg.out)
    paths = [p for p in find_images(cfg.images) if os.path.commonpath([os.path.realpath(p), out_dir]) != out_dir]
    if not paths:
        raise ValueError(f'no images under {cfg.images} outside the output folder {cfg.out}')
    try:
        model, net_cfg = load_model(cfg.checkpoint)
    except (KeyError, TypeError, AttributeError) as e:  # a dict that only looks like ours
        raise ValueError(f'{cfg.checkpoint} is not a usable finetune.py checkpoint ({type(e).__name__}: {e})') from None
    device = next(model.parameters()).device
    S, faces = model.vit.img_size, model.mano.faces.cpu().numpy()
    os.makedirs(cfg.out, exist_ok=True)  # only now: a bad checkpoint or folder leaves nothing behind
    write_atomic(os.path.join(cfg.out, 'demo_config.json'), json.dumps(dict(asdict(cfg), network=net_cfg), indent=1))
    written, skipped, degenerate = 0, 0, 0
    for path, name in zip(tqdm(paths, desc='demo', unit='img'), _output_names(paths, cfg.images)):
        image = load_rgb(path)
        if image is None:
            skipped += 1
            tqdm.write(f'skipping {_show(path)}: not a decodable image', file=sys.stderr)
            continue
        box = centre_square(*image.size)
        crop = image.resize((S, S), Image.BILINEAR, box=box)  # PIL filters by the scale: no aliasing
        res = predict_hand(model, crop, cfg.focal, cfg.left, device)
        degenerate += int(res['cam'][0] <= 0)
        png, res['K'] = demo_picture(image, box, res, faces, S, cfg.overlay_size, cfg.side)
        res['K_image'] = np.linalg.inv(crop_affine(box, S)) @ res['K_crop']
        res['left'] = np.array(cfg.left)
        save_hand(os.path.join(cfg.out, name), png, res, faces)
        written += 1
    print(f'demo: {written} hands written to {cfg.out}' + (f', {skipped} undecodable files skipped' if skipped else ''))
    if degenerate:  # camera_translation clamps s, so such a mesh sits far away: a dot, not a hand
        print(f'warning: {degenerate} of {written} hands have a non-positive weak-perspective scale s; the '
              f'network has not learned the camera (train longer, or raise finetune.py --w_j2d)', file=sys.stderr)
    if not written:
        raise ValueError(f'none of the {len(paths)} image files under {cfg.images} could be decoded')
    return dict(written=written, skipped=skipped)
