"""figures.py: samples.png marks the checker's false words; curves.png has ticks, labels and legends."""
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

import figures
from data import CaptionData, EvalSplit

RED = (0xd6, 0x27, 0x28)  # figures.FALSE


def _data(checker=None, n_test=12):
    feats = torch.nn.functional.normalize(torch.randn(n_test, 4, generator=torch.Generator().manual_seed(0)))
    ids = [f"t{i}" for i in range(n_test)]
    return CaptionData(
        name="tiny", clip_path=Path("clip.pt"), clip_bpe_path=None, gpt2_path=Path("g"),
        roberta_path=Path("r"), train_ids=ids, train_feats=feats, corpus=["a red circle"],
        corpus_feats=feats[:1], splits={s: EvalSplit(ids, feats, {i: ["a red circle"] for i in ids})
                                        for s in ("val", "test")},
        image_loader=lambda i: Image.new("RGB", (8, 8), "white"), checker=checker).validate()


def _red_pixels(path) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return int((np.abs(pixels.astype(int) - RED).sum(1) < 30).sum())


def test_caption_words_colour_false_words_and_unparseable_captions():
    assert figures.caption_words("a red circle", [False, True, False], True) == [
        ("a", figures.BLACK), ("red", figures.FALSE), ("circle", figures.BLACK)]
    assert figures.caption_words("circle circle", None, True) == [
        ("circle", figures.UNPARSEABLE), ("circle", figures.UNPARSEABLE),
        ("(unparseable)", figures.UNPARSEABLE)]
    assert figures.caption_words("a red circle", None, False) == [
        ("a", figures.BLACK), ("red", figures.BLACK), ("circle", figures.BLACK)]


def test_samples_draw_8_images_and_the_checkers_false_words_in_red(tmp_path):
    def checker(captions, split):
        return {"fluency": 1.0, "faithfulness": 0.5,
                "per_image": {i: [False, True, False] for i in captions}}

    figures.draw_samples(_data(checker), ["a red circle"] * 12, tmp_path / "marked.png")
    figures.draw_samples(_data(), ["a red circle"] * 12, tmp_path / "plain.png")
    sheet = Image.open(tmp_path / "marked.png")
    assert sheet.width == 4 * 240 and sheet.height > 2 * 240  # 8 images, 4 a row
    assert _red_pixels(tmp_path / "marked.png") > 8 * 20  # "red" in red under each image
    assert _red_pixels(tmp_path / "plain.png") == 0  # no checker: nothing marked


def test_figures_draw_without_any_truetype_font(tmp_path, monkeypatch):
    # Pillow's bitmap font (what load_default gives on Pillow < 10.1 or without FreeType).
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()

    def old_pillow(size=None):  # Pillow < 10.1 takes no size
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap

    def no_fonts(*args, **kwargs):
        raise OSError("cannot open resource")

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    monkeypatch.setattr(ImageFont, "truetype", no_fonts)
    assert figures.load_font(17) is not None
    figures.draw_samples(_data(), ["a red circle"] * 3, tmp_path / "s.png")
    figures.draw_curves([], tmp_path / "c.png")
    assert Image.open(tmp_path / "s.png").width == 3 * 240


def test_nice_ticks_and_the_best_step():
    assert figures.nice_ticks(0, 300) == [0, 100, 200, 300]
    assert figures.nice_ticks(169, 225) == [160, 180, 200, 220, 240]
    assert figures.nice_ticks(0.43, 0.91) == pytest.approx([0.4, 0.6, 0.8, 1.0])
    assert figures.nice_ticks(5, 5)[0] <= 5 <= figures.nice_ticks(5, 5)[-1]
    gan = [{"stage": "gan", "step": s, "val_CIDEr-D": v} for s, v in ((0, 1.0), (100, 3.0),
                                                                      (200, 3.0), (300, 2.0))]
    assert figures.best_step(gan) == 100  # the first of equal scores, as train._validate keeps
    assert figures.best_step([]) is None


def test_curves_plot_steps_and_validation(tmp_path):
    records = [{"stage": "init", "step": 1, "loss": 3.0}]
    records += [{"stage": "gan", "step": s, "r_nat": 0.1 * s, "r_cos": 80.0, "r_agg": 95.0,
                 "d_acc": 0.5, "lambda": min(0.5, s / 100)} for s in range(1, 31)]
    records += [{"stage": "gan", "step": s, "val_CIDEr-D": 100.0 + s, "val_fluency": 90.0,
                 "val_faithfulness": 40.0} for s in (0, 10, 20, 30)]
    figures.draw_curves(records, tmp_path / "c.png")
    assert _red_pixels(tmp_path / "c.png") > 100  # CLIP-agg and faithfulness in red


def test_gap_numbers_are_the_mean_pair_cosine_and_the_centre_distance():
    e1, e2 = torch.eye(4)[0].repeat(5, 1), torch.eye(4)[1].repeat(5, 1)  # (5, 4) each
    assert figures.gap_numbers(3 * e1, e2) == pytest.approx({"cos": 0.0, "gap": 2 ** 0.5})
    assert figures.gap_numbers(e1, 2 * e1) == pytest.approx({"cos": 1.0, "gap": 0.0})
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # cosines 0.707 and -1; centres (0.5, 0.5), (0.354, -0.146)
    got = figures.gap_numbers(image, text)
    assert got["cos"] == pytest.approx((2 ** -0.5 - 1) / 2)
    assert got["gap"] == pytest.approx(math.hypot(0.5 - 0.5 * 2 ** -0.5, 0.5 - (0.5 * 2 ** -0.5 - 0.5)))


def test_pca_2d_finds_the_widest_directions_with_a_fixed_sign():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * torch.tensor([10.0, 0.1, 3.0])  # widest: axis 0, then 2
    xy = figures.pca_2d(x)
    assert xy.shape == (200, 2)
    assert torch.corrcoef(torch.stack([xy[:, 0], x[:, 0]]))[0, 1] > 0.99  # same sign, same axis
    assert torch.corrcoef(torch.stack([xy[:, 1], x[:, 2]]))[0, 1] > 0.99
    assert torch.equal(figures.pca_2d(x), xy)


def test_gap_plane_puts_the_gap_on_the_first_axis():
    # Images at +3 e_0 and texts at -3 e_0, both spread along e_2 (and less along e_1): the gap is
    # the first coordinate (images right, texts left), the spread the second.
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(100, 1, generator=g) * torch.tensor([0.0, 0.3, 2.0, 0.0])  # (100, 4)
    image = spread + torch.tensor([3.0, 0, 0, 0])
    text = spread.flip(0) - torch.tensor([3.0, 0, 0, 0])
    xy = figures.gap_plane(torch.cat([image, text]), image, text)
    assert (xy[:100, 0] > 2.9).all() and (xy[100:, 0] < -2.9).all()
    assert torch.corrcoef(torch.stack([xy[:100, 1].abs(), spread[:, 2].abs()]))[0, 1] > 0.99


def test_modality_gap_figure_draws_each_set_and_returns_its_numbers(tmp_path):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(20, 6, generator=g) + 3
    texts = {"references": torch.randn(20, 6, generator=g), "generated": image + 0.1}
    numbers = figures.draw_modality_gap(image, texts, tmp_path / "gap.png")
    assert numbers["references"] == figures.gap_numbers(image, texts["references"])
    assert numbers["generated"]["cos"] > 0.99 and numbers["references"]["gap"] > 0.5
    pixels = np.asarray(Image.open(tmp_path / "gap.png").convert("RGB")).reshape(-1, 3)
    for colour in figures.GAP_COLOURS[:3]:  # one colour per set, each drawn
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(1) < 30).sum() > 20 * 10
