"""The run folder's two figures, drawn with Pillow: samples.png and curves.png.

samples.png (draw_samples) shows the first test images of a run, each with the caption the best
CgT-GAN checkpoint generated for it and one reference caption, like the paper's qualitative
examples (CgT-GAN, arXiv:2308.12045). On ShapesWorld the checker's verdict is drawn into the
caption: the words that state a false fact in red, a caption the grammar cannot parse in orange.
curves.png (draw_curves) plots metrics.jsonl of the adversarial stage (Sec. 3.4) by step: the
naturalness reward (discriminator logit), the CLIP-cos and CLIP-agg rewards, the discriminator's
accuracy, lambda, and the validation scores. commands.run_train draws both after testing.
draw_modality_gap puts CLIP image and text embeddings of the same scenes in one 2-D picture, with
their mean cosine and the distance between their centres (docs/make_modality_gap.py draws
docs/modality_gap.png from a trained run).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Text colours: a caption's words, the checker's verdicts, references and axes.
BLACK, FALSE, UNPARSEABLE, GREY = "#111111", "#d62728", "#e07000", "#707070"


# ----------------------------------------------------------------------------------------------
# Fonts and coloured, wrapped text


def load_font(size: int):
    """A TrueType font `size` pixels high: Pillow's own (Pillow >= 10.1), else DejaVu Sans, else
    Pillow's small bitmap font, so a figure is drawn whatever fonts the machine has."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 takes no size; no FreeType
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def _line_height(font) -> int:
    """Pixels from one line of text to the next (Pillow's bitmap font, which has no size, is 11 px)."""
    return int(getattr(font, "size", 11) * 1.3) + 2


def text_at(draw, xy: tuple[float, float], text: str, font, anchor: str, fill: str = BLACK) -> None:
    """Text placed by an anchor as Pillow's ("ma": middle-top, "rm": right-middle, "mm"), computed
    here because Pillow's bitmap font ignores `anchor`."""
    w, h = draw.textlength(text, font=font), getattr(font, "size", 11)
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y = xy[1] - {"a": 0, "m": h * 0.6}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=font)


def wrap_words(draw, words: list[tuple[str, str]], font, width: int) -> list[list[tuple[str, str]]]:
    """(word, colour) pairs broken into lines no wider than `width` pixels."""
    lines, line, used = [], [], 0.0
    space = draw.textlength(" ", font=font)
    for word, colour in words:
        w = draw.textlength(word, font=font)
        if line and used + space + w > width:
            lines.append(line)
            line, used = [], 0.0
        used += (space if line else 0) + w
        line.append((word, colour))
    return lines + [line] if line else lines


def draw_lines(draw, xy: tuple[int, int], lines: list[list[tuple[str, str]]], font) -> int:
    """Draw wrapped coloured lines from xy; returns the y below the last one."""
    x0, y = xy
    space = draw.textlength(" ", font=font)
    for line in lines:
        x = x0
        for word, colour in line:
            draw.text((x, y), word, fill=colour, font=font)
            x += draw.textlength(word, font=font) + space
        y += _line_height(font)
    return y


# ----------------------------------------------------------------------------------------------
# samples.png: test images with generated and reference captions


def caption_words(caption: str, false: list[bool] | None, checked: bool) -> list[tuple[str, str]]:
    """A generated caption's words with their colours: red where the checker found the word false
    (`false`, one flag per word), all orange and tagged when it could not parse the caption
    (`false` None), all black when the dataset has no checker (`checked` False)."""
    words = caption.split() or ["(empty)"]
    if not checked:
        return [(w, BLACK) for w in words]
    if false is None:
        return [(w, UNPARSEABLE) for w in words] + [("(unparseable)", UNPARSEABLE)]
    false = false + [False] * (len(words) - len(false))
    return [(w, FALSE if bad else BLACK) for w, bad in zip(words, false)]


def _legend(checked: bool, n: int) -> list[tuple[str, str]]:
    """samples.png's heading, in the colours it explains."""
    def say(text: str, colour: str = BLACK) -> list[tuple[str, str]]:
        return [(word, colour) for word in text.split()]

    text = say(f"The first {n} test images. Under each: the generated caption")
    if checked:
        text += (say("(words ShapesWorld's checker finds") + say("false", FALSE) + say("in")
                 + say("red;", FALSE) + say("a caption it cannot parse in")
                 + say("orange),", UNPARSEABLE))
    return text + say("then one") + say("reference", GREY) + say("in") + say("grey.", GREY)


def draw_samples(data, captions: list[str], path: Path, n: int = 8, cell: int = 240) -> None:
    """samples.png: the first n test images (4 a row), each with its generated caption, marked
    with the checker's verdict where the dataset has one, and its first reference."""
    es = data.splits["test"]
    n = min(n, len(es.ids), len(captions))
    ids, cols = es.ids[:n], max(1, min(4, n))
    verdicts = (data.check(dict(zip(ids, captions)), "test") or {}).get("per_image")
    font, small = load_font(17), load_font(15)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    gen = [wrap_words(draw, caption_words(captions[i], (verdicts or {}).get(ids[i]), bool(verdicts)),
                      font, cell - 16) for i in range(n)]
    ref = [wrap_words(draw, [(w, GREY) for w in ("ref: " + es.references[i][0]).split()],
                      small, cell - 16) for i in ids]
    legend = wrap_words(draw, _legend(bool(verdicts), n), font, cols * cell - 20)
    text_h = max((len(g) * _line_height(font) + len(r) * _line_height(small)
                  for g, r in zip(gen, ref)), default=0) + 14
    top = len(legend) * _line_height(font) + 16
    sheet = Image.new("RGB", (cols * cell, top + math.ceil(n / cols) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw_lines(draw, (10, 8), legend, font)
    for i in range(n):
        x, y = (i % cols) * cell, top + (i // cols) * (cell + text_h)
        image = data.image(ids[i]).convert("RGB").resize((cell - 16, cell - 16), Image.LANCZOS)
        sheet.paste(image, (x + 8, y + 8))
        y = draw_lines(draw, (x + 8, y + cell), gen[i], font)
        draw_lines(draw, (x + 8, y + 2), ref[i], small)
    sheet.save(path)


# ----------------------------------------------------------------------------------------------
# curves.png: training curves from metrics.jsonl

# The panels of curves.png: title, y-axis label, and the metrics.jsonl keys drawn with their
# legend names. Per-step keys are drawn as they are (light) and as a moving average (dark), but
# lambda, a schedule, as it is; "val_" keys are the validation points, every gan.eval_every steps.
PANELS = [
    ("Naturalness reward", "D logit", {"r_nat": "r_nat"}),
    ("CLIP rewards", "100 x cosine", {"r_cos": "CLIP-cos", "r_agg": "CLIP-agg"}),
    ("Discriminator accuracy", "accuracy", {"d_acc": "real vs generated"}),
    ("lambda: weight of the CLIP reward", "lambda", {"lambda": "lambda"}),
    ("Validation CIDEr-D", "CIDEr-D x100", {"val_CIDEr-D": "CIDEr-D"}),
    ("Validation checker scores", "%", {"val_fluency": "fluency", "val_faithfulness": "faithfulness"}),
]
COLOURS = ["#1f77b4", "#d62728"]
LIGHT = ["#b9d3ea", "#f2b8b8"]  # the same hues, for the unsmoothed per-step values
SMOOTH = 15  # steps in the moving average


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], about n of them: nice_ticks(0, 300) -> [0, 100, 200, 300]."""
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _tick_label(value: float, step: float) -> str:
    return f"{value:.0f}" if step >= 1 else f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def smooth(series: list[tuple], window: int = SMOOTH) -> list[tuple]:
    """Moving average over the last `window` points (per-step rewards are noisy)."""
    out = []
    for i, (step, _) in enumerate(series):
        chunk = [v for _, v in series[max(0, i - window + 1):i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out


def _axes(sheet, box, xs: list[float], ys: list[float], fonts, labels: tuple[str, str]):
    """Frame, ticks, tick labels and axis labels of one panel; returns the data -> pixel mapping."""
    draw, (font, small) = ImageDraw.Draw(sheet), fonts
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    (x0, x1), (y0, y1) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    left, top, right, bottom = box

    def to_px(x, y):
        return (left + (right - left) * (x - x0) / (x1 - x0 or 1),
                bottom - (bottom - top) * (y - y0) / (y1 - y0 or 1))

    for x in x_ticks:
        px = to_px(x, y0)[0]
        draw.line([(px, bottom), (px, bottom + 5)], fill=BLACK)
        text_at(draw, (px, bottom + 7), _tick_label(x, x_ticks[1] - x_ticks[0]), small, "ma")
    for y in y_ticks:
        py = to_px(x0, y)[1]
        draw.line([(left - 5, py), (right, py)], fill="#e6e6e6")
        draw.line([(left - 5, py), (left, py)], fill=BLACK)
        text_at(draw, (left - 8, py), _tick_label(y, y_ticks[1] - y_ticks[0]), small, "rm")
    draw.rectangle(box, outline=BLACK)
    text_at(draw, ((left + right) / 2, bottom + 28), labels[0], font, "ma")
    _vertical_text(sheet, (left - 66, (top + bottom) / 2), labels[1], font)
    return to_px


def _vertical_text(sheet, centre: tuple[float, float], text: str, font) -> None:
    """Text rotated 90 degrees counter-clockwise, centred on `centre` (a y-axis label)."""
    label = Image.new("RGB", (int(ImageDraw.Draw(sheet).textlength(text, font=font)) + 4,
                              _line_height(font)), "white")
    ImageDraw.Draw(label).text((2, 0), text, fill=BLACK, font=font)
    label = label.rotate(90, expand=True)  # (h, w)
    sheet.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


def _panel(sheet, box, panel: tuple, gan: list[dict], best_step: int | None, fonts) -> None:
    """One panel of curves.png: its series from the CgT-GAN records, axes and legend."""
    (title, ylabel, keys), draw, (font, small) = panel, ImageDraw.Draw(sheet), fonts
    draw.text((box[0], box[1] - 30), title, fill=BLACK, font=font)
    series = [[(r["step"], r[k]) for r in gan if k in r] for k in keys]
    points = [p for s in series for p in s]
    if not points:
        draw.rectangle(box, outline=GREY)
        text_at(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "no data", small, "mm", GREY)
        return
    validation = all(k.startswith("val_") for k in keys)
    to_px = _axes(sheet, box, [x for x, _ in points], [y for _, y in points], fonts,
                  ("CgT-GAN step", ylabel))
    for c, s in enumerate(series):
        if not validation and "lambda" not in keys and len(s) > 1:
            draw.line([to_px(*p) for p in s], fill=LIGHT[c], width=1)
            s = smooth(s)
        if len(s) > 1:
            draw.line([to_px(*p) for p in s], fill=COLOURS[c], width=3 if not validation else 2)
        for x, y in s if validation or len(s) == 1 else []:
            px, py = to_px(x, y)
            draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=COLOURS[c])
    if validation and best_step is not None:
        _best_line(draw, to_px, box, best_step, small)
    draw.rectangle(box, outline=BLACK)
    _legend_row(draw, (box[2], box[1] - 28), list(keys.values()), small)


def _legend_row(draw, right_top: tuple[int, int], names: list[str], font) -> None:
    """A panel's legend, right-aligned above its frame: a colour swatch before each name."""
    x = right_top[0] - sum(36 + draw.textlength(name, font=font) + 14 for name in names)
    for c, name in enumerate(names):
        draw.line([(x, right_top[1] + 10), (x + 28, right_top[1] + 10)], fill=COLOURS[c], width=3)
        draw.text((x + 36, right_top[1]), name, fill=BLACK, font=font)
        x += 36 + draw.textlength(name, font=font) + 14


def _best_line(draw, to_px, box, step: int, font) -> None:
    """A dashed vertical line at the step best.pt holds."""
    x = to_px(step, 0)[0]
    for y in range(box[1] + 2, box[3], 12):
        draw.line([(x, y), (x, min(y + 6, box[3]))], fill=GREY, width=2)
    draw.text((x + 4, box[3] - 24), "best.pt", fill=GREY, font=font)


def best_step(gan: list[dict]) -> int | None:
    """The step best.pt holds: the first with the highest validation CIDEr-D (train._validate
    replaces best.pt only on a strictly higher score)."""
    vals = [(r["val_CIDEr-D"], -r["step"]) for r in gan if "val_CIDEr-D" in r]
    return -max(vals)[1] if vals else None


def draw_curves(records: list[dict], path: Path) -> None:
    """curves.png: the CgT-GAN stage's rewards, discriminator accuracy, lambda and validation
    scores by step, from metrics.jsonl's records (PANELS)."""
    gan = [r for r in records if r.get("stage") == "gan"]
    fonts, (w, h) = (load_font(17), load_font(15)), (620, 330)
    val_steps = [r["step"] for r in gan if "val_CIDEr-D" in r]
    header = (f"CgT-GAN stage. Light lines: each step's batch mean; dark lines: their moving "
              f"average over {SMOOTH} steps. Dots: validation at steps "
              f"{', '.join(map(str, val_steps)) or '(none)'}; dashed: the step kept as best.pt.")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap_words(draw, [(word, BLACK) for word in header.split()], fonts[0], 2 * w - 20)
    top = len(lines) * _line_height(fonts[0]) + 20
    sheet = Image.new("RGB", (2 * w, top + 3 * h), "white")
    draw_lines(ImageDraw.Draw(sheet), (10, 8), lines, fonts[0])
    for p, panel in enumerate(PANELS):
        ox, oy = (p % 2) * w, top + (p // 2) * h
        _panel(sheet, (ox + 100, oy + 36, ox + w - 24, oy + h - 62), panel, gan, best_step(gan), fonts)
    sheet.save(path)


# ----------------------------------------------------------------------------------------------
# The modality gap: CLIP image and text embeddings of the same scenes, in 2-D

GAP_COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd"]


def gap_numbers(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """Image embeddings (N, D) against the text embeddings of the same N scenes (N, D), both
    L2-normalised: "cos", the mean cosine of each scene's pair, and "gap", the distance between
    the two clouds' centres (the modality gap of Liang et al., 2022).
    Example: every image e_1 and every text e_2: cos 0, gap sqrt(2) = 1.414."""
    v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)  # (N, D) each
    return {"cos": (v * t).sum(-1).mean().item(), "gap": (v.mean(0) - t.mean(0)).norm().item()}


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Rows (N, D) projected on their two principal directions -> (N, 2), by an SVD of the
    centred rows; each direction's sign is fixed (its largest loading positive), so the picture
    does not flip between runs."""
    centred = x.double() - x.double().mean(0)  # (N, D)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)  # vt (min(N, D), D)
    axes = vt[:2] * vt[:2].gather(1, vt[:2].abs().argmax(1, keepdim=True)).sign()  # (2, D)
    return (centred @ axes.T).float()  # (N, 2)


def gap_plane(x: torch.Tensor, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Rows x (N, D) -> (N, 2) in a plane that shows the modality gap: the first coordinate along
    the gap (the unit vector from the text cloud's centre to the image cloud's, from image and
    text (n, D)), the second along the principal direction of what is left once that direction is
    taken out. A PCA of the rows alone would show what the scenes hold (the gap is seldom among
    its first two directions). Example: images at +g/2 and texts at -g/2 along e_1, both spread
    along e_2 -> the clouds sit apart on the first coordinate, spread on the second."""
    x = x.double()
    direction = F.normalize((image.double().mean(0) - text.double().mean(0)), dim=0)  # (D,)
    centred = x - x.mean(0)  # (N, D)
    along = centred @ direction  # (N,)
    rest = pca_2d(centred - along[:, None] * direction)[:, 0].double()  # (N,)
    return torch.stack([along, rest], dim=1).float()  # (N, 2)


def draw_modality_gap(image: torch.Tensor, texts: dict[str, torch.Tensor], path: Path,
                      title: str = "CLIP embeddings of the same test scenes") -> dict:
    """modality_gap.png: image embeddings (N, D) and each set of text embeddings of the same N
    scenes ({label: (N, D)}, e.g. reference captions, then generated ones) projected together on
    gap_plane (across: the gap between the images and the first set of texts), one colour per
    set, each set's gap_numbers in its legend line.
    Returns {label: gap_numbers}."""
    numbers = {label: gap_numbers(image, t) for label, t in texts.items()}
    sets = [F.normalize(image.float(), dim=-1)] + [F.normalize(t.float(), dim=-1) for t in texts.values()]
    points = gap_plane(torch.cat(sets), sets[0], sets[1]).split([len(x) for x in sets])  # (N, 2) each
    font, small = load_font(17), load_font(15)
    sheet = Image.new("RGB", (760, 720), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((20, 12), title, fill=BLACK, font=font)
    legend = [f"images (N = {len(image)})"] + [
        f"{label}: mean cos(image, text) {n['cos']:.3f}, gap |mean image - mean text| {n['gap']:.3f}"
        for label, n in numbers.items()]
    for i, line in enumerate(legend):
        y = 44 + i * 24
        draw.ellipse((24, y + 4, 36, y + 16), fill=GAP_COLOURS[i % len(GAP_COLOURS)])
        draw.text((44, y), line, fill=BLACK, font=small)
    flat = torch.cat(points)
    to_px = _axes(sheet, (100, 70 + 24 * len(legend), 730, 640), flat[:, 0].tolist(),
                  flat[:, 1].tolist(), (font, small),
                  (f"along the gap: mean image - mean {next(iter(texts))}",
                   "principal direction of the rest"))
    for i, xy in enumerate(points):
        for x, y in xy.tolist():
            px, py = to_px(x, y)
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=GAP_COLOURS[i % len(GAP_COLOURS)])
    sheet.save(path)
    return numbers
