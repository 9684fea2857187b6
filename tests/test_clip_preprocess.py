"""clip_model.Preprocess against transformers' CLIPImageProcessor (its PIL backend, which runs
without torchvision) and a float64 reference of OpenAI's torchvision recipe, plus image-file errors."""
import numpy as np
import pytest
from PIL import Image

from clip_model import MEAN, STD, Preprocess, load_image

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


# (width, height, mode): landscape, portrait, square, smaller than R, extreme aspect ratios.
CASES = [(320, 240, "RGB"), (240, 320, "RGB"), (224, 224, "RGB"), (97, 61, "RGB"), (1000, 150, "RGB"),
         (150, 1000, "L"), (640, 481, "L"), (333, 500, "RGBA"), (500, 333, "P"), (64, 64, "RGBA"),
         (257, 256, "RGB"), (300, 301, "LA"), (227, 451, "RGB"), (451, 227, "P")]


def random_image(width, height, mode, seed):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise, so resampling differences would show.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image = image.convert(mode[:-1])
        image.putalpha(alpha)
        return image
    if mode == "P":
        return image.quantize(64)
    return image.convert(mode)


def openai_reference(image, R):
    """OpenAI's recipe in float64: RGB (alpha over white), PIL bicubic resize of the shorter side,
    torchvision's centre crop (rounded offsets), scale to [0, 1], normalise."""
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(R * long / short)
    image = image.resize((R, new_long) if w <= h else (new_long, R), Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - R) / 2.0)), int(round((w - R) / 2.0))
    x = np.asarray(image, dtype=np.float64)[top: top + R, left: left + R] / 255.0
    return ((x - MEAN.astype(np.float64)) / STD.astype(np.float64)).transpose(2, 0, 1)


# Before transformers 5 the processor dropped alpha instead of compositing it onto white, and its
# PIL backend had no name of its own; the CI check on the oldest transformers skips this test.
@pytest.mark.skipif(not hasattr(transformers, "CLIPImageProcessorPil"), reason="needs transformers>=5")
@pytest.mark.parametrize("R", [224, 64])
def test_matches_openai_recipe_and_transformers(R):
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": R}, crop_size={"height": R, "width": R})
    images = [random_image(w, h, mode, seed) for seed, (w, h, mode) in enumerate(CASES)]
    ours = Preprocess(R)(images).numpy()
    assert ours.shape == (len(CASES), 3, R, R) and ours.dtype == np.float32
    hf = processor(images=images, return_tensors="np")["pixel_values"]
    compared = 0
    for i, (image, (w, h, mode)) in enumerate(zip(images, CASES)):
        assert np.abs(ours[i] - openai_reference(image, R)).max() <= 1e-5, (w, h, mode)
        # CLIPImageProcessor floors the crop offset where torchvision rounds it half to even: they
        # differ by one pixel when the overhang is 3 mod 4. Compare everywhere else.
        overhang = int(R * max(w, h) / min(w, h)) - R
        if overhang % 4 != 3:
            assert np.abs(ours[i] - hf[i]).max() <= 1e-4, (w, h, mode)
            compared += 1
    assert compared >= len(CASES) - 3


def test_single_image_gives_a_batch_of_one():
    assert Preprocess(32)(random_image(50, 40, "RGB", 0)).shape == (1, 3, 32, 32)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg: no such image file"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.jpg: empty image file \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: unreadable image"):
        load_image(tmp_path / "notes.png")
    random_image(40, 30, "RGB", 0).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png: unreadable image"):
        load_image(tmp_path / "cut.png")
    palette = random_image(40, 30, "P", 0)
    palette.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
