"""Hugging Face CLIP checkpoints in OpenAI's layout, so that clip_model.load reads them too.

CgT-GAN (arXiv:2308.12045, Sec. 3) uses OpenAI's CLIP ViT-L/14. Besides OpenAI's own release (a
TorchScript file, clip_model.MODEL_URLS), the same weights ship on the Hugging Face hub as
transformers' CLIPModel (openai/clip-vit-large-patch14: a folder with config.json and
model.safetensors or pytorch_model.bin). Only the names and three layouts differ:

    transformers (HF)                                   OpenAI (clip_model.CLIP)
    text_model.encoder.layers.i.self_attn.{q,k,v}_proj  transformer.resblocks.i.attn.in_proj (packed)
    text_projection.weight (D, W), a Linear             text_projection (W, D), a matrix
    vision_model.pre_layrnorm (sic)                     visual.ln_pre

`hf_to_openai` renames a state dict; `read_hf_folder` reads a folder (and refuses one without
weights, or a CLIP whose activation is not OpenAI's quick GELU) into OpenAI's layout. Only ViT CLIPs
exist in transformers' layout; OpenAI's ResNet CLIPs load from OpenAI's files.

Shape legend: W transformer width, D joint embedding width.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

# The weight files a Hugging Face model folder may hold, in the order transformers prefers them.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# Per-layer submodules: transformers' name -> OpenAI's (each with .weight and .bias).
_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# Whole-model LayerNorms: OpenAI's name -> transformers'.
_NORM_NAMES = {"ln_final": "text_model.final_layer_norm", "visual.ln_pre": "vision_model.pre_layrnorm",
               "visual.ln_post": "vision_model.post_layernorm"}


def hf_to_openai(hf_state: dict) -> dict:
    """A transformers CLIPModel state dict -> OpenAI's key names and layouts: q, k and v packed
    into one in_proj (3W, W), the two projections transposed from Linear weights to matrices."""
    out = {"logit_scale": hf_state["logit_scale"],
           "text_projection": hf_state["text_projection.weight"].t(),  # (W, D)
           "visual.proj": hf_state["visual_projection.weight"].t(),  # (W, D)
           "token_embedding.weight": hf_state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf_state["text_model.embeddings.position_embedding.weight"],
           "visual.class_embedding": hf_state["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": hf_state["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding":
               hf_state["vision_model.embeddings.position_embedding.weight"]}
    for ours, theirs in _NORM_NAMES.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = hf_state[f"{theirs}.{p}"]
    for tower, prefix in [("text_model", "transformer"), ("vision_model", "visual.transformer")]:
        layers = {k.split(".")[3] for k in hf_state if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            for p in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{p}"] = torch.cat(
                    [hf_state[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])  # (3W, ...)
                for theirs, ours in _LAYER_NAMES.items():
                    out[f"{dst}{ours}.{p}"] = hf_state[f"{src}{theirs}.{p}"]
    return out


def is_hf_folder(path) -> bool:
    """A folder with a config.json: a Hugging Face model (clip_model.load reads it here)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_folder(folder) -> dict:
    """The OpenAI-layout state dict of a Hugging Face CLIP folder (config.json + model.safetensors
    or pytorch_model.bin), with the head counts config.json gives. A one-line ValueError names
    what is missing or not OpenAI's CLIP."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no readable config.json ({type(e).__name__}); give a Hugging "
                         "Face CLIP folder such as `hf download openai/clip-vit-large-patch14 "
                         f"--local-dir {folder}` writes") from None
    towers = {"transformer_heads": config.get("text_config", {}),
              "vision_heads": config.get("vision_config", {})}
    acts = {t.get("hidden_act", "quick_gelu") for t in towers.values()}
    if config.get("model_type") != "clip" or acts != {"quick_gelu"}:
        raise ValueError(f"{folder}: not OpenAI's CLIP in transformers' layout (model_type "
                         f"{config.get('model_type')!r}, activation {sorted(acts)}; quick_gelu "
                         "CLIP expected)")
    files = [folder / name for name in HF_WEIGHTS if (folder / name).is_file()]
    if not files:
        raise ValueError(f"{folder}: the folder holds no weights ({' or '.join(HF_WEIGHTS)}); "
                         f"download them with `hf download openai/clip-vit-large-patch14 "
                         f"--local-dir {folder}`")
    if files[0].suffix == ".safetensors":
        hf_state = safetensors.torch.load_file(str(files[0]))
    else:
        hf_state = torch.load(files[0], map_location="cpu", weights_only=True)
    try:
        state = hf_to_openai(hf_state)
    except KeyError as e:
        raise ValueError(f"{files[0]}: not a CLIPModel state dict (no {e.args[0]!r})") from None
    for key, tower in towers.items():
        if "num_attention_heads" in tower:
            state[key] = torch.tensor(tower["num_attention_heads"])
    return state
