"""HandMIM networks: a plain ViT, the self-supervised heads, and the PyMAF mesh regressor.

HandMIM (Liu et al., arXiv 2307.16061) pretrains a vanilla ViT with an iBOT-style teacher-student
scheme and fine-tunes it with a PyMAF head (Zhang et al., ICCV 2021) that regresses MANO. This file
holds every network of both stages and imports nothing from the project:

- `ViT`: parameter names of the official MAE / DINO / iBOT / timm ViTs (`cls_token`,
  `pos_embed`, `patch_embed.proj`, `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}`, `norm`), so their checkpoints load key for key (`ViT.load_pretrained`) and give the
  same features. Adds iBOT's learned mask token (iBOT: `masked_embed` (1, D); ours: `mask_token`
  (1, 1, D)).
- `ProjectionHead` (iBOT/DINO), `PixelHead` (masked pixel regression), `PKAHead` (pseudo keypoints).
- `MeshRegressor`: PyMAF on a plain ViT; the MANO layer is passed in (`build_regressor` from a config).

Run: `python model.py` prints the parameter count and FLOPs of each ViT preset;
tests in tests/test_model.py, attention speed in scripts/bench_model.py.

Shape legend (README): B batch, S image side, N = h * w patches on an h x w grid, T = 1 + N tokens, D width,
H heads (= PKA's pseudo keypoints), d = D / H head width, C feature channels, V mesh vertices, J = 21 joints;
this file's own: P sampled points, G grid points.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.flop_counter import FlopCounterMode

NUM_BETAS = 10
NUM_JOINTS = 16  # MANO's kinematic joints: global orientation + 15 finger joints


# ----------------------------------------------------------------------------------------------
# Vision Transformer (Dosovitskiy et al. 2021), pre-norm, as in MAE / DINO / iBOT / timm.

def drop_path(x, p, training):
    """Stochastic depth (Huang et al. 2016): drop a residual branch for whole samples."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def interpolate_pos_embed(pos_embed, new_grid):
    """Resample a (1, 1+N, D) position embedding to an h x w patch grid, bicubic like MAE.

    The [CLS] slot is kept as is; the N patch slots must form a square grid (true for every
    official checkpoint). Returns the input unchanged when the grid already matches.
    """
    h, w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f'pos_embed has {n} patch slots, not a square grid; cannot interpolate')
    if (h, w) == (side, side):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, side, side)
    grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)  # (1, N, D)
    return torch.cat([pos_embed[:, :1], patch_pos], dim=1)  # (1, 1+N, D)


def sincos_pos_embed(dim, grid):
    """(1, 1 + h*w, dim) 2D sine-cosine position embedding (MAE, models_mae.py; Vaswani et al. 2017 per
    axis): the first dim/2 channels encode the column, the last dim/2 the row, each as sin and cos of
    the position at dim/4 frequencies 1/10000^(k/(dim/4)). The [CLS] slot is zero."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if dim % 4:
        raise ValueError(f'sin-cos position embedding needs a width divisible by 4, got {dim}')
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing='ij')
    angles = [a.reshape(-1, 1) * omega for a in (cols, rows)]  # 2 x (h*w, dim/4)
    emb = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (h*w, dim)
    return torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])[None].float()  # (1, 1+h*w, dim)


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and embed each linearly (a conv with stride = kernel)."""

    def __init__(self, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)  # (B, D, h, w)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (fused on CPU and GPU)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # with bias, as all four official code bases
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attn=False):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
        out = self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        if not return_attn:
            return out
        # The fused kernel never forms the attention matrix; the [CLS] query row alone costs O(T d).
        # As in DINO/iBOT, the softmax runs over all T keys and the [CLS] column is then dropped
        # WITHOUT renormalizing, so each row sums to 1 - attn(cls -> cls). Float32 even under AMP.
        logits = q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, 1, T)
        return out, logits.float().softmax(dim=-1)[:, :, 0, 1:]  # (B, H, N)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, like the official models
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, return_attn=False):
        y = self.attn(self.norm1(x), return_attn)
        y, attn = y if return_attn else (y, None)
        x = x + drop_path(y, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return (x, attn) if return_attn else x


class ViT(nn.Module):
    """Plain ViT returning all tokens after the final norm, [CLS] first: (B, 1+N, D).

    `forward(x, mask=None, return_attn=False)`: `mask` is bool (B, N) or (B, h, w), True = masked;
    masked patch embeddings are replaced by `mask_token` BEFORE the position embedding is added
    (iBOT), so the model still knows where each masked patch sits. With `return_attn` it also
    returns the last block's [CLS]->patch attention (B, H, N) (see `Attention`).
    Inputs of another size than `img_size` get a bicubically interpolated position embedding.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        if img_size % patch_size or embed_dim % num_heads:
            raise ValueError(f'img_size {img_size} must be a multiple of patch_size {patch_size} '
                             f'and embed_dim {embed_dim} a multiple of num_heads {num_heads}')
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.num_heads, self.num_layers = embed_dim, num_heads, depth
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # zero init, like iBOT
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # deeper: dropped more
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self):
        # Position embedding: MAE's fixed 2D sin-cos values as the START of a learned embedding (iBOT and
        # timm start from trunc_normal(0.02) instead). Patch embeddings have unit scale, so a 0.02-scale
        # random start leaves the tokens nearly position-blind for the first hundreds of steps: a ViT-Ti
        # asked where a bright square sits in a 64 px image stays at chance for 250 AdamW steps from
        # trunc_normal and gets below half of chance's error from sin-cos (tests/test_model.py, slow).
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.embed_dim, self.grid))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        proj = self.patch_embed.proj.weight.data  # like a Linear on flattened patches (MAE)
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, mask=None, return_attn=False):
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f'image size {tuple(x.shape[-2:])} is not a multiple of the patch '
                             f'size {self.patch_size}')
        x = self.patch_embed(x)  # (B, D, h, w)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            if mask.shape[0] != B or mask[0].numel() != h * w:
                raise ValueError(f'mask of shape {tuple(mask.shape)} does not fit {B} images '
                                 f'of {h} x {w} patches')
            x = torch.where(mask.reshape(B, h * w, 1).bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        x = x + interpolate_pos_embed(self.pos_embed, (h, w))
        for block in self.blocks[:-1]:
            x = block(x)
        if not return_attn:
            return self.norm(self.blocks[-1](x))
        x, attn = self.blocks[-1](x, return_attn=True)
        return self.norm(x), attn

    def load_pretrained(self, checkpoint):
        """Load an official MAE / DINO / iBOT / timm ViT checkpoint or a HandMIM `backbone.pth`.

        `checkpoint` is what `torch.load` returned: a state dict, or a dict holding one under
        'teacher', 'model', 'state_dict', 'student' or 'backbone' (first found; DINO and iBOT
        evaluate the teacher). Prefixes 'module.', 'backbone.', 'encoder.' are stripped, iBOT's
        `masked_embed` becomes `mask_token`, heads ('head.', 'fc_norm.', MAE's 'decoder*' and its
        decoder `mask_token`, 'last_layer*') are dropped, and `pos_embed` is interpolated to this
        model's grid. Returns (loaded, missing, unexpected) key lists; a key whose shape differs
        from ours counts as unexpected (and its parameter as missing).
        """
        state = _clean_checkpoint(checkpoint)
        if 'pos_embed' in state:
            state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], self.grid)
        own = self.state_dict()
        loaded = [k for k, v in state.items() if k in own and v.shape == own[k].shape]
        self.load_state_dict({k: state[k] for k in loaded}, strict=False)
        missing = [k for k in own if k not in loaded]
        unexpected = [k for k in state if k not in loaded]
        return loaded, missing, unexpected


_CONTAINERS = ('teacher', 'model', 'state_dict', 'student', 'backbone')
_PREFIXES = ('module.', 'backbone.', 'encoder.')
_HEADS = ('head.', 'head_dist.', 'fc_norm.', 'decoder', 'last_layer')


def _clean_checkpoint(checkpoint):
    """Official checkpoint dict -> {our key name: tensor} (see `ViT.load_pretrained`)."""
    state = checkpoint
    if not isinstance(state, dict):
        raise ValueError(f'expected a checkpoint dict, got {type(state).__name__}')
    while not any(torch.is_tensor(v) for v in state.values()):
        key = next((k for k in _CONTAINERS if isinstance(state.get(k), dict)), None)
        if key is None:
            raise ValueError(f'no ViT weights in this checkpoint: no tensors at the top level and '
                             f'none of {_CONTAINERS} below it (keys: {sorted(state)[:10]})')
        state = state[key]
    out, has_decoder = {}, False
    for k, v in state.items():
        while k.startswith(_PREFIXES):
            k = k.split('.', 1)[1]
        has_decoder |= k.startswith('decoder')
        if k == 'masked_embed':  # iBOT's student: (1, D)
            k, v = 'mask_token', v.reshape(1, 1, -1)
        if torch.is_tensor(v) and not k.startswith(_HEADS):
            out[k] = v
    if has_decoder:  # MAE: its `mask_token` is the decoder's, (1, 1, 512)
        out.pop('mask_token', None)
    return out


# Measured at 224 px. Parameters: timm's count without the classifier, plus D for mask_token.
# FLOPs of one forward pass, 2 per multiply-add (papers often quote multiply-adds: half of it).
def vit_tiny(**kw):  # 5,524,608 parameters, 2.51 GFLOPs (ViT-Ti/16, DeiT-Ti)
    return ViT(**dict(dict(embed_dim=192, depth=12, num_heads=3), **kw))


def vit_small(**kw):  # 21,666,048 parameters, 9.20 GFLOPs (ViT-S/16, DINO / iBOT)
    return ViT(**dict(dict(embed_dim=384, depth=12, num_heads=6), **kw))


def vit_base(**kw):  # 85,799,424 parameters, 35.13 GFLOPs (ViT-B/16, HandMIM's backbone)
    return ViT(**dict(dict(embed_dim=768, depth=12, num_heads=12), **kw))


def vit_large(**kw):  # 303,302,656 parameters, 123.11 GFLOPs (ViT-L/16, MAE)
    return ViT(**dict(dict(embed_dim=1024, depth=24, num_heads=16), **kw))


ARCHS = dict(vit_tiny=vit_tiny, vit_small=vit_small, vit_base=vit_base, vit_large=vit_large)


# ----------------------------------------------------------------------------------------------
# Self-supervised heads (pretraining).

class ProjectionHead(nn.Module):
    """iBOT/DINO head: MLP (in -> 2048 -> 2048 -> 256, GELU), L2 normalization, then a
    weight-normalized Linear(256, out_dim) without bias. Works on (B, D) or (B, N, D).

    The weight norm uses the current parametrization API: DINO/iBOT's `last_layer.weight_g` /
    `weight_v` are here `last_layer.parametrizations.weight.original0` / `original1` (torch
    converts the old keys on `load_state_dict`). With `norm_last_layer` the row norms g stay frozen
    at 1, so the logits are cosine similarities to out_dim prototypes.
    """

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (out_dim, 1) row norms
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)  # (..., bottleneck)
        return self.last_layer(x)  # (..., out_dim)


class PixelHead(nn.Module):
    """Masked-pixel regression (SimMIM/MAE): one Linear per token to its patch's p*p*3 values,
    laid out like MAE's `patchify`: (row in patch, column in patch, channel), channel fastest."""

    def __init__(self, embed_dim, patch_size):
        super().__init__()
        self.proj = nn.Linear(embed_dim, patch_size * patch_size * 3)

    def forward(self, x):
        return self.proj(x)  # (B, N, p*p*3)


class PKAHead(nn.Module):
    """Pseudo-keypoint head: [CLS] token (B, D) -> H points (x, y) in [-1, 1] (tanh), one per head, in the
    normalized coordinates of the view (the convention of the regressor's camera, README)."""

    def __init__(self, embed_dim, num_keypoints, hidden_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or embed_dim
        self.num_keypoints = num_keypoints
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, 2 * num_keypoints))

    def forward(self, cls):
        return torch.tanh(self.mlp(cls)).reshape(cls.shape[0], self.num_keypoints, 2)  # (B, H, 2)


# ----------------------------------------------------------------------------------------------
# Geometry shared by the regressor and its users (conventions: README).

def rotmat_to_rot6d(R):
    """(..., 3, 3) -> (..., 6): column 0 then column 1 (Zhou et al. 2019)."""
    return R[..., :, :2].transpose(-1, -2).reshape(*R.shape[:-2], 6)


def rot6d_to_rotmat(x):
    """(..., 6) -> (..., 3, 3) by Gram-Schmidt; the inverse of `rotmat_to_rot6d` on rotations."""
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)  # columns b1, b2, b3


def _axis_angle_to_rotmat(aa):
    """(..., 3) -> (..., 3, 3) as the exponential of the skew matrix (exact, also at angle 0)."""
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    return torch.linalg.matrix_exp(skew)


def weak_perspective(points, cam):
    """Weak perspective: points (B, P, 3), cam (B, 3) = (s, tx, ty) -> uv = s (X_xy + t), (B, P, 2).

    uv lives on the crop's normalized coordinates: -1 and +1 are the crop's outer EDGES, so the
    pixel position is u_px = (uv + 1) W / 2 with pixel i spanning [i, i+1). That is exactly how
    `grid_sample(align_corners=False)` reads a feature map (see `sample_points`).
    """
    s, t = cam[:, None, :1], cam[:, None, 1:]  # (B, 1, 1), (B, 1, 2)
    return s * (points[..., :2] + t)  # (B, P, 2)


def cam_to_translation(cam, focal, img_size):
    """(B, 3) weak perspective camera -> (B, 3) camera-frame translation (tx, ty, 2 f / (s W)).

    A pinhole camera with focal `focal` px and principal point at the crop centre (W/2, W/2) then
    projects points of the MANO frame's plane Z = 0 exactly where `weak_perspective` does.
    """
    return torch.stack([cam[:, 1], cam[:, 2], 2 * focal / (cam[:, 0] * img_size)], dim=-1)


def camera_translation(cam, K, crop_size):
    """Camera-frame translation (B, 3) of the MANO-frame mesh from the weak-perspective camera (B, 3).

    `cam_to_translation` gives (tx, ty, 2 f / (s S)) for a principal point at the crop centre S/2; a
    principal point c elsewhere shifts the projection by (c - S/2) px, undone by (S - 2c) / (s S) in
    metres. Then points at the reference depth (MANO's Z = 0 plane) project through K (B, 3, 3) exactly
    where the weak-perspective camera puts them. f = (fx + fy) / 2. The depth is only as good as weak
    perspective; Procrustes-aligned metrics do not depend on it."""
    s = cam[:, :1].clamp(min=1e-6)
    T = cam_to_translation(torch.cat([s, cam[:, 1:]], 1), (K[:, 0, 0] + K[:, 1, 1]) / 2, crop_size)
    shift = (crop_size - 2 * K[:, :2, 2]) / (s * crop_size)  # (B, 2)
    return T + torch.cat([shift, torch.zeros_like(s)], 1)


def sample_points(feat, uv):
    """Bilinear samples of a (B, C, h, w) map at normalized points uv (B, P, 2) -> (B, P, C).
    Points outside the crop read zeros (grid_sample's zero padding, as PyMAF)."""
    out = F.grid_sample(feat, uv.unsqueeze(2).to(feat.dtype), align_corners=False)  # (B, C, P, 1)
    return out.squeeze(-1).transpose(1, 2)  # (B, P, C)


def farthest_point_sampling(points, n):
    """Indices (n,) of a deterministic, evenly spread subset of (V, 3) points, greedy farthest-first
    starting from the point farthest from the centroid."""
    n = min(n, len(points))
    idx = [int((points - points.mean(0)).norm(dim=1).argmax())]
    dist = (points - points[idx[0]]).norm(dim=1)
    for _ in range(n - 1):
        idx.append(int(dist.argmax()))
        dist = torch.minimum(dist, (points - points[idx[-1]]).norm(dim=1))
    return torch.tensor(idx)


# ----------------------------------------------------------------------------------------------
# PyMAF mesh regressor on a plain ViT (Zhang et al. 2021).

def _deconv_block(in_dim, out_dim):
    """2x upsampling as in PyMAF / SimpleBaseline: ConvTranspose(k4, s2, p1) - BN - ReLU."""
    return nn.Sequential(nn.ConvTranspose2d(in_dim, out_dim, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))


def _point_mlp(in_dim, dims):
    """Per-point feature reduction (PyMAF's MAF extractor, without its skip concatenations)."""
    layers = []
    for d in dims[:-1]:
        layers += [nn.Linear(in_dim, d), nn.LeakyReLU()]
        in_dim = d
    return nn.Sequential(*layers, nn.Linear(in_dim, dims[-1]))


def _regressor(in_dim, hidden_dim, out_dim, dropout):
    """HMR/PyMAF iterative-error-feedback MLP. Its last layer starts tiny (xavier gain 0.01, as
    PyMAF) so the first prediction is the mean hand. PyMAF has no nonlinearity between fc1 and fc2
    (making them one linear map) and dropout 0.5; we add the ReLU and default to no dropout, since
    the ViT already has drop path and our short schedules underfit rather than overfit."""
    last = nn.Linear(hidden_dim, out_dim)
    nn.init.xavier_uniform_(last.weight, gain=0.01)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), last)


class MeshRegressor(nn.Module):
    """ViT + PyMAF head: images (B, 3, S, S) -> list of `n_iter` dicts, one per refinement step,
    each with 'pose6d' (B, 16, 6), 'rotmat' (B, 16, 3, 3), 'betas' (B, 10), 'cam' (B, 3) =
    (s, tx, ty), 'vertices' (B, V, 3) and 'joints' (B, J, 3) in MANO's frame (no translation),
    'joints2d' (B, J, 2) = `weak_perspective(joints, cam)` in [-1, 1] crop coordinates.

    1. Patch tokens become a (B, D, h, w) map; one 2x deconv block per iteration builds a pyramid
       (h -> 2h -> 4h -> 8h; 28, 56, 112 for ViT/16 at 224 px, one octave finer than PyMAF's
       ResNet 14, 28, 56 since a ViT starts at stride 16). Channels halve per level from
       `deconv_width` (256, 128, 64) instead of PyMAF's constant 256, which at 112 x 112 would cost more
       than a ViT-S; `deconv_dims` sets each level's channels explicitly.
    2. Iteration 1 samples a grid_size^2 grid (cell centres); iterations 2.. sample mesh-aligned
       features at `n_points` farthest-point-sampled vertices of the previous (detached) mesh,
       projected with the previous (detached) camera (PyMAF-X uses 195 MANO points).
    3. A per-point MLP reduces each feature to 5 numbers; a regressor per iteration maps
       [features, previous parameters] to residuals of (16 x 6D rotations, 10 betas, 3 camera).
    4. With `n_heatmaps` (21), the last iteration's dict also holds 'heatmaps' (B, J, 8h, 8w): per-joint
       logits on the finest level, the hand counterpart of PyMAF's auxiliary dense (IUV) supervision.
    Start (mean parameters): identity global orientation, MANO's `hands_mean` finger pose if the
    layer has it (else flat), zero betas, and a camera that centres the mean hand and makes it fill
    `init_fill` of the crop. The camera is regressed in normalized units c = (s / s0, s0 tx, s0 ty),
    with s0 that filling scale, so all residuals are O(1) (PyMAF-X rescales by a fixed 10 instead).
    """

    def __init__(self, vit, mano, n_iter=3, deconv_width=256, deconv_dims=None, grid_size=21, n_points=195,
                 point_dims=(128, 64, 5), hidden_dim=1024, dropout=0.0, init_fill=0.7, n_heatmaps=0):
        super().__init__()
        deconv_dims = tuple(deconv_dims or (max(deconv_width >> i, 16) for i in range(n_iter)))
        if len(deconv_dims) != n_iter:
            raise ValueError(f'need one deconv level per iteration: {deconv_dims} for {n_iter}')
        self.vit, self.mano, self.n_iter = vit, mano, n_iter
        dims = (vit.embed_dim, *deconv_dims)
        self.deconv = nn.ModuleList(_deconv_block(dims[i], dims[i + 1]) for i in range(n_iter))
        self.point_mlps = nn.ModuleList(_point_mlp(c, point_dims) for c in deconv_dims)
        # PyMAF supervises its finest feature map with a dense auxiliary task (IUV maps for bodies); for
        # hands: one heat map per joint, a 1x1 conv on the last pyramid level (SimpleBaseline's head)
        self.heatmap_head = nn.Conv2d(deconv_dims[-1], n_heatmaps, 1) if n_heatmaps else None

        r = (torch.arange(grid_size) + 0.5) * 2 / grid_size - 1  # centres of grid_size cells
        gy, gx = torch.meshgrid(r, r, indexing='ij')
        self.register_buffer('grid', torch.stack([gx, gy], -1).reshape(-1, 2), persistent=False)
        template = mano.v_template.detach().float().cpu()  # (V, 3)
        self.register_buffer('point_ids', farthest_point_sampling(template, n_points),
                             persistent=False)

        n_state = NUM_JOINTS * 6 + NUM_BETAS + 3
        n_feat = [grid_size ** 2] + [len(self.point_ids)] * (n_iter - 1)
        self.regressors = nn.ModuleList(_regressor(n * point_dims[-1] + n_state, hidden_dim,
                                                   n_state, dropout) for n in n_feat)
        self._init_mean_params(mano, init_fill)

    @torch.no_grad()
    def _init_mean_params(self, mano, init_fill):
        hands_mean = getattr(mano, 'hands_mean', None)
        fingers = torch.zeros(15, 3) if hands_mean is None else hands_mean.detach().float().cpu()
        rotmat = torch.cat([torch.eye(3)[None], _axis_angle_to_rotmat(fingers.reshape(15, 3))])
        device = mano.v_template.device
        verts = mano(pose=rotmat[None].to(device),
                     betas=torch.zeros(1, NUM_BETAS, device=device))[0]  # (1, V, 3)
        xy = verts[0, :, :2].float().cpu()  # (V, 2)
        lo, hi = xy.min(0).values, xy.max(0).values
        self.cam_scale = float(2 * init_fill / (hi - lo).max())  # s0: mean hand spans init_fill
        cam = torch.cat([torch.ones(1), -(lo + hi) / 2 * self.cam_scale])  # centred, normalized
        state = torch.cat([rotmat_to_rot6d(rotmat).flatten(), torch.zeros(NUM_BETAS), cam])
        self.register_buffer('init_state', state, persistent=False)  # (16*6 + 10 + 3,)

    def forward(self, images):
        B, p = images.shape[0], self.vit.patch_size
        tokens = self.vit(images)  # (B, 1+N, D)
        feat = tokens[:, 1:].transpose(1, 2).reshape(B, -1, images.shape[2] // p,
                                                    images.shape[3] // p)  # (B, D, h, w)
        state = self.init_state.expand(B, -1)  # (B, 16*6 + 10 + 3)
        outputs = []
        for i in range(self.n_iter):
            feat = self.deconv[i](feat)  # (B, C_i, 2^(i+1) h, 2^(i+1) w)
            if i == 0:
                uv = self.grid.expand(B, -1, -1)  # (B, G, 2)
            else:  # PyMAF feeds back the previous mesh and camera without gradient
                prev = outputs[-1]
                uv = weak_perspective(prev['vertices'][:, self.point_ids].detach(),
                                      prev['cam'].detach())  # (B, P, 2)
            point_feat = self.point_mlps[i](sample_points(feat, uv))  # (B, P, 5)
            state = state.detach()
            x = torch.cat([point_feat.flatten(1), state.to(point_feat.dtype)], dim=1)
            delta = self.regressors[i](x)  # (B, 16*6 + 10 + 3)
            state = state + delta.float()
            # state, MANO and camera in float32 even under AMP: bf16's 8-bit mantissa would put
            # millimetre errors on the vertices
            with torch.autocast(state.device.type, enabled=False):
                outputs.append(self._decode(state))
        if self.heatmap_head is not None:
            outputs[-1]['heatmaps'] = self.heatmap_head(feat)  # (B, J, 8h, 8w) logits of the finest level
        return outputs

    def _decode(self, state):
        """(B, 109) regressor state -> the output dict (MANO forward, camera, 2D joints)."""
        pose6d, betas, cam_n = state.split([NUM_JOINTS * 6, NUM_BETAS, 3], dim=1)
        pose6d = pose6d.reshape(-1, NUM_JOINTS, 6)  # (B, 16, 6)
        rotmat = rot6d_to_rotmat(pose6d)  # (B, 16, 3, 3)
        mano_out = self.mano(pose=rotmat, betas=betas)
        vertices, joints = mano_out[0], mano_out[1]
        cam = torch.cat([cam_n[:, :1] * self.cam_scale, cam_n[:, 1:] / self.cam_scale], dim=1)
        return dict(pose6d=pose6d, rotmat=rotmat, betas=betas, cam=cam, vertices=vertices,
                    joints=joints, joints2d=weak_perspective(joints, cam))


def build_regressor(cfg, mano):
    """ViT + MeshRegressor from a fine-tuning config dict (arch, depth, img_size, patch_size, n_iter,
    head_width, drop_path, w_heatmap: what shapes the weights) and a MANO layer."""
    kw = dict(img_size=cfg['img_size'], patch_size=cfg['patch_size'], drop_path=cfg.get('drop_path', 0.0))
    if cfg.get('depth') is not None:
        kw['depth'] = cfg['depth']
    return MeshRegressor(ARCHS[cfg['arch']](**kw), mano, n_iter=cfg['n_iter'], deconv_width=cfg.get('head_width', 256),
                         n_heatmaps=21 if cfg.get('w_heatmap') else 0)


# ----------------------------------------------------------------------------------------------
# Parameter and FLOP count.

def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    """FLOPs of softmax(q k^T) v: two batched matmuls (torch's counter skips the CPU kernel)."""
    b, h, lq, d = query
    return 2 * b * h * lq * key[2] * (d + value[3])


def model_summary(model, img_size):
    """Print and return {'params', 'flops'}: parameters and forward FLOPs (2 per multiply-add)
    for one img_size x img_size image. Works for a `ViT` or a `MeshRegressor`."""
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(x)
    model.train(was_training)
    flops = counter.get_total_flops()
    print(f'{type(model).__name__}: {n_params / 1e6:.2f} M parameters, '
          f'{flops / 1e9:.2f} GFLOPs per {img_size} px image ({flops / 2e9:.2f} G multiply-adds)')
    return {'params': n_params, 'flops': flops}


if __name__ == '__main__':
    for name, factory in [('vit_tiny', vit_tiny), ('vit_small', vit_small),
                          ('vit_base', vit_base), ('vit_large', vit_large)]:
        print(name, end=': ')
        model_summary(factory(), 224)
