"""CLIP, written out: the model, its image preprocessing, and checkpoint loading.

CgT-GAN (arXiv:2308.12045, Sec. 3) keeps a CLIP model frozen and uses it twice: the image embedding
is the caption generator's input, and the text embedding of each generated caption is compared with
the image (CLIP-cos reward) or with an aggregated corpus embedding (CLIP-agg reward). This file is that
CLIP, as OpenAI released it (Radford et al. 2021; github.com/openai/CLIP): parameter names match
OpenAI's checkpoints, so their released weights load with strict key checking, and the
hyperparameters are read off a state dict's shapes. A small `CLIPConfig` builds tiny CLIPs from
scratch (ShapesWorld trains one with `contrastive_loss`). CLIP's BPE tokenizer, which turns captions
into the token ids `encode_text` reads, is clip_tokenizer.py.

Shape legend: B images, N texts, L context length (tokens), S sequence length inside a transformer,
W transformer width, H heads, R image resolution, D joint embedding width. Sections: building
blocks; vision towers; the CLIP model and its loss; checkpoint files and downloads; preprocessing.
"""
import math
import os
import pickle
import re
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

import clip_convert
from data import atomic_write, file_sha256

# ---------------------------------------------------------------------------------------------------
# Building blocks shared by the text transformer and the vision transformer


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (OpenAI ships fp16 weights)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained CLIP with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_weight,
    in_proj_bias, out_proj), so OpenAI's keys load, computed with PyTorch's fused attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, causal: bool = False):
        B, S, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3W)
        q, k, v = qkv.view(B, S, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, S, W/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, S, W/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, W))  # (B, S, W)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), causal=self.causal)  # (B, S, W)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks; causal for text, bidirectional for image patches."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)  # (B, S, W)


# ---------------------------------------------------------------------------------------------------
# Vision towers: the vision transformer (ViT-B/32 ... ViT-L/14@336px) and the modified ResNet (RN50 ...)


class VisionTransformer(nn.Module):
    """Patches -> tokens, a class token, a transformer, and the class token's projection to D."""

    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        scale = width ** -0.5
        grid = resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, S, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, D)


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased downsampling: an average pool replaces strided convs."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # OpenAI names the pooling step "-1" so the conv and norm keep the indices 0 and 1.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.avgpool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(y + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one query: the mean feature attends to all positions (and itself)."""

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, width) / width ** 0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # (B, S-1, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, S, C)
        B, S, C = x.shape
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, -1).transpose(1, 2)  # (B, H, 1, C/H)
        k = self.k_proj(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, C/H)
        v = self.v_proj(x).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, C/H)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C)  # (B, C)
        return self.c_proj(y)  # (B, D)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-conv stem with an average pool, anti-aliased bottlenecks, attention pooling."""

    def __init__(self, layers: tuple, output_dim: int, heads: int, resolution: int, width: int):
        super().__init__()
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            stage += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * Bottleneck.expansion
        # The stem and three strided stages shrink the image 32-fold; layer4 ends at 32 * width channels.
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, width, R/4, R/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, R/32, R/32)
        return self.attnpool(x)  # (B, D)


# ---------------------------------------------------------------------------------------------------
# The CLIP model and its contrastive loss


@dataclass
class CLIPConfig:
    """CLIP's hyperparameters, named as in OpenAI's code. The defaults are a tiny ViT for CPU demos;
    `OPENAI_CONFIGS` holds the released models' settings.

    vision_layers: an int builds a vision transformer, a 4-tuple a modified ResNet.
    vision_heads / transformer_heads: None derives them as OpenAI does (one head per 64 channels;
    ResNet attention pooling: 32 * vision_width / 64).
    learn_logit_scale: False holds `logit_scale` (log of the logit temperature) fixed at
    `logit_scale_init`; e.g. math.log(100) as ShapesWorld uses. It stays a parameter (so keys match
    OpenAI's) but with requires_grad=False, so optimisers leave it alone.
    """

    embed_dim: int = 64
    image_resolution: int = 64
    vision_layers: int | tuple = 2
    vision_width: int = 64
    vision_patch_size: int | None = 8
    context_length: int = 32
    vocab_size: int = 49408
    transformer_width: int = 64
    transformer_heads: int = 1
    transformer_layers: int = 2
    vision_heads: int | None = None
    learn_logit_scale: bool = True
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        if isinstance(self.vision_layers, list):
            self.vision_layers = tuple(self.vision_layers)
        resnet = isinstance(self.vision_layers, tuple)
        if self.vision_heads is None:
            self.vision_heads = self.vision_width * 32 // 64 if resnet else self.vision_width // 64
        width = self.vision_width * 32 if resnet else self.vision_width
        for name, w, h in [("vision", width, self.vision_heads), ("transformer", self.transformer_width,
                                                                     self.transformer_heads)]:
            if h < 1 or w % h:
                raise ValueError(f"CLIPConfig: {name} width {w} is not divisible into {h} heads; set {name}_heads")
        if not resnet and self.image_resolution % self.vision_patch_size:
            raise ValueError(f"CLIPConfig: image_resolution {self.image_resolution} is not a multiple of "
                             f"vision_patch_size {self.vision_patch_size}")


def _openai(embed, res, layers, width, patch, text_width, text_layers=12):
    return CLIPConfig(embed, res, layers, width, patch, 77, 49408, text_width, text_width // 64, text_layers)


# The released models' hyperparameters, as build_model infers them from each checkpoint.
OPENAI_CONFIGS = {
    "RN50": _openai(1024, 224, (3, 4, 6, 3), 64, None, 512),
    "RN101": _openai(512, 224, (3, 4, 23, 3), 64, None, 512),
    "RN50x4": _openai(640, 288, (4, 6, 10, 6), 80, None, 640),
    "RN50x16": _openai(768, 384, (6, 8, 18, 8), 96, None, 768),
    "RN50x64": _openai(1024, 448, (3, 15, 36, 10), 128, None, 1024),
    "ViT-B/32": _openai(512, 224, 12, 768, 32, 512),
    "ViT-B/16": _openai(512, 224, 12, 768, 16, 512),
    "ViT-L/14": _openai(768, 224, 24, 1024, 14, 768),
    "ViT-L/14@336px": _openai(768, 336, 24, 1024, 14, 768),
}


class CLIP(nn.Module):
    """Image and text encoders into one D-dimensional space, with a learned logit temperature."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        if isinstance(cfg.vision_layers, tuple):
            self.visual = ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_heads,
                                         cfg.image_resolution, cfg.vision_width)
        else:
            self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size, cfg.vision_width,
                                            cfg.vision_layers, cfg.vision_heads, cfg.embed_dim)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads,
                                       causal=True)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)),
                                        requires_grad=cfg.learn_logit_scale)
        self._init_parameters()

    def forward(self, images, tokens):
        """images (B, 3, R, R), tokens (N, L) -> logits_per_image (B, N), logits_per_text (N, B)."""
        image = F.normalize(self.encode_image(images), dim=-1)  # (B, D)
        text = F.normalize(self.encode_text(tokens), dim=-1)  # (N, D)
        logits_per_image = self.logit_scale.exp() * image @ text.t()  # (B, N)
        return logits_per_image, logits_per_image.t()

    def encode_image(self, images):
        """images (B, 3, R, R), preprocessed -> (B, D), not normalised."""
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens):
        """tokens (N, L) long -> (N, D), not normalised: the final state at each text's end token.

        The end token has the largest id in every row, so argmax finds it. Attention is causal, so
        positions after the last end token cannot change the result: they are cut off first, which
        makes short captions much cheaper than a full 77-token pass.
        """
        eot = tokens.argmax(dim=-1)  # (N,)
        tokens = tokens[:, : int(eot.max()) + 1]  # (N, S)
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding[: tokens.shape[1]].to(self.dtype)
        x = self.ln_final(self.transformer(x))  # (N, S, W)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (N, D)

    @property
    def dtype(self):
        return self.text_projection.dtype

    def _init_parameters(self):
        # OpenAI's initialisation (model.py, initialize_parameters), so from-scratch training matches.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=pool.c_proj.in_features ** -0.5)
            for name, p in self.visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(p)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)


# exercise: contrastive_loss (docs/exercises.md)
def contrastive_loss(logits_per_image):
    """CLIP's symmetric cross-entropy (InfoNCE) over a batch of matched pairs.

    loss = (CE(logits_per_image, arange(B)) + CE(logits_per_image.T, arange(B))) / 2, where row i is
    image i against every text and its own caption is the diagonal entry. Example: logits
    [[2, 0], [0, 2]] give each row -log(e^2 / (e^2 + e^0)) = log(1 + e^-2) = 0.1269, and so the loss.
    logits_per_image (B, B) -> scalar.
    """
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)  # (B,)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target)) / 2


# ---------------------------------------------------------------------------------------------------
# Checkpoint files: inferring the architecture, reading state dicts, downloading released weights

# OpenAI's published weights; the SHA-256 of each file is the URL's second-to-last path component.
_CDN = "https://openaipublic.azureedge.net/clip/models"
MODEL_URLS = {
    "RN50": f"{_CDN}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_CDN}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_CDN}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_CDN}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_CDN}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_CDN}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_CDN}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_CDN}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_CDN}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# Non-weight entries: OpenAI's archives carry the first three; `save` writes head counts that the
# one-head-per-64-channels rule would not recover (tiny models).
_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "transformer_heads", "vision_heads")


def _count_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def config_from_state_dict(state_dict) -> CLIPConfig:
    """Reads CLIP's hyperparameters off the shapes of a state dict with OpenAI's key names."""
    sd = state_dict
    if "visual.proj" not in sd and "visual.attnpool.positional_embedding" not in sd:
        raise ValueError("not a CLIP state dict: no 'visual.proj' (ViT) or 'visual.attnpool.positional_embedding' "
                         "(ResNet) key; expected OpenAI's key names")
    try:
        if "visual.proj" in sd:
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = dict(vision_layers=_count_blocks(sd, "visual.transformer.resblocks."), vision_width=width,
                          vision_patch_size=patch, image_resolution=patch * grid)
        else:
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = dict(vision_layers=tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)),
                          vision_width=sd["visual.layer1.0.conv1.weight"].shape[0], vision_patch_size=None,
                          image_resolution=grid * 32)
        if "input_resolution" in sd:
            # Stored by OpenAI's checkpoints, and by save() where the shapes do not imply it: a
            # ResNet's attention pool sees resolution // 32 cells, so 48 px reads back as 32 px.
            resolution = int(sd["input_resolution"])
            if resolution // (vision["vision_patch_size"] or 32) != grid:
                raise ValueError(f"input_resolution {resolution} does not match the image tower's "
                                 f"{grid}x{grid} grid")
            vision["image_resolution"] = resolution
        text_width = sd["ln_final.weight"].shape[0]
        heads = {k: int(sd[k]) for k in ("transformer_heads", "vision_heads") if k in sd}
        return CLIPConfig(embed_dim=sd["text_projection"].shape[1], context_length=sd["positional_embedding"].shape[0],
                          vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=text_width,
                          transformer_heads=heads.get("transformer_heads", text_width // 64),
                          transformer_layers=_count_blocks(sd, "transformer.resblocks."),
                          vision_heads=heads.get("vision_heads"), **vision)
    except KeyError as e:
        raise ValueError(f"not a CLIP state dict: no key {e.args[0]!r} (expected OpenAI's key names)") from None


def _key_list(keys, limit=8):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def build_model(state_dict) -> CLIP:
    """A CLIP with the architecture the state dict's shapes imply, holding its weights (train mode).

    Raises a one-line ValueError listing missing, unexpected or mis-shaped keys.
    """
    model = CLIP(config_from_state_dict(state_dict))
    weights = {k: v for k, v in state_dict.items() if k not in _EXTRA_KEYS}
    expected = model.state_dict()
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"state dict does not fit CLIP: missing keys [{_key_list(missing)}]; "
                         f"unexpected keys [{_key_list(unexpected)}]")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in weights.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"state dict does not fit CLIP: wrong shapes [{_key_list(wrong)}]")
    model.load_state_dict(weights)
    return model


# Pickled storage classes in TorchScript archives, by name.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptModule:
    """Stand-in for a pickled TorchScript module: the unpickler fills its __dict__ with attributes."""

    qualname = ""


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl without TorchScript: modules become _ScriptModule
    objects, tensors are rebuilt from the archive's raw storages, and nothing else may be loaded."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root, self.storages, self.classes = archive, root, {}, {}

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptModule,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        allowed = {("torch._utils", "_rebuild_tensor_v2"):
                   lambda storage, offset, size, stride, *args: storage.as_strided(size, stride, offset),
                   ("torch._utils", "_rebuild_parameter"): lambda data, *args: data,
                   ("collections", "OrderedDict"): OrderedDict}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return allowed[module, name]

    def persistent_load(self, pid):
        _, dtype, key, _, numel = pid  # ("storage", dtype, key, location, numel)
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _script_state_names(archive: zipfile.ZipFile, root: str) -> dict:
    """{class qualname: set of parameter and buffer names}, from the archive's TorchScript code."""
    names = {}
    for path in archive.namelist():
        if not (path.startswith(f"{root}/code/__torch__/") and path.endswith(".py")):
            continue
        module = path[len(root) + len("/code/"): -len(".py")].replace("/", ".")
        for body in re.split(r"^class ", archive.read(path).decode("utf-8"), flags=re.M)[1:]:
            lists = re.findall(r"__(?:parameters|buffers)__ = \[([^\]]*)\]", body)
            names[f"{module}.{body.split('(')[0].strip()}"] = set(re.findall(r'"([^"]+)"', "".join(lists)))
    return names


def read_torchscript_state_dict(path) -> dict:
    """The parameters and buffers of a TorchScript archive (OpenAI's release format), read from the
    zip's pickled data without loading or running the TorchScript program."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        state_names = _script_state_names(archive, root)
        with archive.open(f"{root}/data.pkl") as f:
            top = _ArchiveUnpickler(f, archive, root).load()
    state = {}

    def collect(module, prefix):
        # Tensors declared as parameters or buffers are state; others (OpenAI's attn_mask) are not.
        names = state_names.get(module.qualname)
        for name, value in vars(module).items():
            if isinstance(value, _ScriptModule):
                collect(value, f"{prefix}{name}.")
            elif isinstance(value, torch.Tensor) and (names is None or name in names):
                state[prefix + name] = value

    collect(top, "")
    return state


def read_state_dict(path) -> dict:
    """A state dict from a TorchScript archive, a torch.save file or a safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                is_script = any(n.endswith("/constants.pkl") for n in archive.namelist())
            if is_script:
                return read_torchscript_state_dict(path)
        if head[8:9] == b"{":
            return safetensors.torch.load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, safetensors.SafetensorError, zipfile.BadZipFile, RuntimeError, ValueError,
            EOFError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a CLIP checkpoint ({first}); expected OpenAI's TorchScript .pt, a "
                         "torch state dict or a .safetensors file") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a {type(state).__name__} of non-tensors); "
                         "save one with clip_model.save(model, path)")
    return state


def default_cache_dir() -> Path:
    """$CGTGAN_CACHE, else ~/.cache/cgtgan."""
    return Path(os.environ.get("CGTGAN_CACHE") or Path.home() / ".cache" / "cgtgan")


def download(url: str, target, sha256: str) -> Path:
    """Fetches url into target (progress bar, checksum, atomic rename) unless a good copy is there."""
    target = Path(target)
    if target.is_file() and file_sha256(target) == sha256:
        return target
    hint = f"put a copy at {target} (or set CGTGAN_CACHE to a directory holding it)"
    if os.environ.get("CGTGAN_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        raise FileNotFoundError(f"{target} is missing and downloads are off (offline); {hint}")

    # The checksum is checked before the rename, so a bad download never takes target's place.
    def fetch_checked(tmp: Path):
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=30) as source:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for block in iter(lambda: source.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if file_sha256(tmp) != sha256:
            raise RuntimeError(f"download of {url} failed its SHA-256 check (truncated or corrupt; deleted "
                               f"it): try again, or {hint}")

    try:
        atomic_write(target, fetch_checked)
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"could not download {url} ({getattr(e, 'reason', e)}); {hint}") from None
    return target


def save(model: CLIP, path):
    """Writes the model's state dict (torch.save, or safetensors for a .safetensors path) atomically.

    Head counts and an image resolution that build_model would not infer (one head per 64
    channels; a ResNet's resolution from its attention pool's grid) are stored as extra keys.
    """
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg, inferred = model.config, config_from_state_dict(state)
    for key, name in (("transformer_heads", "transformer_heads"), ("vision_heads", "vision_heads"),
                      ("image_resolution", "input_resolution")):
        if getattr(cfg, key) != getattr(inferred, key):
            state[name] = torch.tensor(getattr(cfg, key))
    write = safetensors.torch.save_file if path.suffix == ".safetensors" else torch.save
    atomic_write(path, lambda tmp: write(state, str(tmp)))


def load(name_or_path, device="cpu", cache_dir=None):
    """A released name (MODEL_URLS), a checkpoint file or a Hugging Face CLIP folder -> (CLIP, Preprocess).

    Names download once into cache_dir (default_cache_dir()); folders go through clip_convert. The
    model is in eval mode, float32 on the CPU (OpenAI ships fp16), else in the checkpoint's dtype.
    """
    if name_or_path in MODEL_URLS:
        url = MODEL_URLS[name_or_path]
        path = download(url, Path(cache_dir or default_cache_dir()) / url.split("/")[-1], url.split("/")[-2])
    else:
        path = Path(name_or_path)
        if not path.is_file() and not clip_convert.is_hf_folder(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file or Hugging Face CLIP folder, and "
                                    f"not a released model name ({', '.join(MODEL_URLS)})")
    state = clip_convert.read_hf_folder(path) if path.is_dir() else read_state_dict(path)
    try:
        model = build_model(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else state["text_projection"].dtype
    model = model.to(device=device, dtype=dtype).eval()
    return model, Preprocess(model.config.image_resolution)


# ---------------------------------------------------------------------------------------------------
# Image preprocessing (OpenAI's torchvision pipeline, with PIL and numpy)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def load_image(path) -> Image.Image:
    """Opens an image file as RGB, with a one-line error naming a missing, empty or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty image file (0 bytes); re-copy or remove it")
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable image ({e}); re-copy or remove it") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image; transparency (alpha band or palette transparency) over white."""
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


class Preprocess:
    """PIL image(s) -> (B, 3, R, R) float32: RGB, shorter side resized to R (bicubic), centre crop,
    scaled to [0, 1] and normalised with CLIP's mean and std.

    OpenAI converts to RGB after cropping; converting first gives the same pixels for RGB and
    grayscale images and lets palette images be resized bicubically (PIL would fall back to
    nearest-neighbour for mode "P"). Transparent pixels are composited onto white rather than
    keeping whatever colour hides under alpha 0. Both choices are Hugging Face's CLIPImageProcessor's
    (the second since transformers 5).
    """

    def __init__(self, resolution: int = 224):
        self.resolution = resolution

    def __call__(self, images):
        images = [images] if isinstance(images, Image.Image) else list(images)
        return torch.from_numpy(np.stack([self.pixels(image) for image in images]))  # (B, 3, R, R)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image -> (3, R, R) float32."""
        image, R = to_rgb(image), self.resolution
        # Like torchvision's Resize(R): the shorter side becomes R, the longer one is truncated.
        w, h = image.size
        size = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
        image = image.resize(size, Image.BICUBIC)
        # Like torchvision's CenterCrop: offsets are rounded (half to even), not floored.
        left, top = int(round((size[0] - R) / 2.0)), int(round((size[1] - R) / 2.0))
        image = image.crop((left, top, left + R, top + R))
        x = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD  # (R, R, 3)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, R, R)
