"""Data for HandMIM: image folders, FreiHAND and HO3Dv2 loaders, augmentations, a synthetic hand renderer.

What is here (SPEC.md section 4), in reading order:
  1. Robust image decoding (`load_rgb`) and the unlabeled `ImageFolder` used for pretraining.
  2. Geometry of crops: every image operation is ONE affine map A (source pixel -> output pixel) applied
     with `warp_affine`; labels follow the same map (a crop: K' = A K), so they cannot drift apart.
  3. `PretrainAugment`: two global views by random similarity transforms + photometric jitter (iBOT's
     recipe without the horizontal flip, which would turn a right hand into a left one), optional local
     views, each returned with its 2x3 source->view affine (PKA maps pseudo keypoints with A_i A_j^-1).
  4. `FinetuneAugment`, `FreiHAND`, `HO3D`: labelled samples in one format (see SAMPLE below). A camera
     roll about the optical axis by R_z moves pixels by the homography K R_z K^-1 (affine here), rotates
     camera-frame 3D points by R_z and left-multiplies the MANO global rotation by R_z.
  5. `rasterize` / `render_mesh`: a vectorized numpy z-buffer rasterizer with Lambert shading (also
     used by evaluate.py's demo overlays).
  6. `synth`: renders right hands with a MANO model into the exact FreiHAND v2 layout (or HO3Dv2's).

SAMPLE (what FreiHAND/HO3D return; unknown fields are zeros and their flag is False):
  image (3, S, S) float, ImageNet-normalized | K (3, 3) crop intrinsics | joints3d (21, 3) metres, OpenCV
  camera frame, internal (FreiHAND) order | verts (V, 3) (V = 0 for HO3D evaluation) | pose (48,) absolute
  axis-angle, camera frame | betas (10,) | joints2d (21, 2) crop pixels | root (3,) camera-frame wrist |
  scale () FreiHAND's bone length |joints3d[9] - joints3d[10]| | has_3d, has_verts, has_mano (bool) | index.
  MANO(pose, betas) reproduces joints3d and verts up to a translation: add root - joints[:, 0].

FreiHAND stores MANO as 61 values (see `freihand_mano_to_mesh`): 48 pose with the finger part relative to
hands_mean, 10 betas, uv_root = pixel projection of keypoint 9 (middle MCP), and f / z of that keypoint.

Conventions: pixel centres sit at integer coordinates (OpenCV); metres; right hands only.
Shapes: S crop side, V vertices, F faces, J = 21 joints, R (triangle, row) spans, P (triangle, pixel)
fragments, M covered pixels.

Run:  python data.py synth ./hands --n 2000                 # FreiHAND layout, synthetic MANO
      python data.py synth ./ho3d_synth --n 60 --layout ho3d
      python data.py synth ./hands --n 2000 --mano mano/MANO_RIGHT.pkl
"""
import argparse
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


# ----------------------------------------------------------------------------------------------------
# 1. Robust image decoding and the unlabeled image folder
# ----------------------------------------------------------------------------------------------------

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
    paths, seen, stack = [], set(), [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            entries = list(os.scandir(folder))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlinked folder we already walked (or a loop back to it)
            continue
        seen.add((st.st_dev, st.st_ino))
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:  # a link loop: let it fall through as a file, reported when it fails to open
                is_dir = False
            if is_dir:
                stack.append(e.path)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(e.path)
    if not paths:
        raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) found under {_show(root)}. '
                                f'{SYNTH_HINT}')
    return sorted(paths)


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursively), unlabeled; `__getitem__` returns `transform(rgb_pil)`.

    Files whose header does not open are dropped at construction; files that fail to decode later
    (e.g. truncated) are replaced by the next file. Each is reported with one warning and counted in
    `n_skipped` (per process: DataLoader workers count their own).
    """

    def __init__(self, root, transform=None, check=True):
        self.root, self.transform, self.n_skipped, self._warned = root, transform, 0, set()
        paths = find_images(root)
        if check:  # header only (~50 us per file): catches empty, non-image, bomb, unreadable, link loops
            ok = []
            for p in tqdm(paths, desc='checking images', disable=len(paths) < 5000, leave=False):
                size, reason = _open(p, decode=False)
                if size is None:
                    self._skip(p, reason)
                else:
                    ok.append(p)
            if self.n_skipped:
                print(f'ImageFolder: {len(ok)} images, {self.n_skipped} undecodable files skipped',
                      file=sys.stderr)
            paths = ok
        if not paths:
            raise ValueError(f'None of the files under {_show(root)} could be decoded. {SYNTH_HINT}')
        self.paths = paths

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


# ----------------------------------------------------------------------------------------------------
# 2. Image tensors and affine warps
# ----------------------------------------------------------------------------------------------------

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
    A = torch.as_tensor(A, dtype=torch.float64)
    theta = _pixel_to_grid(W, H) @ torch.linalg.inv(A) @ torch.linalg.inv(_pixel_to_grid(w, h))
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
    return lo + (hi - lo) * torch.rand((), generator=g).item()


# Photometric ops on (3, H, W) tensors in [0, 1]. Colour ops are the torchvision definitions.
def _gray(x):
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


# ----------------------------------------------------------------------------------------------------
# 3. Pretraining views (iBOT multi-crop as similarity transforms, SPEC.md section 6)
# ----------------------------------------------------------------------------------------------------

class PretrainAugment:
    """PIL image -> dict(views=[(3,S,S), (3,S,S), (3,s,s)...], affines=[(2,3), ...]).

    Each view is the square of side sqrt(area) * min(W, H) (area ~ U(scale)) around a random centre,
    rotated by U(-rotation, rotation) degrees: a similarity, so the PKA targets transform exactly.
    `affines[i]` maps source pixel (x, y, 1) to view-i pixel. Photometric jitter follows iBOT: colour
    jitter (p 0.8), grayscale (p 0.2), blur (p 1.0 on view 1, 0.1 on view 2, 0.5 on local views),
    solarize (p 0.2, view 2 only). No horizontal flip: it would turn right hands into left hands.
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


# ----------------------------------------------------------------------------------------------------
# 4. Labelled hands: crops, fine-tuning augmentation, FreiHAND and HO3Dv2
# ----------------------------------------------------------------------------------------------------

def project(points, K):
    """(..., N, 3) camera-frame points, (..., 3, 3) intrinsics -> (..., N, 2) pixels (numpy or torch)."""
    uvw = points @ K.swapaxes(-1, -2)
    return uvw[..., :2] / uvw[..., 2:]


def rot_z(angle):
    """(3, 3) rotation about the optical axis (camera roll)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def crop_transform(K, center, side, out_size, angle=0.0, shift=(0.0, 0.0)):
    """The crop of side `side` px around image point `center`, after a camera roll by `angle`.

    Returns (A, K_crop, R): A (3, 3) image pixel -> crop pixel, K_crop = S K the crop's intrinsics, and R
    the rotation to apply to camera-frame 3D points. Rolling the camera by R moves pixel p to
    H p with H = K R K^-1 (affine: last row of K is [0, 0, 1]); the crop then scales and shifts,
    S = [[k, 0, tx], [0, k, ty], [0, 0, 1]], which is just a change of intrinsics. So A = S H and
    projecting R X with K_crop gives S K R X = A (K X): labels and pixels move together.
    """
    K = np.asarray(K, np.float64)
    R = rot_z(angle)
    Hr = K @ R @ np.linalg.inv(K)
    c = Hr @ np.array([center[0], center[1], 1.0])  # the hand centre after the roll
    k, o = out_size / side, (out_size - 1) / 2
    S = np.array([[k, 0, o - k * c[0] + shift[0]], [0, k, o - k * c[1] + shift[1]], [0, 0, 1]])
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


def make_sample(img, K, center, side, ann, index, img_size, augment=None):
    """Crop (and optionally augment) one labelled image into the SAMPLE dict (module docstring).

    `ann` holds numpy arrays: joints3d (21, 3), verts (V, 3), pose (48,), betas (10,), root (3,), scale,
    and the flags has_3d, has_verts, has_mano. 3D quantities are in the OpenCV camera frame.
    """
    factor, angle, shift = augment.draw() if augment is not None else (1.0, 0.0, (0.0, 0.0))
    A, K_crop, R = crop_transform(K, center, side * factor, img_size, angle,
                                  (shift[0] * img_size, shift[1] * img_size))
    x = to_tensor(img)
    if not (np.allclose(A, np.eye(3)) and x.shape[-1] == img_size and x.shape[-2] == img_size):
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
                has_3d=torch.tensor(bool(ann['has_3d'])),
                has_verts=torch.tensor(bool(ann['has_verts'])), has_mano=torch.tensor(bool(ann['has_mano'])),
                index=index)


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
    """FreiHAND's 61 values -> (verts (B,V,3), joints (B,21,3), absolute pose (B,48)), camera frame.

    As the official toolbox (utils/model.py): pose[3:] is relative to hands_mean; uv_root is the pixel
    projection of keypoint 9 (middle MCP) and the last value is f / z of that keypoint, so the keypoint
    back-projects to xyz_root = ((u - px) / s, (v - py) / s, f / s) with f = (fx + fy) / 2; the posed mesh
    is translated so that its keypoint 9 lands there. mano61 (B, 61), K (B, 3, 3).
    """
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
    """FreiHAND v2 (or a synthetic set in its layout). Image id i shows annotation i mod N; training has
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
        n = len(self.K)
        self.scale = _read_json(p('scale'), (n,), f'{n} bone lengths (metres)')
        has = lambda name: split == 'training' or os.path.isfile(p(name))  # noqa: E731 (training: all)
        self.xyz = _read_json(p('xyz'), (n, 21, 3), f'{n} x 21 x 3 joints (metres)') if has('xyz') else None
        self.verts = (_read_json(p('verts'), (n, -1, 3), f'{n} x V x 3 vertices (metres)').astype(np.float32)
                      if has('verts') else None)  # float32: FreiHAND's 32560 meshes are 300 MB even so
        self.mano = None
        if has('mano'):
            what = f'{n} entries of [[61 values]] (48 pose, 10 betas, uv_root, scale)'
            self.mano = _read_json(p('mano'), (n, 1, 61), what)[:, 0]  # FreiHAND nests each entry: (1, 61)
            self.hands_mean = resolve_mano(mano, root).hands_mean.double().numpy()
        self.n = n
        image = lambda i: os.path.join(root, split, 'rgb', '%08d.jpg' % i)  # noqa: E731
        self.versions = 0  # count the versions present: version v of sample j is image j + v N
        wanted = versions if split == 'training' else 1  # the evaluation split has one version
        while self.versions < wanted and os.path.isfile(image(self.versions * n)):
            self.versions += 1
        if self.versions == 0:
            raise FileNotFoundError(f'{_show(image(0))} is missing: expected {n} images in {split}/rgb. '
                                    f'{SYNTH_HINT}')
        self._image = image

    def __len__(self):
        return self.n * self.versions

    def annotation(self, j):
        """Numpy labels of annotation j (camera frame, internal order, absolute pose)."""
        V = self.verts.shape[1] if self.verts is not None else 0
        ann = dict(joints3d=np.zeros((21, 3)), verts=np.zeros((V, 3)), pose=np.zeros(48), betas=np.zeros(10),
                   root=np.zeros(3), scale=self.scale[j], has_3d=self.xyz is not None,
                   has_verts=self.verts is not None, has_mano=self.mano is not None)
        if self.xyz is not None:
            ann['joints3d'], ann['root'] = self.xyz[j], self.xyz[j, 0]
        if self.verts is not None:
            ann['verts'] = self.verts[j]
        if self.mano is not None:
            ann['pose'] = np.concatenate([self.mano[j, :3], self.mano[j, 3:48] + self.hands_mean])
            ann['betas'] = self.mano[j, 48:58]
        return ann

    def __getitem__(self, i):
        img, reason = _open(self._image(i), decode=True)
        if img is None:
            raise ValueError(f'{_show(self._image(i))} could not be decoded ({reason}).')
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
    """HO3Dv2: 640x480 frames; a square crop around the hand (projected joints when training, the
    annotated handBoundingBox for evaluation), padded (pad_joints, pad_box), resized to img_size, with the crop's
    intrinsics. Annotations are converted at load time from HO3D's OpenGL frame and MANO+tips order to
    the OpenCV frame and internal order. Training `verts` come from the MANO layer (`mano`, see
    `resolve_mano`); evaluation samples know only the wrist (`root`) and have no vertices (V = 0)."""

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
            return dict(joints3d=np.zeros((21, 3)), verts=np.zeros((self.V, 3)), pose=np.zeros(48),
                        betas=np.zeros(10), root=C @ meta['handJoints3D'], scale=0.0, has_3d=False,
                        has_verts=False, has_mano=False)
        joints = (meta['handJoints3D'] @ C)[MANO_TO_FREIHAND]  # C is symmetric: rows @ C = (C @ x) per row
        pose = meta['handPose'].copy()
        # MANO(pose, beta) + trans lives in the OpenGL frame; C is a proper rotation, so the OpenCV-frame
        # hand is the same MANO hand with global rotation C R_global (and a different translation).
        pose[:3] = rotate_axis_angle(C, pose[:3])
        with torch.no_grad():
            out = self.layer(torch.as_tensor(meta['handPose'][None], dtype=torch.float32),
                             torch.as_tensor(meta['handBeta'][None], dtype=torch.float32),
                             torch.as_tensor(meta['handTrans'][None], dtype=torch.float32))
        verts = out.vertices[0].double().numpy() @ C
        return dict(joints3d=joints, verts=verts, pose=pose, betas=meta['handBeta'], root=joints[0],
                    scale=np.linalg.norm(joints[9] - joints[10]), has_3d=True, has_verts=True, has_mano=True)

    @property
    def V(self):
        return self.layer.num_verts if self.layer is not None else 0

    def __getitem__(self, i):
        seq, fid = self.ids[i].split('/')
        folder = os.path.join(self.root, self.split, seq)
        meta = _read_meta(os.path.join(folder, 'meta', fid + '.pkl'),
                          self.TRAIN_KEYS if self.split == 'train' else self.EVAL_KEYS)
        path = os.path.join(folder, 'rgb', fid + '.png')  # HO3Dv2: png (v3: jpg)
        if not os.path.isfile(path) and os.path.isfile(path[:-4] + '.jpg'):
            path = path[:-4] + '.jpg'
        img, reason = _open(path, decode=True)
        if img is None:
            raise ValueError(f'{_show(path)} could not be decoded ({reason}).')
        ann = self.annotation(meta)
        K = meta['camMat']
        if self.split == 'train':  # box around the projected joints (inside the skin: padded a bit more)
            uv = project(ann['joints3d'], K)
            lo, hi, pad = uv.min(0), uv.max(0), self.pad_joints
        else:  # evaluation: only the annotated hand box [x1, y1, x2, y2] may be used, never GT joints
            lo, hi, pad = meta['handBoundingBox'][:2], meta['handBoundingBox'][2:], self.pad_box
        return make_sample(img, K, (lo + hi) / 2, pad * max(hi - lo), ann, i, self.img_size, self.augment)


# ----------------------------------------------------------------------------------------------------
# 5. A z-buffer rasterizer with Lambert shading (numpy, vectorized over (triangle, pixel) pairs)
# ----------------------------------------------------------------------------------------------------

# Reductions over a last axis of 3, written out: numpy's axis reductions are slow for such short rows.
def _min3(x):
    return np.minimum(np.minimum(x[:, 0], x[:, 1]), x[:, 2])


def _max3(x):
    return np.maximum(np.maximum(x[:, 0], x[:, 1]), x[:, 2])


def _sum3(x):
    return x[:, 0] + x[:, 1] + x[:, 2]


def rasterize(verts, faces, K, size):
    """Which triangle is visible at each pixel centre of a pinhole camera image, and where on it.

    verts (V, 3) camera frame (z forward), faces (F, 3), K (3, 3), size (H, W). Returns face (H, W) int64
    (-1 = background) and bary (H, W, 3): perspective-correct barycentric weights of its corners.
    Vectorized scanline: every (triangle, row) pair computes the x-span of pixel centres inside the
    triangle, the spans expand into P (triangle, pixel) fragments, and the nearest fragment of each
    pixel wins (the z-buffer as one sort). Triangles behind the camera are dropped (no clipping).
    """
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
    y0 = np.ceil(_min3(ty)).clip(0, H).astype(np.int64)
    ny = np.maximum(np.floor(_max3(ty)).clip(-1, H - 1).astype(np.int64) - y0 + 1, 0)
    row_tri = np.repeat(np.arange(len(keep)), ny)                                      # (R,)
    row_y = np.repeat(y0, ny) + np.arange(len(row_tri)) - np.repeat(np.cumsum(ny) - ny, ny)
    a, s = coef[row_tri, :, 0], coef[row_tri, :, 1] * row_y[:, None] + coef[row_tri, :, 2]  # (R, 3)
    # Along a row w_i = a_i x + s_i >= 0: a lower bound on x where a_i > 0, an upper one where a_i < 0.
    with np.errstate(divide='ignore', invalid='ignore'):
        bound = -s / a
    lo = _max3(np.where(a > 0, bound, -np.inf))
    hi = _min3(np.where(a < 0, bound, np.inf))
    x0 = np.ceil(lo - 1e-7).clip(0, W).astype(np.int64)
    nx = np.maximum(np.floor(hi + 1e-7).clip(-1, W - 1).astype(np.int64) - x0 + 1, 0)
    nx[_max3((a == 0) & (s < 0))] = 0  # any horizontal edge (a_i = 0) that the row lies outside of
    # Fragments: every pixel of every span.
    frag_row = np.repeat(np.arange(len(row_tri)), nx)                                  # (P,)
    px = np.repeat(x0, nx) + np.arange(len(frag_row)) - np.repeat(np.cumsum(nx) - nx, nx)
    tri, py = row_tri[frag_row], row_y[frag_row]
    w = coef[tri, :, 0] * px[:, None] + coef[tri, :, 1] * py[:, None] + coef[tri, :, 2]  # (P, 3)
    inv_z = 1 / z[f[keep[tri]]]                                                         # (P, 3)
    depth = _sum3(w * inv_z)  # 1/z, not z, is affine in screen space
    pix = py * W + px
    face, bary = np.full(H * W, -1, np.int64), np.zeros((H * W, 3))
    if len(pix):
        # Nearest first within each pixel, one sort: pixel id + a fraction that grows with depth.
        order = np.argsort(pix + 0.5 * (1 - depth / depth.max()))
        first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]]
        face[pix[first]] = keep[tri[first]]
        b = w[first] * inv_z[first]  # perspective correction: weights w_i / z_i, renormalized
        bary[pix[first]] = b / _sum3(b)[:, None]
    return face.reshape(H, W), bary.reshape(H, W, 3)


def vertex_normals(verts, faces):
    """(V, 3) unit normals: the area-weighted sum of the adjacent face normals."""
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # (F, 3), length = 2 x area
    vn = np.zeros_like(v)
    for i in range(3):
        np.add.at(vn, f[:, i], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _interp(attr, corners, b):
    """(V, C) per-vertex attribute -> (M, C) at pixels with corner ids (M, 3) and weights b (M, 3)."""
    return attr[corners[:, 0]] * b[:, :1] + attr[corners[:, 1]] * b[:, 1:2] + attr[corners[:, 2]] * b[:, 2:]


def _unit_rows(x):
    return x / np.maximum(np.sqrt(np.einsum('ij,ij->i', x, x)), 1e-12)[:, None]


def _smooth(x):
    """[1, 2, 1] / 4 filter along both image axes (edge pixels replicated)."""
    x = np.concatenate([x[:1], x, x[-1:]], 0)
    x = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
    x = np.concatenate([x[:, :1], x, x[:, -1:]], 1)
    return (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4


def render_mesh(verts, faces, K, image=None, size=None, color=(0.85, 0.66, 0.56), light=(0.4, -0.5, -1.0),
                ambient=0.35, specular=0.1, antialias=True, return_mask=False):
    """Shade a mesh and composite it over `image` ((H, W, 3) uint8; black when None, then `size` = (H, W)).

    Lambert + ambient: albedo (ambient + (1 - ambient) max(0, n.l)), plus a small Blinn-Phong highlight;
    n is the interpolated vertex normal turned towards the camera (two-sided: the face winding does not
    matter); `light` points from the surface towards the light, camera frame. `color` (3,) or (V, 3).
    antialias softens the silhouette with a premultiplied 3x3 filter. Returns (H, W, 3) uint8 (and the
    (H, W) bool coverage with return_mask).
    """
    H, W = image.shape[:2] if image is not None else size
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    face, bary = rasterize(v, f, K, (H, W))
    m = face >= 0
    corners, b = f[face[m]], bary[m]                             # (M, 3) corner ids and weights
    n = _unit_rows(_interp(vertex_normals(v, f), corners, b))    # (M, 3)
    ray = _unit_rows(_interp(v, corners, b))                     # (M, 3) surface point = camera ray
    n[np.einsum('ij,ij->i', n, ray) > 0] *= -1
    l = np.asarray(light, np.float64) / np.linalg.norm(light)
    half = _unit_rows(l - ray)                                   # Blinn-Phong half vector
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


# ----------------------------------------------------------------------------------------------------
# 6. Synthetic hands in the FreiHAND v2 (or HO3Dv2) layout
# ----------------------------------------------------------------------------------------------------

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
    elif kind == 2:  # stripes, soft or hard
        t = np.clip(0.5 + rng.uniform(0.5, 4) * np.sin(2 * np.pi * rng.uniform(2, 12) * along), 0, 1)
    else:  # blobs: overlapping ellipses, blurred
        t = np.zeros((h, w))
        for _ in range(rng.integers(4, 12)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * max(h, w)
            t = np.where((xx * max(h, w) - cx) ** 2 + (yy * max(h, w) - cy) ** 2 < r * r, rng.random(), t)
    if kind == 2:
        t = t * rng.uniform(0.3, 1)  # stripes of lower contrast too
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


def _random_rotation(rng):
    """Uniform random rotation matrix (normalized Gaussian quaternion)."""
    w, x, y, z = _unit(rng.normal(size=4))
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _unit(x):
    return x / np.linalg.norm(x)


def pose_prior(model):
    """The PCA pose prior of a MANO dict: mean (45,), components (45, 45) as rows, per-component std.
    The official file's hands_coeffs give the std; without them unit variance is assumed."""
    coeffs = model.get('hands_coeffs')
    std = np.asarray(coeffs, np.float64).std(0) if coeffs is not None and len(coeffs) > 1 else np.ones(45)
    return dict(mean=np.asarray(model['hands_mean'], np.float64),
                components=np.asarray(model['hands_components'], np.float64), std=std)


def sample_hand(rng, prior, axis, max_angle=1.6, max_axis_z=0.7):
    """Random right hand: (48,) absolute pose and (10,) betas.

    Fingers: a PCA prior sample (grasp-like synergies) plus independent noise, each joint's rotation
    angle limited to `max_angle` rad. Global rotation: uniform over SO(3), redrawn (up to 20 times)
    while the wrist -> middle-finger axis `axis` (rest pose) points more than `max_axis_z` along the
    optical axis, so that the hand is not seen end-on. Betas ~ N(0, 1) clipped to [-2, 2].
    """
    fingers = prior['mean'] + (rng.normal(size=45) * prior['std']) @ prior['components']
    fingers = (fingers + rng.normal(0, 0.08, 45)).reshape(15, 3)
    angle = np.linalg.norm(fingers, axis=1, keepdims=True)
    fingers = fingers * np.minimum(1, max_angle / np.maximum(angle, 1e-9))  # (15, 3) angle-limited
    for _ in range(20):
        R = _random_rotation(rng)
        if abs(R[2] @ axis) < max_axis_z:
            break
    glob = matrix_to_axis_angle(torch.as_tensor(R)).numpy()
    return np.concatenate([glob, fingers.reshape(45)]), np.clip(rng.normal(size=10), -2, 2)


def place_hand(rng, verts, f, size, fill=(0.55, 0.85)):
    """Translation (3,) putting the hand's 3D box centre on the optical axis, at the depth where its
    larger image side spans `fill` of `size` pixels (focal length f), with a small lateral jitter."""
    lo, hi = verts.min(0), verts.max(0)
    extent = max(hi[0] - lo[0], hi[1] - lo[1])
    z = f * extent / (rng.uniform(*fill) * size)
    z = max(z, (hi[2] - lo[2]) / 2 + 0.1)  # keep every vertex well in front of the camera
    return -(lo + hi) / 2 + np.array([*(rng.normal(0, 0.04 * extent, 2)), z])


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


def _write_json(path, obj):
    """JSON written atomically (temp file + rename): an interrupted run never leaves half a file."""
    with open(path + '.tmp', 'w') as f:
        f.write(json.dumps(obj, separators=(',', ':')))  # dumps uses the C encoder, dump does not
    os.replace(path + '.tmp', path)


class _JsonList:
    """A JSON list written one entry at a time (memory stays flat for any n) to a temp file that is
    renamed into place by close(): an interrupted run never leaves a truncated annotation file."""

    def __init__(self, path):
        self.path, self.f, self.sep = path, open(path + '.tmp', 'w'), '['

    def append(self, obj):
        self.f.write(self.sep + json.dumps(obj, separators=(',', ':')))
        self.sep = ','

    def close(self):
        self.f.write('[]' if self.sep == '[' else ']')
        self.f.close()
        os.replace(self.path + '.tmp', self.path)


def _r(a, d=7):
    return np.round(np.asarray(a, np.float64), d).tolist()


def _hands(layer, prior, rngs, axis):
    """Sample and pose a batch of hands (no translation): poses (B, 48), betas (B, 10), verts, joints."""
    params = [sample_hand(r, prior, axis) for r in rngs]
    pose = torch.as_tensor(np.stack([p for p, _ in params]), dtype=torch.float32)
    betas = torch.as_tensor(np.stack([b for _, b in params]), dtype=torch.float32)
    with torch.no_grad():
        out = layer(pose, betas)
    return tuple(x.double().numpy() for x in (pose, betas, out.vertices, out.joints))


def _synth_freihand(out, layer, prior, n, n_eval, seed, versions, size, batch=64):
    """FreiHAND v2 layout: rgb (+ mask) jpgs and the training_* / evaluation_* JSON files."""
    rest = layer(torch.zeros(1, 48)).joints[0].double().numpy()
    axis, faces = _unit(rest[9] - rest[0]), layer.faces.numpy()  # wrist -> middle finger base, rest pose
    hands_mean = layer.hands_mean.double().numpy()
    for code, (split, count) in enumerate((('training', n), ('evaluation', n_eval))):
        for sub in ('rgb', 'mask'):
            os.makedirs(os.path.join(out, split, sub), exist_ok=True)
        labels = {k: _JsonList(os.path.join(out, f'{split}_{k}.json'))
                  for k in ('K', 'mano', 'xyz', 'verts', 'scale')}
        bar = tqdm(total=count * (versions if split == 'training' else 1), desc=f'synth {split}', unit='img')
        for start in range(0, count, batch):
            ids = range(start, min(count, start + batch))
            rngs = [np.random.default_rng([seed, code, i]) for i in ids]  # per sample: any order, any worker
            poses, betas, verts, joints = _hands(layer, prior, rngs, axis)
            for b, (i, rng) in enumerate(zip(ids, rngs)):
                f = rng.uniform(*FOCAL_RANGE)
                c = (size - 1) / 2 + rng.uniform(-8, 8, 2)  # principal point near the centre
                K = np.array([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1]])
                t = place_hand(rng, verts[b], f, size)
                v, j = verts[b] + t, joints[b] + t
                for version in range(versions if split == 'training' else 1):
                    look = np.random.default_rng([seed, code, i, version])  # appearance of this version
                    img, mask = render_hand(look, v, faces, K, (size, size))
                    Image.fromarray(img).save(os.path.join(out, split, 'rgb', '%08d.jpg' % (i + version * count)),
                                              quality=int(look.integers(60, 96)))
                    bar.update()
                Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out, split, 'mask', '%08d.jpg' % i),
                                                                  quality=95)
                labels['K'].append(_r(K))
                labels['mano'].append([_r(mesh_to_freihand_mano(poses[b], betas[b], j, K, hands_mean))])
                labels['xyz'].append(_r(j))
                labels['verts'].append(_r(v))
                labels['scale'].append(float(np.linalg.norm(j[9] - j[10])))
        bar.close()
        for writer in labels.values():
            writer.close()


def _synth_ho3d(out, layer, prior, n, n_eval, seed, size=(480, 640), per_seq=20):
    """HO3Dv2 layout: {train,evaluation}/<seq>/{rgb/<id>.png, meta/<id>.pkl}, train.txt, evaluation.txt.
    Annotations in the OpenGL frame and MANO+tips order, as HO3D stores them; the evaluation meta has
    only the wrist and the hand box. evaluation_{xyz,verts}.json (same frame and order) are our own GT."""
    H, W = size
    C = OPENGL_TO_OPENCV
    rest = layer(torch.zeros(1, 48)).joints[0].double().numpy()
    axis, faces = _unit(rest[9] - rest[0]), layer.faces.numpy()
    for code, (split, count) in enumerate((('train', n), ('evaluation', n_eval)), start=2):
        names, gt_xyz, gt_verts = [], [], []
        rngs = [np.random.default_rng([seed, code, i]) for i in range(count)]
        poses, betas, verts, joints = _hands(layer, prior, rngs, axis)
        with torch.no_grad():  # rest root joint J0 of each shaped hand: where the global rotation pivots
            J0 = layer(torch.zeros(count, 48), torch.as_tensor(betas).float()).joints[:, 0].double().numpy()
        for i in tqdm(range(count), desc=f'synth ho3d {split}', unit='img'):
            rng, seq, fid = rngs[i], 'SYN%02d' % (i // per_seq), '%04d' % (i % per_seq)
            f = rng.uniform(580, 640)
            K = np.array([[f, 0, (W - 1) / 2 + rng.uniform(-10, 10)], [0, f, (H - 1) / 2 + rng.uniform(-10, 10)],
                          [0, 0, 1]])
            t = place_hand(rng, verts[i], f, 180)  # the hand spans ~180 px of the 640 x 480 frame
            t[:2] += rng.uniform(-0.25, 0.25, 2) * np.array([W, H]) * t[2] / f  # anywhere, fully in view
            v, j = verts[i] + t, joints[i] + t
            img, _ = render_hand(rng, v, faces, K, size, occlude_p=0.6)  # HO3D: a hand holding objects
            for sub in ('rgb', 'meta'):
                os.makedirs(os.path.join(out, split, seq, sub), exist_ok=True)
            Image.fromarray(img).save(os.path.join(out, split, seq, 'rgb', fid + '.png'), compress_level=1)
            # The same hand in the OpenGL frame: C is a rotation, so MANO(pose_gl, betas) + trans_gl = C x
            # with R_gl = C R and trans_gl = C (J0 + t) - J0 (the global rotation pivots about J0).
            pose_gl = poses[i].copy()
            pose_gl[:3] = rotate_axis_angle(C, poses[i, :3])
            joints_gl = (j @ C)[FREIHAND_TO_MANO]
            uv = project(v, K)
            if split == 'train':
                meta = dict(handPose=pose_gl, handBeta=betas[i], handTrans=C @ (J0[i] + t) - J0[i],
                            handJoints3D=joints_gl, camMat=K)
            else:
                meta = dict(handJoints3D=joints_gl[0], camMat=K,
                            handBoundingBox=np.concatenate([uv.min(0), uv.max(0)]).round())
            with open(os.path.join(out, split, seq, 'meta', fid + '.pkl'), 'wb') as fh:
                pickle.dump(meta, fh, protocol=2)
            names.append(f'{seq}/{fid}')
            gt_xyz.append(_r(joints_gl))
            gt_verts.append(_r(v @ C))
        with open(os.path.join(out, f'{split}.txt'), 'w') as fh:
            fh.write('\n'.join(names) + '\n')
        if split == 'evaluation':
            _write_json(os.path.join(out, 'evaluation_xyz.json'), gt_xyz)
            _write_json(os.path.join(out, 'evaluation_verts.json'), gt_verts)


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


def synth(out, n, mano='synthetic', layout='freihand', seed=0, n_eval=-1, versions=1, img_size=224):
    """Render a synthetic labelled hand set (SPEC.md section 4); returns the output folder."""
    if layout not in ('freihand', 'ho3d'):
        raise ValueError(f"layout must be 'freihand' or 'ho3d', got {layout!r}")
    if n < 1 or versions < 1:
        raise ValueError(f'--n and --versions must be at least 1 (got {n}, {versions})')
    n_eval = max(1, n // 10) if n_eval < 0 else n_eval
    model = load_mano(find_mano(mano))
    layer, prior = MANO(model), pose_prior(model)
    os.makedirs(out, exist_ok=True)
    cfg = dict(out=os.fspath(out), n=n, n_eval=n_eval, layout=layout, mano=mano, seed=seed, versions=versions,
               img_size=img_size)
    _write_json(os.path.join(out, 'synth_config.json'), cfg)
    with torch.no_grad():
        if layout == 'freihand':
            _synth_freihand(out, layer, prior, n, n_eval, seed, versions, img_size)
        else:
            _synth_ho3d(out, layer, prior, n, n_eval, seed)
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
