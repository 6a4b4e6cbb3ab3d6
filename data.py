"""Data for HandMIM (SPEC.md section 4): image folders, FreiHAND/HO3Dv2 loaders, augmentations, synthetic hands.

In reading order:
  1. Robust decoding (`load_rgb`) and the unlabeled `ImageFolder` used for pretraining.
  2. Image tensors and warps: every image operation is ONE affine map A (source pixel -> output pixel)
     applied by `warp_affine`; labels follow the same map (a crop: K' = A K), so they cannot drift apart.
  3. `PretrainAugment`: iBOT's multi-crop as similarities, each view with its 2x3 source->view affine
     (PKA maps pseudo keypoints between views with A_i A_j^-1).
  4. `FinetuneAugment`, `FreiHAND`, `HO3D`: labelled samples in the SAMPLE format below.
  5. `rasterize` / `render_mesh`: a numpy z-buffer renderer (also used by evaluate.py's demo).
  6. `synth`: right hands rendered with a MANO model into the FreiHAND v2 (or HO3Dv2) layout.

SAMPLE (what FreiHAND/HO3D return; unknown fields are zeros and their flag is False):
  image (3, S, S) float, ImageNet-normalized | K (3, 3) crop intrinsics | joints3d (21, 3) metres, OpenCV
  camera frame, internal (FreiHAND) order | verts (V, 3) (V = 0 for HO3D evaluation) | pose (48,) absolute
  axis-angle, camera frame | betas (10,) | joints2d (21, 2) crop pixels | root (3,) camera-frame wrist |
  scale () FreiHAND's bone length |joints3d[9] - joints3d[10]| | has_3d, has_verts, has_mano (bool) | index.
  MANO(pose, betas) reproduces joints3d and verts up to a translation: add root - joints[:, 0].

Conventions: pixel centres at integer coordinates (OpenCV); metres; right hands only, so never a horizontal
flip. Shapes: S crop side, V vertices, F faces, R (triangle, row) spans, P (triangle, pixel) fragments,
M covered pixels.

Run:  python data.py synth ./hands --n 2000 [--mano mano/MANO_RIGHT.pkl]   # FreiHAND layout
      python data.py synth ./ho3d_synth --n 60 --layout ho3d
"""
import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from tqdm import tqdm

from mano import (FREIHAND_TO_MANO, MANO, MANO_TO_FREIHAND, axis_angle_to_matrix, find_mano, load_mano,
                  matrix_to_axis_angle)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
SYNTH_HINT = 'To try everything without data, make a synthetic set: python data.py synth ./hands --n 2000'
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])  # HO3D: y and z negated (a 180 degree turn about x, det +1)


# 1. Robust image decoding and the unlabeled image folder

def _show(path):
    """A printable form of any file name (non-UTF-8 bytes shown as \\xNN instead of crashing print)."""
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def _to_rgb(im):
    """Any PIL mode -> RGB. 16-bit is rescaled (65535 -> 255), not clipped; alpha is flattened on white."""
    if im.mode.startswith('I;16') or im.mode in ('I', 'F'):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == 'F' and a.max() <= 1:  # float images in [0, 1]
            a = a * 255
        elif im.mode != 'F' and (im.mode != 'I' or a.max() > 255):  # 'I' from old PNG readers may be 8 bit
            a = a / 257.0                                            # 257 = 65535 / 255, exact at both ends
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or 'transparency' in im.info:
        rgba = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba).convert('RGB')
    return im.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, ...


def _open(path, decode):
    """(image or None, reason or None). A decompression-bomb warning counts as a failure, like the error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if not decode:
                    return im.size, None
                im.load()  # decode now: a truncated file fails here, not later inside a worker
                return _to_rgb(ImageOps.exif_transpose(im)), None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... on bad files
        return None, f'{type(e).__name__}: {e}'


def load_rgb(path):
    """Decode an image file into an RGB PIL image, or return None if it cannot be decoded."""
    return _open(path, decode=True)[0]


def find_images(root):
    """Sorted image paths under `root`, recursively, following symlinks but never around a loop."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f'Image folder {_show(root)} does not exist or is not a folder. {SYNTH_HINT}')
    paths, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):  # a file link loop lands in `files`
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlinked folder we already walked (or a loop back to it)
            subfolders.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        paths += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) found under {_show(root)}. '
                                f'{SYNTH_HINT}')
    return sorted(paths)


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursively), unlabeled; `__getitem__` returns `transform(rgb_pil)`.
    Files whose header does not open are dropped at construction, files that fail to decode later (e.g.
    truncated) are replaced by the next one: one warning each, counted in `n_skipped` (per worker)."""

    def __init__(self, root, transform=None):
        self.root, self.transform, self.n_skipped, self._warned = root, transform, 0, set()
        paths, self.paths = find_images(root), []
        # header only (~50 us per file): catches empty, non-image, bomb, unreadable files and link loops
        for p in tqdm(paths, desc='checking images', disable=len(paths) < 5000, leave=False):
            size, reason = _open(p, decode=False)
            if size is None:
                self._skip(p, reason)
            else:
                self.paths.append(p)
        if self.n_skipped:
            print(f'ImageFolder: {len(self.paths)} images, {self.n_skipped} undecodable files skipped',
                  file=sys.stderr)
        if not self.paths:
            raise ValueError(f'None of the files under {_show(root)} could be decoded. {SYNTH_HINT}')

    def _skip(self, path, reason):
        if path not in self._warned:
            self._warned.add(path)
            self.n_skipped += 1
            reason = reason.encode('utf-8', 'backslashreplace').decode('utf-8')  # file names inside it, too
            warnings.warn(f'skipping {_show(path)}: {reason}', stacklevel=3)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        for k in range(len(self.paths)):
            path = self.paths[(i + k) % len(self.paths)]
            img, reason = _open(path, decode=True)
            if img is not None:
                return self.transform(img) if self.transform is not None else img
            self._skip(path, reason)
        raise ValueError(f'None of the files under {_show(self.root)} could be decoded. {SYNTH_HINT}')


# 2. Image tensors, affine warps and photometric ops

def to_tensor(img):
    """PIL RGB -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def normalize(x):
    """ImageNet mean/std normalization of a (3, H, W) image in [0, 1]."""
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _pixel_to_grid(w, h):
    """(3, 3) pixel coords (centres at integers) -> grid_sample coords in [-1, 1] (align_corners=False)."""
    return torch.tensor([[2.0 / w, 0, 1.0 / w - 1], [0, 2.0 / h, 1.0 / h - 1], [0, 0, 1]], dtype=torch.float64)


def warp_affine(img, A, size, padding='zeros'):
    """Output pixel p takes the source colour at A^-1 p (bilinear). img (3, H, W); A (3, 3) source->output."""
    (H, W), (h, w) = img.shape[-2:], size
    A_inv = torch.linalg.inv(torch.as_tensor(A, dtype=torch.float64))
    theta = _pixel_to_grid(W, H) @ A_inv @ torch.linalg.inv(_pixel_to_grid(w, h))
    grid = F.affine_grid(theta[None, :2].float(), [1, 3, h, w], align_corners=False)  # (1, h, w, 2)
    return F.grid_sample(img[None], grid, mode='bilinear', padding_mode=padding, align_corners=False)[0]


def similarity(center, side, angle, out_size):
    """(3, 3) map taking the square of `side` px centred at `center`, rotated by `angle` (rad), onto an
    out_size x out_size image: p_out = k R(angle) (p - center) + (out_size - 1) / 2, with k = out_size/side."""
    k, c, s = out_size / side, math.cos(angle), math.sin(angle)
    o = (out_size - 1) / 2
    return torch.tensor([[k * c, -k * s, o - k * (c * center[0] - s * center[1])],
                         [k * s, k * c, o - k * (s * center[0] + c * center[1])],
                         [0, 0, 1]], dtype=torch.float64)


def _uniform(lo, hi, g=None):
    """A float ~ U(lo, hi) from torch's RNG (or generator g): seeded per sample by the training loops."""
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _gray(x):
    """ITU-R 601 luma of a (3, H, W) image in [0, 1], as 3 channels (torchvision's grayscale)."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)


def color_jitter(x, brightness, contrast, saturation, hue, g=None):
    """Random brightness/contrast/saturation factors in [1 - a, 1 + a] and a hue rotation of U(-hue, hue)
    turns (as a rotation of the chroma plane in YIQ space: cheap and close to an HSV hue shift)."""
    x = (x * _uniform(1 - brightness, 1 + brightness, g)).clamp(0, 1)
    m = _gray(x).mean()
    x = ((x - m) * _uniform(1 - contrast, 1 + contrast, g) + m).clamp(0, 1)
    gx = _gray(x)
    x = ((x - gx) * _uniform(1 - saturation, 1 + saturation, g) + gx).clamp(0, 1)
    t = 2 * math.pi * _uniform(-hue, hue, g)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.tensor([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    M = torch.linalg.inv(yiq) @ rot @ yiq
    return torch.einsum('ij,jhw->ihw', M, x).clamp(0, 1)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur with reflect padding; radius 3 sigma."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1, 1)  # (3, 1, 2r+1), one filter per channel
    x = F.pad(x[None], (r, r, r, r), mode='reflect')
    x = F.conv2d(x, k[:, :, None, :], groups=3)
    return F.conv2d(x, k[:, :, :, None], groups=3)[0]


# 3. Pretraining views (iBOT multi-crop as similarity transforms, SPEC.md section 6)

class PretrainAugment:
    """PIL image -> dict(views=[(3,S,S), (3,S,S), (3,s,s)...], affines=[(2,3), ...]), global views first.

    View i is the square of side sqrt(area) * min(W, H) (area ~ U(scale)) around a random centre, rotated
    by U(-rotation, rotation) degrees: a similarity, so PKA targets transform exactly. `affines[i]` maps
    source pixel (x, y, 1) to view-i pixel. Photometric jitter as iBOT: colour jitter (p 0.8), grayscale
    (p 0.2), blur (p 1.0 view 1, 0.1 view 2, 0.5 local views), solarize (p 0.2, view 2 only). No flip.
    """

    def __init__(self, img_size=224, scale=(0.4, 1.0), n_local=0, local_size=96, local_scale=(0.05, 0.4),
                 rotation=30.0, photometric=True):
        self.specs = [(img_size, scale)] * 2 + [(local_size, local_scale)] * n_local
        self.rotation, self.photometric, self.img_size = math.radians(rotation), photometric, img_size

    def _photometric(self, x, i, g):
        p_blur = (1.0, 0.1)[i] if i < 2 else 0.5
        if torch.rand((), generator=g) < 0.8:
            x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, g)
        if torch.rand((), generator=g) < 0.2:
            x = _gray(x).contiguous()
        if torch.rand((), generator=g) < p_blur:
            x = gaussian_blur(x, _uniform(0.1, 2.0, g))
        if i == 1 and torch.rand((), generator=g) < 0.2:
            x = torch.where(x >= 0.5, 1 - x, x)
        return x

    def __call__(self, img, g=None):
        # Large photos are first box-reduced by an integer factor r (fast, anti-aliased); the returned
        # affines still start from the ORIGINAL pixel grid: reduced x' = (x + 0.5) / r - 0.5.
        r = max(1, min(img.size) // (2 * self.img_size))
        pre = torch.tensor([[1 / r, 0, 0.5 / r - 0.5], [0, 1 / r, 0.5 / r - 0.5], [0, 0, 1]], dtype=torch.float64)
        src = to_tensor(img.reduce(r) if r > 1 else img)
        H, W = src.shape[-2:]
        views, affines = [], []
        for i, (size, (lo, hi)) in enumerate(self.specs):
            side = math.sqrt(_uniform(lo, hi, g)) * min(W, H)
            # centre drawn in pixel-edge coordinates [0, W] so the unrotated square stays in the image;
            # minus 0.5 converts to the pixel-centre convention of the affines
            cx = _uniform(side / 2, W - side / 2, g) if W > side else W / 2
            cy = _uniform(side / 2, H - side / 2, g) if H > side else H / 2
            A = similarity((cx - 0.5, cy - 0.5), side, _uniform(-self.rotation, self.rotation, g), size)
            v = warp_affine(src, A, (size, size))
            if self.photometric:
                v = self._photometric(v, i, g)
            views.append(normalize(v))
            affines.append((A @ pre)[:2].float())
        return dict(views=views, affines=affines)


# 4. Labelled hands: crops, fine-tuning augmentation, FreiHAND and HO3Dv2

def project(points, K):
    """(..., N, 3) camera-frame points, (..., 3, 3) intrinsics -> (..., N, 2) pixels (numpy or torch)."""
    uvw = points @ K.swapaxes(-1, -2)
    return uvw[..., :2] / uvw[..., 2:]


def crop_transform(K, center, side, out_size, angle=0.0, shift=(0.0, 0.0)):
    """The crop of side `side` px around image point `center`, after a camera roll by `angle` (rad).

    Returns (A, K_crop, R): A (3, 3) image pixel -> crop pixel, K_crop = S K, and R the rotation of
    camera-frame 3D points. Rolling the camera by R moves pixel p to H p, H = K R K^-1 (affine, as K's last
    row is [0, 0, 1]); the crop S (scale and shift) only changes the intrinsics. So A = S H, and projecting
    R X with K_crop gives S K R X = A (K X): labels and pixels move together."""
    K, c, s = np.asarray(K, np.float64), math.cos(angle), math.sin(angle)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    Hr = K @ R @ np.linalg.inv(K)
    S = similarity(Hr[:2] @ [center[0], center[1], 1.0], side, 0.0, out_size).numpy()  # rolled centre
    S[:2, 2] += shift
    return S @ Hr, S @ K, R


@dataclass
class FinetuneAugment:
    """Fine-tuning augmentation (SPIN/PyMAF style, no flip): box scale, camera roll, shift, colour gains."""
    scale: float = 0.25       # crop side x U(1 - scale, 1 + scale)
    rotation: float = 30.0    # camera roll U(-rotation, rotation) degrees, about the optical axis
    translation: float = 0.1  # crop centre shift, fraction of the crop side
    color: float = 0.4        # per-channel gain U(1 - color, 1 + color) (SPIN's pixel noise)

    def draw(self, g=None):
        """(side factor, roll angle in rad, (dx, dy) shift as a fraction of the side)."""
        t = self.translation
        angle = math.radians(_uniform(-self.rotation, self.rotation, g))
        return _uniform(1 - self.scale, 1 + self.scale, g), angle, (_uniform(-t, t, g), _uniform(-t, t, g))

    def jitter(self, x, g=None):
        gains = 1 + self.color * (2 * torch.rand(3, generator=g) - 1)
        return (x * gains.view(3, 1, 1)).clamp(0, 1)


def rotate_axis_angle(R, aa):
    """Axis-angle (3,) of R @ rotation(aa). A camera turned by R sees the MANO hand with global
    rotation R R_global: the global orient is left-multiplied, the finger pose is unchanged."""
    R, aa = torch.as_tensor(np.asarray(R, np.float64)), torch.as_tensor(np.asarray(aa, np.float64))
    return matrix_to_axis_angle(R @ axis_angle_to_matrix(aa)).numpy()


def _labels(V=0, **known):
    """SAMPLE's label fields as numpy arrays (3D in the OpenCV camera frame): `known`, zeros elsewhere."""
    ann = dict(joints3d=np.zeros((21, 3)), verts=np.zeros((V, 3)), pose=np.zeros(48), betas=np.zeros(10),
               root=np.zeros(3), scale=0.0, has_3d=False, has_verts=False, has_mano=False)
    return {**ann, **known}


def make_sample(img, K, center, side, ann, index, img_size, augment=None):
    """Crop (and optionally augment) one labelled image into the SAMPLE dict; `ann` as `_labels` makes it."""
    factor, angle, shift = augment.draw() if augment is not None else (1.0, 0.0, (0.0, 0.0))
    A, K_crop, R = crop_transform(K, center, side * factor, img_size, angle,
                                  (shift[0] * img_size, shift[1] * img_size))
    x = to_tensor(img)
    if not (np.allclose(A, np.eye(3)) and x.shape[-2:] == (img_size, img_size)):
        x = warp_affine(x, A, (img_size, img_size))
    if augment is not None:
        x = augment.jitter(x)
    joints3d, verts, root = (np.asarray(ann[k], np.float64) @ R.T for k in ('joints3d', 'verts', 'root'))
    pose = np.array(ann['pose'], np.float64)
    if ann['has_mano']:
        pose[:3] = rotate_axis_angle(R, pose[:3])
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    joints2d = project(joints3d, K_crop) if ann['has_3d'] else np.zeros((21, 2))
    return dict(image=normalize(x), K=f32(K_crop), joints3d=f32(joints3d), verts=f32(verts), pose=f32(pose),
                betas=f32(ann['betas']), joints2d=f32(joints2d), root=f32(root), scale=f32(ann['scale']),
                index=index, **{k: torch.tensor(bool(ann[k])) for k in ('has_3d', 'has_verts', 'has_mano')})


def _decode(path):
    """A labelled image that does not decode is an error naming it (ImageFolder skips instead)."""
    img, reason = _open(path, decode=True)
    if img is None:
        raise ValueError(f'{_show(path)} could not be decoded ({reason}).')
    return img


def _read_json(path, shape, what):
    """Load a JSON annotation list and check its shape (-1 = any); clear errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{_show(path)} is missing: expected {what}. {SYNTH_HINT}')
    try:
        with open(path) as f:
            a = np.asarray(json.load(f), dtype=np.float64)
    except (ValueError, TypeError) as e:  # bad JSON, or ragged lists numpy cannot stack
        raise ValueError(f'{_show(path)} is malformed ({e}): expected {what}.') from None
    if a.ndim != len(shape) or any(s not in (-1, t) for s, t in zip(shape, a.shape)):
        raise ValueError(f'{_show(path)} has shape {a.shape}: expected {what}.')
    return a


def resolve_mano(mano, root):
    """A MANO layer from a layer, a dict, a path, 'synthetic', or None = the model the set was made with
    (`synth_config.json` in `root`) else the usual search ($MANO_DIR, ./mano/MANO_RIGHT.pkl)."""
    if isinstance(mano, MANO):
        return mano
    if mano is None:
        cfg = os.path.join(root, 'synth_config.json')
        if os.path.isfile(cfg):
            with open(cfg) as f:
                mano = json.load(f).get('mano')
    return MANO(mano if isinstance(mano, dict) else load_mano(find_mano(mano)))


def freihand_mano_to_mesh(mano61, K, layer):
    """FreiHAND's 61 values (B, 61) and K (B, 3, 3) -> verts (B, V, 3), joints (B, 21, 3), absolute pose
    (B, 48), camera frame. As the official toolbox (utils/model.py): pose[3:] is relative to hands_mean;
    uv_root is the pixel projection of keypoint 9 (middle MCP) and the last value s = f / z of it, so it
    back-projects to xyz_root = ((u - px) / s, (v - py) / s, f / s) with f = (fx + fy) / 2; the posed
    mesh is translated so that its keypoint 9 lands there."""
    mano61, K = torch.as_tensor(mano61, dtype=torch.float64), torch.as_tensor(K, dtype=torch.float64)
    pose = mano61[:, :48].clone()
    pose[:, 3:] += layer.hands_mean.double()
    out = layer(pose.float(), mano61[:, 48:58].float())
    s = mano61[:, 60:61]
    f = 0.5 * (K[:, 0, 0] + K[:, 1, 1])[:, None]
    xyz_root = torch.cat([(mano61[:, 58:60] - K[:, :2, 2]) / s, f / s], 1)  # (B, 3)
    t = (xyz_root - out.joints[:, 9].double())[:, None]                      # (B, 1, 3)
    return out.vertices.double() + t, out.joints.double() + t, pose


def mesh_to_freihand_mano(pose, betas, joints, K, hands_mean):
    """Inverse of `freihand_mano_to_mesh`: (48,) absolute pose, (10,) betas, camera-frame joints (21, 3)
    and K -> FreiHAND's (61,) vector. Exact when fx == fy (FreiHAND's own approximation otherwise)."""
    f = 0.5 * (K[0, 0] + K[1, 1])
    uv_root = project(joints[9:10], K)[0]
    return np.concatenate([pose[:3], pose[3:] - hands_mean, betas, uv_root, [f / joints[9, 2]]])


class FreiHAND(torch.utils.data.Dataset):
    """FreiHAND v2 (or a synthetic set in its layout). Image id i shows annotation i mod n; training has
    up to 4 versions (green screen, homogenized, sample, auto) of each sample: `versions` caps how many
    are used, and only versions whose first image exists count (synthetic sets usually have one).
    The evaluation split works with or without its ground truth files."""

    def __init__(self, root, split='training', img_size=224, augment=False, versions=4, mano=None):
        if split not in ('training', 'evaluation'):
            raise ValueError(f"split must be 'training' or 'evaluation', got {split!r}")
        self.root, self.split, self.img_size = root, split, img_size
        self.augment = FinetuneAugment() if augment is True else (augment or None)
        p = lambda name: os.path.join(root, f'{split}_{name}.json')  # noqa: E731
        self.K = _read_json(p('K'), (-1, 3, 3), 'a list of 3x3 intrinsics')
        self.n = n = len(self.K)
        self.scale = _read_json(p('scale'), (n,), f'{n} bone lengths (metres)')
        has = lambda name: split == 'training' or os.path.isfile(p(name))  # noqa: E731 (evaluation GT: optional)
        self.xyz = _read_json(p('xyz'), (n, 21, 3), f'{n} x 21 x 3 joints (metres)') if has('xyz') else None
        self.verts = (_read_json(p('verts'), (n, -1, 3), f'{n} x V x 3 vertices (metres)').astype(np.float32)
                      if has('verts') else None)  # float32: FreiHAND's 32560 meshes are 300 MB even so
        self.mano = None
        if has('mano'):
            what = f'{n} entries of [[61 values]] (48 pose, 10 betas, uv_root, scale)'
            self.mano = _read_json(p('mano'), (n, 1, 61), what)[:, 0]  # FreiHAND nests each entry: (1, 61)
            self.hands_mean = resolve_mano(mano, root).hands_mean.double().numpy()
        wanted = versions if split == 'training' else 1  # the evaluation split has one version
        self.versions = 0  # count the versions present: version v of sample j is image j + v n
        while self.versions < wanted and os.path.isfile(self._image(self.versions * n)):
            self.versions += 1
        if self.versions == 0:
            raise FileNotFoundError(f'{_show(self._image(0))} is missing: expected {n} images in {split}/rgb. '
                                    f'{SYNTH_HINT}')

    def _image(self, i):
        return os.path.join(self.root, self.split, 'rgb', '%08d.jpg' % i)

    def __len__(self):
        return self.n * self.versions

    def annotation(self, j):
        """Numpy labels of annotation j (camera frame, internal order, absolute pose)."""
        ann = _labels(self.verts.shape[1] if self.verts is not None else 0, scale=self.scale[j])
        if self.xyz is not None:
            ann.update(joints3d=self.xyz[j], root=self.xyz[j, 0], has_3d=True)
        if self.verts is not None:
            ann.update(verts=self.verts[j], has_verts=True)
        if self.mano is not None:
            ann.update(pose=np.concatenate([self.mano[j, :3], self.mano[j, 3:48] + self.hands_mean]),
                       betas=self.mano[j, 48:58], has_mano=True)
        return ann

    def __getitem__(self, i):
        img = _decode(self._image(i))
        # FreiHAND frames are already 224 x 224 hand crops: the whole frame is the box.
        c = ((img.size[0] - 1) / 2, (img.size[1] - 1) / 2)
        return make_sample(img, self.K[i % self.n], c, max(img.size), self.annotation(i % self.n), i,
                           self.img_size, self.augment)


class _MetaUnpickler(pickle.Unpickler):
    """HO3D meta files are pickles: allow numpy arrays and nothing else, so no code from a file runs."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', 'scalar'),
               ('numpy._core.multiarray', 'scalar'), ('_codecs', 'encode')}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)


def _read_meta(path, keys):
    """One HO3D meta pkl as a dict, checked for `keys` {name: shape}; clear errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{_show(path)} is missing: expected an HO3D meta pickle with {list(keys)}.')
    try:
        with open(path, 'rb') as f:
            meta = _MetaUnpickler(f, encoding='latin1').load()
        out = {k: np.asarray(meta[k], np.float64).reshape(shape) for k, shape in keys.items()}
    except Exception as e:  # unpickling errors, missing keys, wrong sizes
        raise ValueError(f'{_show(path)} is malformed ({type(e).__name__}: {e}): expected a dict with '
                         + ', '.join(f'{k} {s}' for k, s in keys.items()) + '.') from None
    return out


class HO3D(torch.utils.data.Dataset):
    """HO3Dv2: a square crop of the 640x480 frame around the hand (projected joints in training, the
    annotated handBoundingBox in evaluation), padded by pad_joints / pad_box, resized to img_size. Labels
    move from HO3D's OpenGL frame and MANO+tips order to the OpenCV frame and internal order; training
    `verts` come from the MANO layer (`resolve_mano`); evaluation knows only the wrist (`root`, V = 0)."""

    TRAIN_KEYS = dict(handPose=(48,), handBeta=(10,), handTrans=(3,), handJoints3D=(21, 3), camMat=(3, 3))
    EVAL_KEYS = dict(handJoints3D=(3,), handBoundingBox=(4,), camMat=(3, 3))

    def __init__(self, root, split='train', img_size=224, augment=False, mano=None, pad_joints=1.5, pad_box=1.3):
        if split not in ('train', 'evaluation'):
            raise ValueError(f"split must be 'train' or 'evaluation', got {split!r}")
        self.root, self.split, self.img_size = root, split, img_size
        self.pad_joints, self.pad_box = pad_joints, pad_box
        self.augment = FinetuneAugment() if augment is True else (augment or None)
        listing = os.path.join(root, f'{split}.txt')
        if not os.path.isfile(listing):
            raise FileNotFoundError(f'{_show(listing)} is missing: expected one "<seq>/<id>" per line.')
        with open(listing) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        if not self.ids or any(len(i.split('/')) != 2 for i in self.ids):
            raise ValueError(f'{_show(listing)} is malformed: expected one "<seq>/<id>" per line.')
        self.layer = resolve_mano(mano, root) if split == 'train' else None

    def __len__(self):
        return len(self.ids)

    def annotation(self, meta):
        """OpenGL/MANO-order meta -> numpy labels in the OpenCV frame and internal order."""
        C = OPENGL_TO_OPENCV
        if self.split == 'evaluation':  # only the wrist is known
            return _labels(root=C @ meta['handJoints3D'])
        joints = (meta['handJoints3D'] @ C)[MANO_TO_FREIHAND]  # C is symmetric: rows @ C = (C @ x) per row
        # MANO(pose, beta) + trans lives in the OpenGL frame; C is a proper rotation, so the OpenCV-frame
        # hand is the same MANO hand with global rotation C R_global (and a different translation).
        pose = np.concatenate([rotate_axis_angle(C, meta['handPose'][:3]), meta['handPose'][3:]])
        with torch.no_grad():
            out = self.layer(*(torch.as_tensor(meta[k][None], dtype=torch.float32)
                               for k in ('handPose', 'handBeta', 'handTrans')))
        return _labels(joints3d=joints, verts=out.vertices[0].double().numpy() @ C, pose=pose,
                       betas=meta['handBeta'], root=joints[0], scale=np.linalg.norm(joints[9] - joints[10]),
                       has_3d=True, has_verts=True, has_mano=True)

    def __getitem__(self, i):
        seq, fid = self.ids[i].split('/')
        folder = os.path.join(self.root, self.split, seq)
        meta = _read_meta(os.path.join(folder, 'meta', fid + '.pkl'),
                          self.TRAIN_KEYS if self.split == 'train' else self.EVAL_KEYS)
        png = os.path.join(folder, 'rgb', fid + '.png')
        jpg = png[:-4] + '.jpg'  # HO3Dv2 frames are png, v3 ones jpg
        img = _decode(jpg if os.path.isfile(jpg) and not os.path.isfile(png) else png)
        ann = self.annotation(meta)
        K = meta['camMat']
        if self.split == 'train':  # box around the projected joints (inside the skin: padded a bit more)
            uv = project(ann['joints3d'], K)
            lo, hi, pad = uv.min(0), uv.max(0), self.pad_joints
        else:  # evaluation: only the annotated hand box [x1, y1, x2, y2] may be used, never GT joints
            lo, hi, pad = meta['handBoundingBox'][:2], meta['handBoundingBox'][2:], self.pad_box
        return make_sample(img, K, (lo + hi) / 2, pad * max(hi - lo), ann, i, self.img_size, self.augment)


# 5. A z-buffer rasterizer with Lambert shading (numpy, vectorized over (triangle, pixel) pairs)

def _reduce3(op, x):
    """op (np.minimum, np.maximum, np.add) over the 3 columns of x (N, 3): 7x faster than x.min(1) and co."""
    return op(op(x[:, 0], x[:, 1]), x[:, 2])


def _unit(x):
    """Vectors along the last axis of x scaled to unit length."""
    return x / np.maximum(np.sqrt(np.einsum('...i,...i->...', x, x)), 1e-12)[..., None]


def rasterize(verts, faces, K, size):
    """The triangle visible at each pixel centre of a pinhole image, and where on it: verts (V, 3) camera
    frame, faces (F, 3), K (3, 3), size (H, W) -> face (H, W) int64 (-1 = background), bary (H, W, 3)
    perspective-correct barycentric weights. Vectorized scanline: each (triangle, row) pair gets the x-span
    of pixel centres inside the triangle, spans expand into P (triangle, pixel) fragments, and the nearest
    fragment of each pixel wins (the z-buffer as one sort). Triangles behind the camera are dropped."""
    H, W = size
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    z = v[:, 2]
    keep = np.nonzero((z[f] > 1e-6).all(1))[0]
    t = project(v, np.asarray(K, np.float64))[f[keep]]  # (F, 3, 2) pixel corners
    # Edge functions: the weight of corner i at pixel (x, y) is the signed area of (p, i+1, i+2) over
    # that of the triangle: an affine function a x + b y + c, zero on the edge opposite corner i.
    p1, p2 = t[:, [1, 2, 0]], t[:, [2, 0, 1]]  # (F, 3, 2) the two other corners of each corner
    abc = np.stack([p1[..., 1] - p2[..., 1], p2[..., 0] - p1[..., 0],
                    p1[..., 0] * p2[..., 1] - p2[..., 0] * p1[..., 1]], -1)  # (F, 3, 3)
    area = abc[:, 0, 0] * t[:, 0, 0] + abc[:, 0, 1] * t[:, 0, 1] + abc[:, 0, 2]  # (F,) twice signed area
    ok = np.abs(area) > 1e-9  # degenerate (edge-on) triangles cover nothing
    keep, t, coef = keep[ok], t[ok], abc[ok] / area[ok, None, None]
    # Rows: every pixel-centre row y crossing each triangle.
    ty = t[..., 1]
    y0 = np.ceil(_reduce3(np.minimum, ty)).clip(0, H).astype(np.int64)
    ny = np.maximum(np.floor(_reduce3(np.maximum, ty)).clip(-1, H - 1).astype(np.int64) - y0 + 1, 0)
    row_tri = np.repeat(np.arange(len(keep)), ny)                                      # (R,)
    row_y = np.repeat(y0, ny) + np.arange(len(row_tri)) - np.repeat(np.cumsum(ny) - ny, ny)
    a, s = coef[row_tri, :, 0], coef[row_tri, :, 1] * row_y[:, None] + coef[row_tri, :, 2]  # (R, 3)
    # Along a row w_i = a_i x + s_i >= 0: a lower bound on x where a_i > 0, an upper one where a_i < 0.
    with np.errstate(divide='ignore', invalid='ignore'):
        bound = -s / a
    lo = _reduce3(np.maximum, np.where(a > 0, bound, -np.inf))
    hi = _reduce3(np.minimum, np.where(a < 0, bound, np.inf))
    x0 = np.ceil(lo - 1e-7).clip(0, W).astype(np.int64)
    nx = np.maximum(np.floor(hi + 1e-7).clip(-1, W - 1).astype(np.int64) - x0 + 1, 0)
    nx[_reduce3(np.logical_or, (a == 0) & (s < 0))] = 0  # any horizontal edge (a_i = 0) that the row lies outside of
    # Fragments: every pixel of every span.
    frag_row = np.repeat(np.arange(len(row_tri)), nx)                                  # (P,)
    px = np.repeat(x0, nx) + np.arange(len(frag_row)) - np.repeat(np.cumsum(nx) - nx, nx)
    tri, py = row_tri[frag_row], row_y[frag_row]
    w = coef[tri, :, 0] * px[:, None] + coef[tri, :, 1] * py[:, None] + coef[tri, :, 2]  # (P, 3)
    inv_z = 1 / z[f[keep[tri]]]                                                         # (P, 3)
    depth = _reduce3(np.add, w * inv_z)  # 1/z, not z, is affine in screen space
    pix = py * W + px
    face, bary = np.full(H * W, -1, np.int64), np.zeros((H * W, 3))
    if len(pix):
        # Nearest first within each pixel, one sort: pixel id + a fraction that grows with depth.
        order = np.argsort(pix + 0.5 * (1 - depth / depth.max()))
        first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]]
        face[pix[first]] = keep[tri[first]]
        b = w[first] * inv_z[first]  # perspective correction: weights w_i / z_i, renormalized
        bary[pix[first]] = b / _reduce3(np.add, b)[:, None]
    return face.reshape(H, W), bary.reshape(H, W, 3)


def vertex_normals(verts, faces):
    """(V, 3) unit normals: the area-weighted sum of the adjacent face normals."""
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # (F, 3), length = 2 x area
    vn = np.zeros_like(v)
    np.add.at(vn, f, fn[:, None].repeat(3, 1))  # each face adds its normal to its 3 corners
    return _unit(vn)


def _interp(attr, corners, b):
    """(V, C) per-vertex attribute -> (M, C) at pixels with corner ids (M, 3) and weights b (M, 3)."""
    return attr[corners[:, 0]] * b[:, :1] + attr[corners[:, 1]] * b[:, 1:2] + attr[corners[:, 2]] * b[:, 2:]


def _smooth(x):
    """[1, 2, 1] / 4 filter along both image axes (edge pixels replicated)."""
    x = np.concatenate([x[:1], x, x[-1:]], 0)
    x = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
    x = np.concatenate([x[:, :1], x, x[:, -1:]], 1)
    return (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4


def render_mesh(verts, faces, K, image=None, size=None, color=(0.85, 0.66, 0.56), light=(0.4, -0.5, -1.0),
                ambient=0.35, specular=0.1, antialias=True, return_mask=False):
    """Shade a mesh over `image` ((H, W, 3) uint8; black of `size` (H, W) when None) -> (H, W, 3) uint8
    (and the (H, W) bool coverage with return_mask). Lambert: albedo (ambient + (1 - ambient) max(0, n.l))
    plus a small Blinn-Phong highlight, n the interpolated vertex normal turned towards the camera (the face
    winding does not matter), `light` from surface to light, `color` (3,) or (V, 3) per vertex."""
    H, W = image.shape[:2] if image is not None else size
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    face, bary = rasterize(v, f, K, (H, W))
    m = face >= 0
    corners, b = f[face[m]], bary[m]                      # (M, 3) corner ids and weights
    n = _unit(_interp(vertex_normals(v, f), corners, b))  # (M, 3)
    ray = _unit(_interp(v, corners, b))                   # (M, 3) surface point = camera ray
    n[np.einsum('ij,ij->i', n, ray) > 0] *= -1
    l = np.asarray(light, np.float64) / np.linalg.norm(light)
    half = _unit(l - ray)                                 # Blinn-Phong half vector
    color = np.asarray(color, np.float64)
    albedo = _interp(color, corners, b) if color.ndim == 2 else color
    shade = ambient + (1 - ambient) * np.clip(n @ l, 0, None)
    rgb = albedo * shade[:, None] + specular * np.clip(np.einsum('ij,ij->i', n, half), 0, None)[:, None] ** 32
    layer, alpha = np.zeros((H, W, 3)), m.astype(np.float64)
    layer[m] = np.clip(rgb, 0, 1)
    if antialias:  # premultiplied colour and coverage, filtered together: no dark halo
        layer, alpha = _smooth(layer), _smooth(alpha)
    bg = np.zeros((H, W, 3)) if image is None else np.asarray(image, np.float64) / 255
    out = np.rint(255 * (layer + (1 - alpha)[..., None] * bg)).clip(0, 255).astype(np.uint8)
    return (out, m) if return_mask else out


# 6. Synthetic hands in the FreiHAND v2 (or HO3Dv2) layout

SKIN_TONES = np.array([[255, 224, 196], [241, 194, 161], [224, 172, 135], [198, 140, 102],
                       [161, 110, 76], [120, 80, 55], [92, 62, 45]]) / 255
FOCAL_RANGE = (400.0, 650.0)  # px for a 224 crop: our estimate of FreiHAND's range (hand ~0.4-0.8 m away)


def _random_color(rng):
    """RGB in [0, 1] from muted to saturated, dark to light: value U(0.15, 1), saturation U(0, 0.8)."""
    s = rng.uniform(0, 0.8)
    return rng.uniform(0.15, 1) * (1 - s + s * rng.random(3))


def procedural_background(rng, h, w):
    """(h, w, 3) uint8: a gradient, smooth noise, stripes or blobs in random colours, plus fine grain."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(a) + yy * np.sin(a)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        t = (along - along.min()) / max(np.ptp(along), 1e-6)
    elif kind == 1:  # value noise: random grids of a few cells, upsampled bicubically, two octaves
        t = sum(np.asarray(Image.fromarray((rng.random((c, c)) * 255).astype(np.uint8)).resize(
            (w, h), Image.BICUBIC), np.float64) / 255 * wgt for c, wgt in ((3, 0.6), (9, 0.4)))
    elif kind == 2:  # stripes, soft or hard, of lower contrast too
        t = np.clip(0.5 + rng.uniform(0.5, 4) * np.sin(2 * np.pi * rng.uniform(2, 12) * along), 0, 1)
        t = t * rng.uniform(0.3, 1)
    else:  # blobs: overlapping ellipses, blurred
        t = np.zeros((h, w))
        for _ in range(rng.integers(4, 12)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * max(h, w)
            t = np.where((xx * max(h, w) - cx) ** 2 + (yy * max(h, w) - cy) ** 2 < r * r, rng.random(), t)
    c1, c2 = _random_color(rng), _random_color(rng)
    bg = c1 + t[..., None] * (c2 - c1) + rng.normal(0, rng.uniform(0.005, 0.04), (h, w, 1))
    img = Image.fromarray((255 * bg.clip(0, 1)).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(2)) if kind == 3 else img)


def add_occluders(img, rng, box, count):
    """Paint `count` opaque shaded objects (ball, box, cylinder) over the hand box [x0, y0, x1, y1].
    Shapes are analytic in a rotated frame (u along, v across), edges anti-aliased by their distance."""
    h, w = img.shape[:2]
    out = img.astype(np.float64) / 255
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    side = max(box[2] - box[0], box[3] - box[1])
    for _ in range(count):
        cx, cy = rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])
        ang, r = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3) * side
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        kind = rng.integers(3)
        if kind == 0:  # ball: radial shading
            a, b = r, r * rng.uniform(0.6, 1)
            d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            alpha, shade = np.clip((1 - d) * b + 0.5, 0, 1), 1 - 0.5 * np.clip(d, 0, 1) ** 2
        else:  # box (flat) or cylinder (cos shading across its axis)
            a, b = r * rng.uniform(1, 3 if kind == 2 else 1.5), r * rng.uniform(0.3, 0.8)
            alpha = np.clip(np.minimum(a - np.abs(u), b - np.abs(v)) + 0.5, 0, 1)
            shade = 0.45 + 0.55 * np.cos(np.clip(v / b, -1, 1) * 1.3) if kind == 2 else 0.8 + 0.2 * u / a
        rgb = _random_color(rng)[None, None] * shade[..., None]
        out = out * (1 - alpha[..., None]) + rgb * alpha[..., None]
    return np.rint(255 * out.clip(0, 1)).astype(np.uint8)


def pose_prior(model):
    """A MANO dict's PCA pose prior: mean (45,), components (45, 45) as rows, per-component std (from the
    official file's hands_coeffs; unit variance without them)."""
    coeffs = model.get('hands_coeffs')
    std = np.asarray(coeffs, np.float64).std(0) if coeffs is not None and len(coeffs) > 1 else np.ones(45)
    return dict(mean=np.asarray(model['hands_mean'], np.float64),
                components=np.asarray(model['hands_components'], np.float64), std=std)


def rest_frame(joints):
    """(3, 3) rotation whose columns are the rest hand's finger direction (wrist -> middle MCP), its
    across-palm direction (pinky MCP -> index MCP, made orthogonal) and palm normal, from (21, 3) joints."""
    axis = _unit(joints[9] - joints[0])
    side = joints[5] - joints[17]
    side = _unit(side - (side @ axis) * axis)
    return np.stack([axis, side, np.cross(axis, side)], 1)


def _rotation(axis, angle):
    """Rotation matrix (3, 3) by `angle` rad about the unit `axis` (Rodrigues)."""
    return axis_angle_to_matrix(torch.as_tensor(np.asarray(axis, np.float64) * angle)).numpy()


def sample_view(rng, frame, roll=math.radians(60), tilt=0.45, max_tilt=1.1):
    """A FreiHAND-like camera-frame global rotation (3, 3) of a hand whose rest pose has `rest_frame` `frame`.

    FreiHAND's hands mostly show the palm or the back to the camera, fingers roughly up, with a moderate
    tilt: the hand is turned so its fingers point up the image (-y) and its palm normal along -z or +z
    (even odds), then tilted about the image x and y axes by N(0, tilt) rad (clipped to max_tilt) and rolled
    in the image plane by U(-roll, roll) (training adds +-30 degrees of roll by augmentation). Rotations
    drawn over the whole sphere are unlike real hand data sets and show many hands edge-on, where the
    finger pose is hard to see."""
    facing = 1.0 if rng.random() < 0.5 else -1.0
    up, normal = np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, facing])
    target = np.stack([up, np.cross(normal, up), normal], 1)  # same handedness as `frame`'s columns
    tx, ty = np.clip(rng.normal(0, tilt, 2), -max_tilt, max_tilt)
    R = _rotation([1, 0, 0], tx) @ _rotation([0, 1, 0], ty) @ target @ frame.T
    return _rotation([0, 0, 1], rng.uniform(-roll, roll)) @ R


@dataclass
class HandSampler:
    """How synthetic hands are drawn (each field is a `data.py synth` flag).

    Fingers: the first `pose_components` axes of the model's PCA pose prior with their own spread (natural
    hand poses are strongly synergistic: 6 axes hold 95% of the synthetic prior's variance), then independent
    N(0, pose_noise) rad on each of the 45 values, then each joint's angle limited to `max_angle` rad. View:
    `sample_view` with `roll` degrees and `tilt` rad. `occlusion`: chance of occluding objects on an image.
    Reference PA-MPVPE of these defaults (README, Results): mean hand 11.5 mm, the first component right
    6.6 mm, the true fingers with zero betas 1.9 mm; 45 components with 0.08 rad noise: 12.8, 8.5, 1.9 mm."""
    pose_components: int = 6
    pose_noise: float = 0.02
    max_angle: float = 1.6
    roll: float = 60.0
    tilt: float = 0.45
    occlusion: float = 0.3


def sample_hand(rng, prior, frame, sampler=HandSampler()):
    """Random right hand: (48,) absolute pose and (10,) betas ~ N(0, 1) clipped to [-2, 2], drawn as
    `sampler` says (PCA synergies plus small noise; palm or back towards the camera, moderate tilt and
    roll) for a hand whose rest pose has `rest_frame` `frame`."""
    k = sampler.pose_components
    coeffs = rng.normal(size=45) * prior['std']
    fingers = prior['mean'] + coeffs[:k] @ prior['components'][:k]
    fingers = (fingers + rng.normal(0, sampler.pose_noise, 45)).reshape(15, 3)
    angle = np.linalg.norm(fingers, axis=1, keepdims=True)
    fingers = fingers * np.minimum(1, sampler.max_angle / np.maximum(angle, 1e-9))  # (15, 3) angle-limited
    R = sample_view(rng, frame, roll=math.radians(sampler.roll), tilt=sampler.tilt)
    glob = matrix_to_axis_angle(torch.as_tensor(R)).numpy()
    return np.concatenate([glob, fingers.reshape(45)]), np.clip(rng.normal(size=10), -2, 2)


def render_hand(rng, verts, faces, K, size, occlude_p=0.3):
    """One photo-like image of a posed hand: procedural background, skin-toned Lambert shading with a
    random light, occluders on some images, then blur and noise. Returns (H, W, 3) uint8 and the
    (H, W) bool hand silhouette (amodal: occluders do not cut it)."""
    H, W = size
    tone = np.clip(SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.08, 3), 0, 1)
    light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), -rng.uniform(0.3, 1.5)])
    img, mask = render_mesh(verts, faces, K, image=procedural_background(rng, H, W), color=tone, light=light,
                            ambient=rng.uniform(0.25, 0.5), specular=rng.uniform(0, 0.15), return_mask=True)
    if rng.random() < occlude_p and mask.any():
        ys, xs = np.nonzero(mask)
        img = add_occluders(img, rng, (xs.min(), ys.min(), xs.max(), ys.max()), rng.integers(1, 3))
    pil = Image.fromarray(img)
    if rng.random() < 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    img = np.asarray(pil, np.float64)
    if rng.random() < 0.5:
        img = img + rng.uniform(1, 6) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.rint(img).clip(0, 255).astype(np.uint8), mask


class _JsonList:
    """A JSON list written one entry at a time (memory stays flat for any n) to a temp file that is
    renamed into place by close(): an interrupted run never leaves a truncated annotation file."""

    def __init__(self, path):
        self.path, self.f, self.sep = path, open(path + '.tmp', 'w'), '['

    def append(self, obj):
        self.f.write(self.sep + json.dumps(obj, separators=(',', ':')))  # dumps: C encoder, dump: Python
        self.sep = ','

    def close(self):
        self.f.write('[]' if self.sep == '[' else ']')
        self.f.close()
        os.replace(self.path + '.tmp', self.path)


def _r(a, d=7):
    """Nested lists for JSON, rounded to 7 decimals (0.1 micrometre): smaller files, far below label noise."""
    return np.round(np.asarray(a, np.float64), d).tolist()


def _scenes(layer, prior, count, seed, code, size, focal, hand_px, spread=0.0, batch=64,
            sampler=HandSampler()):
    """`count` random hands, each seen by its own random camera with image size (H, W): yields (i, rng, pose
    (48,), betas (10,), J0 (3,), verts (V, 3), joints (21, 3), K (3, 3)), camera frame. Sample i draws only
    from the generator seeded [seed, code, i], so batching and order do not change the set. The hand spans
    ~hand_px px, up to `spread` x the image size off-centre; J0 is its wrist before the translation."""
    H, W = size
    frame = rest_frame(layer(torch.zeros(1, 48)).joints[0].double().numpy())
    for start in range(0, count, batch):
        ids = range(start, min(count, start + batch))
        rngs = [np.random.default_rng([seed, code, i]) for i in ids]
        poses, betas = (np.stack(x) for x in zip(*[sample_hand(rng, prior, frame, sampler) for rng in rngs]))
        out = layer(torch.as_tensor(poses, dtype=torch.float32), torch.as_tensor(betas, dtype=torch.float32))
        verts, joints = out.vertices.double().numpy(), out.joints.double().numpy()  # (B, V, 3), (B, 21, 3)
        for b, (i, rng) in enumerate(zip(ids, rngs)):
            f = rng.uniform(*focal)
            c = (np.array([W, H]) - 1) / 2 + rng.uniform(-8, 8, 2)  # principal point near the centre
            K = np.array([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1]])
            # the hand's box centre on the optical axis, at the depth where it spans 55-85% of hand_px
            lo, hi = verts[b].min(0), verts[b].max(0)
            extent = max(hi[:2] - lo[:2])
            z = max(f * extent / (rng.uniform(0.55, 0.85) * hand_px), (hi[2] - lo[2]) / 2 + 0.1)  # z > 0
            t = -(lo + hi) / 2 + np.array([*rng.normal(0, 0.04 * extent, 2), z])
            t[:2] += rng.uniform(-spread, spread, 2) * np.array([W, H]) * z / f  # pixels -> metres at depth z
            yield i, rng, poses[b], betas[b], joints[b, 0], verts[b] + t, joints[b] + t, K


def _synth_freihand(out, layer, prior, n, n_eval, seed, versions, size, sampler):
    """FreiHAND v2 layout: rgb (+ mask) jpgs and the training_* / evaluation_* JSON files."""
    faces, hands_mean = layer.faces.numpy(), layer.hands_mean.double().numpy()
    for code, (split, count, n_versions) in enumerate((('training', n, versions), ('evaluation', n_eval, 1))):
        for sub in ('rgb', 'mask'):
            os.makedirs(os.path.join(out, split, sub), exist_ok=True)
        labels = {k: _JsonList(os.path.join(out, f'{split}_{k}.json')) for k in ('K', 'mano', 'xyz', 'verts', 'scale')}
        scenes = _scenes(layer, prior, count, seed, code, (size, size), FOCAL_RANGE, size, sampler=sampler)
        for i, rng, pose, betas, _, v, j, K in tqdm(scenes, total=count, desc=f'synth {split}', unit='hand'):
            for version in range(n_versions):
                look = np.random.default_rng([seed, code, i, version])  # appearance of this version
                img, mask = render_hand(look, v, faces, K, (size, size), sampler.occlusion)
                Image.fromarray(img).save(os.path.join(out, split, 'rgb', '%08d.jpg' % (i + version * count)),
                                          quality=int(look.integers(60, 96)))
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out, split, 'mask', '%08d.jpg' % i),
                                                              quality=95)
            labels['K'].append(_r(K))
            labels['mano'].append([_r(mesh_to_freihand_mano(pose, betas, j, K, hands_mean))])
            labels['xyz'].append(_r(j))
            labels['verts'].append(_r(v))
            labels['scale'].append(float(np.linalg.norm(j[9] - j[10])))
        for writer in labels.values():
            writer.close()


def _synth_ho3d(out, layer, prior, n, n_eval, seed, sampler, size=(480, 640), per_seq=20):
    """HO3Dv2 layout: {train,evaluation}/<seq>/{rgb/<id>.png, meta/<id>.pkl}, train.txt, evaluation.txt.
    Annotations in the OpenGL frame and MANO+tips order, as HO3D stores them; the evaluation meta has
    only the wrist and the hand box. evaluation_{xyz,verts}.json (same frame and order) are our own GT."""
    C = OPENGL_TO_OPENCV
    gt = {k: _JsonList(os.path.join(out, f'evaluation_{k}.json')) for k in ('xyz', 'verts')}
    for code, (split, count) in enumerate((('train', n), ('evaluation', n_eval)), start=2):
        names = []
        scenes = _scenes(layer, prior, count, seed, code, size, (580, 640), 180, spread=0.25,  # hand ~180 px
                         sampler=sampler)
        for i, rng, pose, betas, J0, v, j, K in tqdm(scenes, total=count, desc=f'synth ho3d {split}', unit='img'):
            seq, fid = 'SYN%02d' % (i // per_seq), '%04d' % (i % per_seq)
            img, _ = render_hand(rng, v, layer.faces.numpy(), K, size, occlude_p=0.6)  # hands holding objects
            for sub in ('rgb', 'meta'):
                os.makedirs(os.path.join(out, split, seq, sub), exist_ok=True)
            Image.fromarray(img).save(os.path.join(out, split, seq, 'rgb', fid + '.png'), compress_level=1)
            # The same hand in the OpenGL frame: C is a rotation, so MANO(pose_gl, betas) + trans_gl = C x
            # with R_gl = C R and trans_gl = C (J0 + t) - J0 = C j[0] - J0 (the rotation pivots about J0).
            pose_gl = np.concatenate([rotate_axis_angle(C, pose[:3]), pose[3:]])
            joints_gl = (j @ C)[FREIHAND_TO_MANO]
            if split == 'train':
                meta = dict(handPose=pose_gl, handBeta=betas, handTrans=C @ j[0] - J0, handJoints3D=joints_gl,
                            camMat=K)
            else:
                uv = project(v, K)
                meta = dict(handJoints3D=joints_gl[0], camMat=K,
                            handBoundingBox=np.concatenate([uv.min(0), uv.max(0)]).round())
                gt['xyz'].append(_r(joints_gl))
                gt['verts'].append(_r(v @ C))
            with open(os.path.join(out, split, seq, 'meta', fid + '.pkl'), 'wb') as fh:
                pickle.dump(meta, fh, protocol=2)
            names.append(f'{seq}/{fid}')
        with open(os.path.join(out, f'{split}.txt'), 'w') as fh:
            fh.write('\n'.join(names) + '\n')
    for writer in gt.values():
        writer.close()


@dataclass
class SynthConfig:
    out: str = field(default='./hands', metadata={'help': 'output folder'})
    n: int = field(default=2000, metadata={'help': 'training samples'})
    n_eval: int = field(default=-1, metadata={'help': 'held-out evaluation samples (-1: n // 10, at least 1)'})
    layout: str = field(default='freihand', metadata={'help': "'freihand' (v2 layout) or 'ho3d' (HO3Dv2 layout)"})
    mano: str = field(default='synthetic', metadata={'help': "MANO model: 'synthetic' or a MANO_RIGHT.pkl path"})
    seed: int = field(default=0, metadata={'help': 'random seed (sample i draws from the seeds [seed, split, i])'})
    versions: int = field(default=1, metadata={'help': 'FreiHAND training versions: re-renderings with new looks'})
    img_size: int = field(default=224, metadata={'help': 'FreiHAND image side (FreiHAND: 224)'})
    pose_components: int = field(default=HandSampler.pose_components, metadata={
        'help': 'PCA pose components sampled (45 = all); the others stay at the mean'})
    pose_noise: float = field(default=HandSampler.pose_noise, metadata={
        'help': 'independent N(0, this) rad added to each of the 45 finger values'})
    max_angle: float = field(default=HandSampler.max_angle, metadata={'help': "each finger joint's angle limit, rad"})
    roll: float = field(default=HandSampler.roll, metadata={'help': 'in-plane roll U(-roll, roll), degrees'})
    tilt: float = field(default=HandSampler.tilt, metadata={'help': 'out-of-plane tilt N(0, tilt) rad about x and y'})
    occlusion: float = field(default=HandSampler.occlusion, metadata={
        'help': 'chance of occluding objects over a FreiHAND-layout image (HO3D layout: 0.6)'})


def synth(out, n, mano='synthetic', layout='freihand', seed=0, n_eval=-1, versions=1, img_size=224, **sampler):
    """Render a synthetic labelled hand set; `sampler`: `HandSampler` fields. Returns the output folder."""
    if layout not in ('freihand', 'ho3d'):
        raise ValueError(f"layout must be 'freihand' or 'ho3d', got {layout!r}")
    if n < 1 or versions < 1:
        raise ValueError(f'--n and --versions must be at least 1 (got {n}, {versions})')
    n_eval = max(1, n // 10) if n_eval < 0 else n_eval
    model = load_mano(find_mano(mano))
    layer, prior = MANO(model), pose_prior(model)
    os.makedirs(out, exist_ok=True)
    sampler = HandSampler(**sampler)
    cfg = SynthConfig(os.fspath(out), n, n_eval, layout, mano, seed, versions, img_size, **dataclasses.asdict(sampler))
    with open(os.path.join(out, 'synth_config.json'), 'w') as f:  # resolve_mano reads `mano` back
        json.dump(cfg.__dict__, f)
    with torch.no_grad():
        if layout == 'freihand':
            _synth_freihand(out, layer, prior, n, n_eval, seed, versions, img_size, sampler)
        else:
            _synth_ho3d(out, layer, prior, n, n_eval, seed, sampler)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description='HandMIM data tools. `synth OUT --n N`: render synthetic hands '
                                     'in the FreiHAND v2 (or --layout ho3d: HO3Dv2) layout.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('synth', help='render a labelled synthetic hand set')
    for name, fld in SynthConfig.__dataclass_fields__.items():  # flags generated from the dataclass
        if name == 'out':
            p.add_argument('out', help=fld.metadata['help'])
        else:
            flags = dict.fromkeys(['--' + name, '--' + name.replace('_', '-')])  # --img_size or --img-size
            p.add_argument(*flags, dest=name, type=type(fld.default), default=fld.default,
                           help=fld.metadata['help'] + f' (default: {fld.default})')
    args = vars(parser.parse_args(argv))
    cfg = SynthConfig(**{k: v for k, v in args.items() if k != 'command'})
    print(json.dumps(cfg.__dict__))
    try:
        synth(**cfg.__dict__)
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
