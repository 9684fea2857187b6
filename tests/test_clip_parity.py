"""Parity of clip_model.CLIP with its peers on the same random weights.

- transformers' CLIPModel (quick_gelu, OpenAI's layout), weights mapped into our key names;
- OpenAI's reference model.py (from the clip-anytorch package, loaded by path: it imports only torch
  and numpy), traced and saved as a TorchScript archive like OpenAI's releases, then read by `load`;
- the released models' parameter counts, from state dicts with OpenAI's key names (meta tensors).
"""
import warnings

import pytest
import torch

from clip_model import CLIP, OPENAI_CONFIGS, config_from_state_dict, load

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def eot_tokens(n, length, vocab):
    """Random token rows, end token (vocab - 1, the largest id) at varied positions, zero padding."""
    g = torch.Generator().manual_seed(1)
    out = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        end = 1 + (7 * i) % (length - 1)
        out[i, :end] = torch.randint(1, vocab - 1, (end,), generator=g)
        out[i, end] = vocab - 1
    return out


def randomise(model, seed=0):
    """Non-trivial values everywhere (stock inits leave norms at 1/0 and ResNet bn3 at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
            if name.endswith("logit_scale"):
                t.fill_(2.5)


# --------------------------------------------------------------------------------------------------
# transformers' CLIPModel


def hf_to_openai(hf_state):
    """Hugging Face CLIPModel keys -> OpenAI's (q, k, v packed into in_proj, projections transposed)."""
    rename = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {"logit_scale": hf_state["logit_scale"],
           "text_projection": hf_state["text_projection.weight"].t(),
           "visual.proj": hf_state["visual_projection.weight"].t(),
           "token_embedding.weight": hf_state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf_state["text_model.embeddings.position_embedding.weight"],
           "visual.class_embedding": hf_state["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": hf_state["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": hf_state["vision_model.embeddings.position_embedding.weight"]}
    for ours, theirs in [("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm")]:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = hf_state[f"{theirs}.{p}"]
    for tower, prefix in [("text_model", "transformer"), ("vision_model", "visual.transformer")]:
        layers = {k.split(".")[3] for k in hf_state if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            for p in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{p}"] = torch.cat([hf_state[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
                for theirs, ours in rename.items():
                    out[f"{dst}{ours}.{p}"] = hf_state[f"{src}{theirs}.{p}"]
    return out


def test_matches_transformers_clipmodel():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=20, hidden_act="quick_gelu",
                         bos_token_id=298, eos_token_id=299, pad_token_id=0),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                           image_size=48, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=64)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    randomise(hf)
    ours = CLIP(config_from_state_dict(hf_to_openai(hf.state_dict()))).eval()
    ours.load_state_dict(hf_to_openai(hf.state_dict()))

    images, text = torch.randn(3, 3, 48, 48), eot_tokens(5, 20, 300)
    with torch.no_grad():
        hf_out = hf(input_ids=text, pixel_values=images)
        ours_image, ours_text = ours.encode_image(images), ours.encode_text(text)
        ours_logits, _ = ours(images, text)
    hf_image = hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)
    hf_text = hf.text_projection(hf.text_model(input_ids=text).pooler_output)
    assert rel_err(ours_image, hf_image) <= 1e-5
    assert rel_err(ours_text, hf_text) <= 1e-5
    assert rel_err(ours_logits, hf_out.logits_per_image) <= 1e-5


# --------------------------------------------------------------------------------------------------
# OpenAI's reference implementation, through a TorchScript archive


@pytest.mark.parametrize("vision", [dict(image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16),
                                    dict(image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
                                         vision_patch_size=None)], ids=["vit", "resnet"])
def test_openai_torchscript_archive_round_trip(tmp_path, vision, openai_clip_file):
    reference = openai_clip_file("model.py").CLIP(embed_dim=64, context_length=20, vocab_size=300, transformer_width=128,
                                           transformer_heads=2, transformer_layers=2, **vision).eval()
    randomise(reference)
    # OpenAI's released archives carry these three entries in their state dicts (the public model.py
    # keeps two of them as plain attributes, which tracing would not save).
    for key, value in [("input_resolution", 64), ("context_length", 20), ("vocab_size", 300)]:
        reference.__dict__.pop(key, None)
        reference.register_buffer(key, torch.tensor(value))
    images, text = torch.randn(2, 3, 64, 64), eot_tokens(4, 20, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(reference, (images, text), check_trace=False).save(str(tmp_path / "tiny.pt"))

    ours, preprocess = load(tmp_path / "tiny.pt")
    assert preprocess.resolution == 64 and ours.config.vision_layers == vision["vision_layers"]
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), reference.encode_image(images)) <= 1e-5
        assert rel_err(ours.encode_text(text), reference.encode_text(text)) <= 1e-5
        assert rel_err(ours(images, text)[0], reference(images, text)[0]) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Released model sizes

# Parameter counts of OpenAI's released models (sum of parameter sizes, as in OpenAI's notebook).
RELEASED_PARAMETERS = {"ViT-B/32": 151_277_313, "ViT-L/14": 427_616_513, "RN50": 102_007_137}


@pytest.mark.parametrize("name", list(OPENAI_CONFIGS))
def test_released_shapes_build_the_released_architecture(name, openai_clip_file):
    # OpenAI's own module, built on the meta device (shapes only), gives the state dict to infer from.
    c = OPENAI_CONFIGS[name]
    with torch.device("meta"):
        reference = openai_clip_file("model.py").CLIP(c.embed_dim, c.image_resolution, c.vision_layers, c.vision_width,
                                               c.vision_patch_size, c.context_length, c.vocab_size,
                                               c.transformer_width, c.transformer_heads, c.transformer_layers)
        state = reference.state_dict()
        cfg = config_from_state_dict(state)
        ours = CLIP(cfg)
    assert cfg == c
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    if name in RELEASED_PARAMETERS:
        assert count == RELEASED_PARAMETERS[name]
