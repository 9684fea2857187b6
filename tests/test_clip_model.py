"""Shape, loss and file-format tests for clip_model.py on tiny random CLIPs (offline, seconds)."""
import hashlib
import io
import math
import urllib.error
import urllib.request

import pytest
import torch

import clip_model
from clip_model import CLIP, CLIPConfig, build_model, contrastive_loss, load, save

TINY_VIT = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                context_length=16, vocab_size=100, transformer_width=64, transformer_heads=2, transformer_layers=2)
TINY_RESNET = dict(TINY_VIT, vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None, image_resolution=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(n, length=16, vocab=100):
    """Random token rows whose end token (the largest id, vocab - 1) sits at varied positions."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        end = 2 + i % (length - 2)
        out[i, :end] = torch.randint(1, vocab - 2, (end,), generator=g)
        out[i, end] = vocab - 1
    return out


@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_shapes_and_logits(cfg):
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**cfg)).eval()
    images = torch.randn(3, 3, cfg["image_resolution"], cfg["image_resolution"])
    text = tokens(5)
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(images), model.encode_text(text)
        logits_per_image, logits_per_text = model(images, text)
    assert image_emb.shape == (3, 32) and text_emb.shape == (5, 32)
    assert logits_per_image.shape == (3, 5) and torch.equal(logits_per_text, logits_per_image.t())
    cos = torch.nn.functional.cosine_similarity(image_emb[:, None], text_emb[None], dim=-1)
    torch.testing.assert_close(logits_per_image, model.logit_scale.exp() * cos)


def test_text_encoding_ignores_padding_after_end_token():
    # Causal attention: tokens after the end token cannot change its state, so cutting them is exact.
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY_VIT)).eval()
    text = tokens(4)
    noisy = text.clone()
    for i, end in enumerate(text.argmax(-1)):
        noisy[i, end + 1:] = torch.randint(1, 90, (15 - int(end),))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(text), model.encode_text(noisy), rtol=1e-5, atol=1e-6)


def test_contrastive_loss_worked_example_and_learning_signal():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert contrastive_loss(logits).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
    # A few steps on one batch of matched pairs lower the loss.
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY_VIT))
    images, text = torch.randn(4, 3, 32, 32), tokens(4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = contrastive_loss(model(images, text)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_fixed_logit_scale_is_not_trained():
    model = CLIP(CLIPConfig(**TINY_VIT, learn_logit_scale=False, logit_scale_init=math.log(100)))
    assert not model.logit_scale.requires_grad
    assert model.logit_scale.exp().item() == pytest.approx(100)
    contrastive_loss(model(torch.randn(2, 3, 32, 32), tokens(2))[0]).backward()
    assert model.logit_scale.grad is None


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_save_load_round_trip(tmp_path, cfg, suffix):
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**cfg)).eval()
    path = tmp_path / f"tiny{suffix}"
    save(model, path)
    loaded, preprocess = load(path)
    assert loaded.config.transformer_heads == 2 and not loaded.training
    assert preprocess.resolution == cfg["image_resolution"]
    images, text = torch.randn(2, 3, cfg["image_resolution"], cfg["image_resolution"]), tokens(3)
    with torch.no_grad():
        for a, b in zip(model(images, text), loaded(images, text)):
            torch.testing.assert_close(a, b)


def test_resnet_resolution_the_shapes_do_not_imply_survives_save_and_load(tmp_path):
    # A ResNet's attention pool sees resolution // 32 cells: 48 px and 32 px have the same shapes.
    model = CLIP(CLIPConfig(**{**TINY_RESNET, "image_resolution": 48}))
    save(model, tmp_path / "r48.pt")
    loaded, preprocess = load(tmp_path / "r48.pt")
    assert loaded.config.image_resolution == 48 and preprocess.resolution == 48
    state = torch.load(tmp_path / "r48.pt", weights_only=True)
    state["input_resolution"] = torch.tensor(96)  # a 3x3 grid, not this checkpoint's 1x1
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="input_resolution 96"):
        load(tmp_path / "bad.pt")


def test_fp16_checkpoint_loads_as_float32_on_cpu(tmp_path):
    model = CLIP(CLIPConfig(**TINY_VIT))
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pt")
    loaded, _ = load(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_half_precision_runs_close_to_float32():
    # On an accelerator `load` keeps OpenAI's fp16 weights; LayerNorm still computes in float32.
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**TINY_VIT)).eval()
    images, text = torch.randn(2, 3, 32, 32), tokens(3)
    with torch.no_grad():
        full = model(images, text)[0]
        half = model.half()(images, text)[0]
    assert half.dtype == torch.float16
    assert ((half.float() - full).norm() / full.norm()).item() < 1e-2


class ScriptedBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.register_buffer("running", torch.arange(4.0))
        self.mask = torch.full((4, 4), float("-inf")).triu(1)  # a plain attribute, as OpenAI's attn_mask

    def forward(self, x):
        return self.proj(x) * self.scale + self.running + self.mask[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_reader_keeps_only_parameters_and_buffers(tmp_path):
    module = torch.nn.Sequential(ScriptedBlock(), ScriptedBlock())
    torch.jit.script(module).save(str(tmp_path / "scripted.pt"))
    state = clip_model.read_torchscript_state_dict(tmp_path / "scripted.pt")
    assert state.keys() == module.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


# --------------------------------------------------------------------------------------------------
# Bad input: one-line errors that name the file


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_not_a_checkpoint(tmp_path):
    cases = {"notes.pt": b"just some text\n", "random.bin": bytes(range(256)) * 10,
             "archive.zip": None, "list.pt": None, "empty.pt": b""}
    for name, data in cases.items():
        path = tmp_path / name
        if name == "archive.zip":
            import zipfile
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("readme.txt", "hello")
        elif name == "list.pt":
            torch.save([1, 2, 3], path)
        else:
            path.write_bytes(data)
        with pytest.raises(ValueError) as excinfo:
            load(path)
        assert str(path) in one_line(excinfo)
    save(CLIP(CLIPConfig(**TINY_VIT)), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    with pytest.raises(ValueError) as excinfo:
        load(tmp_path / "cut.pt")
    assert "cut.pt: not a CLIP checkpoint" in one_line(excinfo)
    with pytest.raises(FileNotFoundError, match="nope.pt: no such checkpoint file"):
        load(tmp_path / "nope.pt")


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    state = CLIP(CLIPConfig(**TINY_VIT)).state_dict()
    del state["ln_final.bias"], state["visual.proj"]
    state["visual.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError) as excinfo:
        load(tmp_path / "odd.pt")
    message = one_line(excinfo)
    assert "odd.pt: not a CLIP state dict: no 'visual.proj' (ViT) or 'visual.attnpool.positional_embedding'" in message

    state = CLIP(CLIPConfig(**TINY_VIT)).state_dict()
    del state["ln_final.bias"], state["visual.transformer.resblocks.0.mlp.c_fc.bias"]
    state["visual.extra.weight"] = torch.zeros(3)
    state["visual.ln_post.weight"] = torch.zeros(7)
    with pytest.raises(ValueError) as excinfo:
        build_model(state)
    assert one_line(excinfo) == ("state dict does not fit CLIP: missing keys [ln_final.bias, "
                                 "visual.transformer.resblocks.0.mlp.c_fc.bias]; unexpected keys [visual.extra.weight]")
    state = CLIP(CLIPConfig(**TINY_VIT)).state_dict()
    state["visual.ln_post.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"wrong shapes \[visual.ln_post.weight \(7,\) vs \(64,\)\]"):
        build_model(state)


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_released_name_download_checksum_and_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("CGTGAN_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    save(CLIP(CLIPConfig(**TINY_VIT)), tmp_path / "tiny.pt")
    data = (tmp_path / "tiny.pt").read_bytes()
    url = f"https://example.invalid/{hashlib.sha256(data).hexdigest()}/tiny.pt"
    monkeypatch.setitem(clip_model.MODEL_URLS, "tiny", url)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(data[:-10]))
    with pytest.raises(RuntimeError) as excinfo:
        load("tiny", cache_dir=tmp_path / "cache")
    assert "failed its SHA-256 check" in one_line(excinfo) and str(tmp_path / "cache" / "tiny.pt") in str(excinfo.value)
    assert list((tmp_path / "cache").iterdir()) == []

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(data))
    model, _ = load("tiny", cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "tiny.pt").read_bytes() == data and not model.training

    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    # Cached now: no network needed. A fresh cache directory offline names the expected path.
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    load("tiny", cache_dir=tmp_path / "cache")
    monkeypatch.setenv("CGTGAN_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as excinfo:
        load("tiny")
    assert f"put a copy at {tmp_path / 'elsewhere' / 'tiny.pt'}" in one_line(excinfo)
