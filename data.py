"""Data for HandMIM: the unlabeled image folder, the FreiHAND and HO3Dv2 loaders, and the augmentations.

In reading order:
  1. Robust decoding (`load_rgb`) and the unlabeled `ImageFolder` used for pretraining.
  2. Image tensors and warps: every image operation is ONE affine map A (source pixel -> output pixel)
     applied by `warp_affine`; labels follow the same map (a crop: K' = A K), so they cannot drift apart.
  3. `PretrainAugment`: iBOT's multi-crop as similarities, each view with its 2x3 source->view affine
     (PKA maps pseudo keypoints between views with A_i A_j^-1).
  4. `FinetuneAugment`, `FreiHAND`, `HO3D`: labelled samples in the SAMPLE format below.
Synthetic sets in both layouts come from synthetic.py (`python synthetic.py ./hands --n 2000`).

SAMPLE (what FreiHAND/HO3D return; unknown fields are zeros and their flag is False):
  image (3, S, S) float, ImageNet-normalized | K (3, 3) crop intrinsics | joints3d (21, 3) metres, OpenCV
  camera frame, internal (FreiHAND) order | verts (V, 3) (V = 0 for HO3D evaluation) | pose (48,) absolute
  axis-angle, camera frame | betas (10,) | joints2d (21, 2) crop pixels | root (3,) camera-frame wrist |
  scale () FreiHAND's bone length |joints3d[9] - joints3d[10]| | has_3d, has_verts, has_mano (bool) | index.
  MANO(pose, betas) reproduces joints3d and verts up to a translation: add root - joints[:, 0].

Conventions: pixel centres at integer coordinates (OpenCV); metres; right hands only, so never a horizontal
flip. Shapes (README legend): S crop side, V vertices, J = 21 joints.
"""
import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from engine import read_json
from mano import MANO, MANO_TO_FREIHAND, OPENGL_TO_OPENCV, load_mano, load_pickle, rotate_axis_angle
from synthetic import mano_model, project

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
SYNTH_HINT = 'To try everything without data, make a synthetic set: python synthetic.py ./hands --n 2000'


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


# 3. Pretraining views (iBOT multi-crop as similarity transforms)

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
        a = np.asarray(read_json(path), dtype=np.float64)
    except (ValueError, TypeError) as e:  # bad JSON, or ragged lists numpy cannot stack
        raise ValueError(f'{_show(path)} is malformed ({e}): expected {what}.') from None
    if a.ndim != len(shape) or any(s not in (-1, t) for s, t in zip(shape, a.shape)):
        raise ValueError(f'{_show(path)} has shape {a.shape}: expected {what}.')
    return a


def resolve_mano(mano, root=None):
    """A MANO layer from a layer, a dict, a path, 'synthetic', or None = the model the set in `root` was made
    with (its `synth_config.json`), else the usual search ($MANO_DIR, ./mano/MANO_RIGHT.pkl)."""
    if isinstance(mano, MANO):
        return mano
    if mano is None and root is not None and os.path.isfile(os.path.join(root, 'synth_config.json')):
        mano = read_json(os.path.join(root, 'synth_config.json')).get('mano')
    return MANO(load_mano(mano) if isinstance(mano, dict) else mano_model(mano))


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


def _read_meta(path, keys):
    """One HO3D meta pkl as a dict, checked for `keys` {name: shape}; clear errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{_show(path)} is missing: expected an HO3D meta pickle with {list(keys)}.')
    try:
        meta = load_pickle(path)   # mano.py's restricted unpickler: arrays only, no code from the file runs
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

    def wrist(self, i):
        """The camera-frame wrist of sample i from its meta file alone (evaluation: what submissions are put at)."""
        seq, fid = self.ids[i].split('/')
        keys = self.TRAIN_KEYS if self.split == 'train' else self.EVAL_KEYS
        return self.annotation(_read_meta(os.path.join(self.root, self.split, seq, 'meta', fid + '.pkl'), keys))['root']

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


