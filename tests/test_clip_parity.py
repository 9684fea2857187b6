"""Parity of clip_model.CLIP with its peers on the same random weights.

- transformers' CLIPModel (quick_gelu, OpenAI's layout), weights mapped into our key names
  (clip_convert.hf_to_openai), and a saved CLIPModel folder read by `load`;
- OpenAI's reference model.py (from the clip-anytorch package, loaded by path: it imports only torch
  and numpy), traced and saved as a TorchScript archive like OpenAI's releases, then read by `load`;
- the released models' parameter counts, from state dicts with OpenAI's key names (meta tensors).
"""
import warnings

import pytest
import torch

from clip_convert import hf_to_openai
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


def tiny_hf_clip(heads=2, act="quick_gelu"):
    """A random-weight transformers CLIPModel with OpenAI's activation, in eval mode."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=300, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=20, hidden_act=act,
                         bos_token_id=298, eos_token_id=299, pad_token_id=0),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=heads, image_size=48, patch_size=16, hidden_act=act),
        projection_dim=64)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    randomise(hf)
    return hf


def test_matches_transformers_clipmodel():
    hf = tiny_hf_clip()
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


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_load_reads_a_hugging_face_clip_folder(tmp_path, safe):
    """A folder as `hf download openai/clip-vit-large-patch14` writes it (config.json + weights)
    loads through clip_convert into OpenAI's layout; head counts come from config.json (4 heads
    of 32 channels, which the one-head-per-64-channels rule would not infer)."""
    hf = tiny_hf_clip(heads=4)
    hf.save_pretrained(tmp_path / "clip", safe_serialization=safe)
    ours, preprocess = load(str(tmp_path / "clip"))
    assert ours.config.transformer_heads == 4 and ours.config.vision_heads == 4
    assert preprocess.resolution == 48 and not ours.training
    images, text = torch.randn(2, 3, 48, 48), eot_tokens(3, 20, 300)
    with torch.no_grad():
        hf_out = hf(input_ids=text, pixel_values=images)
        ours_logits, _ = ours(images, text)
    assert rel_err(ours_logits, hf_out.logits_per_image) <= 1e-5


def test_load_refuses_a_folder_without_weights_or_openai_activation(tmp_path):
    hf = tiny_hf_clip()
    hf.config.save_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"holds no weights \(model.safetensors or pytorch_model.bin\)"):
        load(str(tmp_path / "empty"))
    tiny_hf_clip(act="gelu").save_pretrained(tmp_path / "gelu")
    with pytest.raises(ValueError, match="not OpenAI's CLIP in transformers' layout"):
        load(str(tmp_path / "gelu"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or Hugging Face CLIP folder"):
        load(str(tmp_path / "nothing"))


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
