"""The run folder's two figures, drawn with Pillow: samples.png and curves.png.

samples.png (draw_samples) shows the first test images of a run, each with the caption the best
CgT-GAN checkpoint generated for it and one reference caption, like the paper's qualitative
examples (CgT-GAN, arXiv:2308.12045). curves.png (draw_curves) plots metrics.jsonl of the adversarial stage
(Sec. 3.4) by step: the naturalness reward (discriminator logit), the CLIP-cos / CLIP-agg reward,
the discriminator's accuracy and validation CIDEr-D. train.run_train draws both after testing.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------------------------
# samples.png: test images with generated and reference captions


def draw_samples(data, captions: list[str], path: Path, n: int = 8, cell: int = 192) -> None:
    """samples.png: the first n test images, each with its generated caption and one reference."""
    es = data.splits["test"]
    n = min(n, len(es.ids))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    text_h = 64
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(data.image(es.ids[i]).convert("RGB").resize((cell - 8, cell - 8)), (x + 4, y + 4))
        lines = _wrap("gen: " + captions[i], 30) + _wrap("ref: " + es.references[es.ids[i]][0], 30)
        for j, line in enumerate(lines[:5]):
            draw.text((x + 4, y + cell + j * 12), line, fill="black" if j < len(
                _wrap("gen: " + captions[i], 30)) else "gray")
    sheet.save(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


# ----------------------------------------------------------------------------------------------
# curves.png: training curves from metrics.jsonl


def draw_curves(records: list[dict], path: Path) -> None:
    """curves.png: naturalness reward, CLIP reward, discriminator accuracy and val CIDEr-D by step."""
    gan = [r for r in records if r["stage"] == "gan"]
    panels = [("naturalness reward (D logit)", "r_nat"), ("CLIP-cos / CLIP-agg reward", "r_cos", "r_agg"),
              ("discriminator accuracy", "d_acc"), ("validation CIDEr-D", "val_CIDEr-D")]
    w, h, pad = 420, 260, 40
    sheet = Image.new("RGB", (2 * w, 2 * h), "white")
    draw = ImageDraw.Draw(sheet)
    colours = ["#1f77b4", "#d62728"]
    for p, (title, *keys) in enumerate(panels):
        ox, oy = (p % 2) * w, (p // 2) * h
        series = [[(r["step"], r[k]) for r in gan if k in r] for k in keys]
        series = [_smooth(s) if k != "val_CIDEr-D" else s for s, k in zip(series, keys)]
        draw.text((ox + pad, oy + 8), title + ("  (red: CLIP-agg)" if len(keys) > 1 else ""),
                  fill="black")
        box = (ox + pad, oy + 28, ox + w - 16, oy + h - 28)
        draw.rectangle(box, outline="black")
        points = [v for s in series for v in s]
        if not points:
            draw.text((box[0] + 10, box[1] + 10), "no data", fill="gray")
            continue
        x0, x1 = min(v[0] for v in points), max(v[0] for v in points) or 1
        y0, y1 = min(v[1] for v in points), max(v[1] for v in points)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 1, y1 + 1
        to_xy = lambda s, v: (box[0] + (box[2] - box[0]) * (s - x0) / max(1e-9, x1 - x0),
                              box[3] - (box[3] - box[1]) * (v - y0) / (y1 - y0))
        for s, colour in zip(series, colours):
            if len(s) > 1:
                draw.line([to_xy(*v) for v in s], fill=colour, width=2)
            elif s:
                cx, cy = to_xy(*s[0])
                draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
        draw.text((box[0] - 36, box[1]), f"{y1:.3g}", fill="black")
        draw.text((box[0] - 36, box[3] - 10), f"{y0:.3g}", fill="black")
        draw.text((box[0], box[3] + 4), f"step {x0}", fill="black")
        draw.text((box[2] - 60, box[3] + 4), f"step {x1}", fill="black")
    sheet.save(path)


def _smooth(series: list[tuple], window: int = 10) -> list[tuple]:
    """Moving average over the last `window` points (per-step rewards are noisy)."""
    out = []
    for i, (step, _) in enumerate(series):
        chunk = [v for _, v in series[max(0, i - window + 1):i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out
