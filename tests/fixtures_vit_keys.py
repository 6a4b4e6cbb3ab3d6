"""Key names and shapes of the official ViT-S/16 and ViT-B/16 checkpoints, written down by hand.

Used by tests/test_model.py to check that model.ViT loads them strictly. Not derived from model.py:
the layouts are those of the published files (timm `vit_small_patch16_224` and
`vit_base_patch16_224`, DINO `dino_deitsmall16_pretrain.pth` and `dino_vitbase16_pretrain.pth`,
MAE `mae_pretrain_vit_base.pth`, iBOT `checkpoint_teacher.pth`): the same backbone keys everywhere;
they differ only in what sits around them (a classifier, a projection head, a decoder, a prefix,
iBOT's `masked_embed`).
The published parameter counts with the 1000-class classifier are the cross-check of these tables:
timm/DeiT ViT-S/16 22,050,664 and ViT-B/16 86,567,656.
"""

# Every key outside the 12 transformer blocks: ViT-S/16 at 224 px (196 patches + [CLS]).
VIT_SMALL_STEM = {
    'cls_token': (1, 1, 384),
    'pos_embed': (1, 197, 384),
    'patch_embed.proj.weight': (384, 3, 16, 16),
    'patch_embed.proj.bias': (384,),
    'norm.weight': (384,),
    'norm.bias': (384,),
}
# One block of ViT-S/16: width 384, 6 heads, MLP 1536; `blocks.<i>.` in front of each key.
VIT_SMALL_BLOCK = {
    'norm1.weight': (384,),
    'norm1.bias': (384,),
    'attn.qkv.weight': (1152, 384),
    'attn.qkv.bias': (1152,),
    'attn.proj.weight': (384, 384),
    'attn.proj.bias': (384,),
    'norm2.weight': (384,),
    'norm2.bias': (384,),
    'mlp.fc1.weight': (1536, 384),
    'mlp.fc1.bias': (1536,),
    'mlp.fc2.weight': (384, 1536),
    'mlp.fc2.bias': (384,),
}

VIT_BASE_STEM = {
    'cls_token': (1, 1, 768),
    'pos_embed': (1, 197, 768),
    'patch_embed.proj.weight': (768, 3, 16, 16),
    'patch_embed.proj.bias': (768,),
    'norm.weight': (768,),
    'norm.bias': (768,),
}
VIT_BASE_BLOCK = {
    'norm1.weight': (768,),
    'norm1.bias': (768,),
    'attn.qkv.weight': (2304, 768),
    'attn.qkv.bias': (2304,),
    'attn.proj.weight': (768, 768),
    'attn.proj.bias': (768,),
    'norm2.weight': (768,),
    'norm2.bias': (768,),
    'mlp.fc1.weight': (3072, 768),
    'mlp.fc1.bias': (3072,),
    'mlp.fc2.weight': (768, 3072),
    'mlp.fc2.bias': (768,),
}

# What surrounds the backbone in each family (for ViT-S; the loaders must drop or map these).
TIMM_CLASSIFIER_SMALL = {'head.weight': (1000, 384), 'head.bias': (1000,)}
IBOT_MASKED_EMBED_SMALL = {'masked_embed': (1, 384)}  # iBOT student only; ours: (1, 1, D)
DINO_HEAD_SMALL = {  # DINO/iBOT full training checkpoints: 'teacher' -> 'backbone.*' + 'head.*'
    'head.mlp.0.weight': (2048, 384), 'head.mlp.0.bias': (2048,),
    'head.mlp.2.weight': (2048, 2048), 'head.mlp.2.bias': (2048,),
    'head.mlp.4.weight': (256, 2048), 'head.mlp.4.bias': (256,),
    'head.last_layer.weight_g': (65536, 1), 'head.last_layer.weight_v': (65536, 256),
}
MAE_DECODER_BASE = {  # a few keys of MAE's full pretraining checkpoint (decoder width 512)
    'mask_token': (1, 1, 512),
    'decoder_embed.weight': (512, 768), 'decoder_embed.bias': (512,),
    'decoder_pos_embed': (1, 197, 512),
    'decoder_norm.weight': (512,), 'decoder_norm.bias': (512,),
    'decoder_pred.weight': (768, 512), 'decoder_pred.bias': (768,),
}
PUBLISHED_PARAMS_WITH_CLASSIFIER = {'vit_small': 22_050_664, 'vit_base': 86_567_656}


def backbone_keys(stem, block, depth=12):
    """{key: shape} of a whole backbone from its stem and block tables."""
    keys = dict(stem)
    for i in range(depth):
        keys.update({f'blocks.{i}.{k}': v for k, v in block.items()})
    return keys


VIT_SMALL = backbone_keys(VIT_SMALL_STEM, VIT_SMALL_BLOCK)
VIT_BASE = backbone_keys(VIT_BASE_STEM, VIT_BASE_BLOCK)
