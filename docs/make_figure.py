"""Draws docs/method.png: CgT-GAN's method as this project implements it, with Pillow only.

    python docs/make_figure.py [OUT.png]

Stage 2 (the main picture): an image's frozen CLIP embedding goes through the MappingNetwork into
GPT-2, which samples K captions and a greedy one; a RoBERTa discriminator scores them against
corpus sentences (naturalness reward), CLIP's text encoder scores them against the image (CLIP-cos)
or against the image's aggregate of the corpus (CLIP-agg); self-critical policy gradient mixes the
rewards with lambda. Stage 1 (inset): text-only initialisation from the corpus. Boxes name the
function or class that implements each step (cgtgan.py unless a file is given).
Needs Pillow >= 10.1 (sized default font).
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "method.png"
W, H = 1520, 850

# Fills: frozen CLIP parts, trained generator, trained discriminator, data, rewards, losses.
FROZEN, TRAINED, DISC, DATA, REWARD, LOSS = ("#dbe9f6", "#ffe3c2", "#f8d3d3", "#e3f1dc",
                                             "#fff6bf", "#ece0f5")
INK, GRAD, REAL, INIT = "#222222", "#c0392b", "#2e7d32", "#1f5fa8"


def font(size: int):
    return ImageFont.load_default(size=size)


class Figure:
    def __init__(self):
        self.image = Image.new("RGB", (W, H), "white")
        self.draw = ImageDraw.Draw(self.image)

    def text(self, xy, text, size=14, fill=INK, anchor="la"):
        self.draw.text(xy, text, font=font(size), fill=fill, anchor=anchor)

    def box(self, x0, y0, x1, y1, title, lines=(), fill=TRAINED, title_size=17, size=14):
        """A rounded box with a bold-ish title line and centred detail lines."""
        self.draw.rounded_rectangle((x0, y0, x1, y1), radius=10, fill=fill, outline=INK, width=2)
        rows = [(title, title_size)] + [(line, size) for line in lines]
        height = sum(s + 6 for _, s in rows) - 6
        y = (y0 + y1) / 2 - height / 2
        for text, s in rows:
            self.text(((x0 + x1) / 2, y), text, size=s, anchor="ma")
            if s == title_size:  # a second pass 1 px to the right reads as bold
                self.text(((x0 + x1) / 2 + 1, y), text, size=s, anchor="ma")
            y += s + 6

    def arrow(self, points, colour=INK, dashed=False, width=2, label=None, at=None, size=13,
              anchor="la"):
        """A polyline ending in an arrowhead at its last point; an optional label at `at`."""
        for (xa, ya), (xb, yb) in zip(points, points[1:]):
            if dashed:
                length = max(abs(xb - xa), abs(yb - ya))
                for s in range(0, int(length), 14):
                    e = min(s + 8, length)
                    self.draw.line((xa + (xb - xa) * s / length, ya + (yb - ya) * s / length,
                                    xa + (xb - xa) * e / length, ya + (yb - ya) * e / length),
                                   fill=colour, width=width)
            else:
                self.draw.line((xa, ya, xb, yb), fill=colour, width=width)
        (xa, ya), (xb, yb) = points[-2], points[-1]
        dx, dy = (xb > xa) - (xb < xa), (yb > ya) - (yb < ya)  # axis-aligned segments only
        px, py = -dy, dx
        self.draw.polygon([(xb, yb), (xb - 12 * dx + 6 * px, yb - 12 * dy + 6 * py),
                           (xb - 12 * dx - 6 * px, yb - 12 * dy - 6 * py)], fill=colour)
        if label:
            self.text(at, label, size=size, fill=colour, anchor=anchor)

    def scene(self, x0, y0, size):
        """A ShapesWorld-like picture: a red circle above a blue square."""
        self.draw.rectangle((x0, y0, x0 + size, y0 + size), fill="white", outline=INK, width=2)
        c = size // 3
        self.draw.ellipse((x0 + c, y0 + 6, x0 + 2 * c, y0 + c + 6), fill="#d62728")
        self.draw.rectangle((x0 + c, y0 + 2 * c - 4, x0 + 2 * c, y0 + 3 * c - 10), fill="#1f77b4")


def draw(path: Path) -> None:
    f = Figure()
    f.text((W / 2, 14), "CgT-GAN (arXiv:2308.12045) as implemented here: "
           "stage 2, adversarial self-critical training on unpaired images", size=22,
           anchor="ma")

    # Lane A: the generator path. y 70-170.
    f.scene(30, 72, 96)
    f.text((78, 174), "unpaired image", size=13, anchor="ma")
    f.box(190, 70, 420, 170, "CLIP image encoder", ["frozen; E_I, clip_model.CLIP", "v = E_I(image), (D,)"],
          fill=FROZEN)
    f.box(480, 70, 700, 170, "MappingNetwork", ["2-layer MLP, tanh", "v -> prefix (P x E)"])
    f.box(760, 70, 960, 170, "GPT-2", ["CaptionGenerator", "prefix -> words"])
    f.box(1020, 70, 1490, 170, "K sampled captions c_1..c_K", [
        "CaptionGenerator.sample: ids and log p (with gradient)",
        "+ the greedy caption g (the baseline)"], fill=DATA)
    f.arrow([(126, 120), (190, 120)])
    f.arrow([(420, 120), (480, 120)], label="v", at=(444, 98))
    f.arrow([(700, 120), (760, 120)], label="prefix", at=(706, 98))
    f.arrow([(960, 120), (1020, 120)])

    # Lane B: the corpus, the discriminator, CLIP's text encoder. y 270-370.
    f.box(30, 270, 330, 370, "Text corpus (unpaired)", ["sentences s_1 .. s_M", "data.CaptionData.corpus"],
          fill=DATA)
    f.box(1020, 270, 1240, 370, "Discriminator", ["RoBERTa + MLP head, logit D(c)",
                                                  "discriminator_loss: BCE,", "its own AdamW step"],
          fill=DISC, size=13)
    f.box(1270, 270, 1490, 370, "CLIP text encoder", ["frozen; E_T(c)", "train.ClipText"], fill=FROZEN)
    f.arrow([(1130, 170), (1130, 270)], label="fake (label 0)", at=(1136, 205))
    f.arrow([(1380, 170), (1380, 270)], label="captions", at=(1386, 205))
    f.arrow([(330, 300), (1020, 300)], colour=REAL, label="K real corpus sentences per image "
            "(label 1)", at=(560, 280))

    # Lane C: the CLIP-agg target and the rewards. y 440-600.
    f.box(30, 450, 330, 560, "CLIP text encoder", ["frozen; E_T(s_j) for the corpus",
                                                   "(M, D), computed once"], fill=FROZEN)
    f.box(390, 440, 870, 600, "CLIP-agg target", ["clip_agg_target (data.clip_agg_targets)",
                                                 "a = sum_j softmax_j(t cos(v, s_j)) s_j",
                                                 "over the whole corpus, t = 100 (COCO)",
                                                 "one target per training image"], fill=REWARD)
    f.arrow([(180, 370), (180, 450)])
    f.arrow([(330, 505), (390, 505)])
    f.arrow([(305, 170), (305, 230), (450, 230), (450, 440)], label="v", at=(458, 400))
    f.box(1020, 440, 1240, 530, "Naturalness reward", ["naturalness_reward", "r_nat = D(c), the logit"],
          fill=REWARD)
    f.box(1270, 430, 1490, 505, "CLIP-cos reward", ["clip_cos_reward", "100 cos(v, E_T(c))"],
          fill=REWARD, title_size=16, size=13)
    f.box(1270, 525, 1490, 620, "CLIP-agg reward", ["clip_agg_reward", "50 cos(a, E_T(c))",
                                                   "+ 50 (1 - mean|a - E_T(c)|)"],
          fill=REWARD, title_size=16, size=13)
    f.arrow([(1130, 370), (1130, 440)])
    f.arrow([(1380, 370), (1380, 430)])
    f.arrow([(870, 590), (1270, 590)], label="a", at=(1100, 568))

    # Lane D: the self-critical loss, and its gradient back into the generator. y 660-790.
    f.box(620, 670, 1490, 800, "Self-critical policy gradient (scst_loss, train.gan_step)", [
        "L(r) = -mean_k (r(c_k) - r(g)) * mean_t log p(c_k,t)      (the greedy caption g is the baseline)",
        "L_G = lambda L(r_sem) + (1 - lambda) L(r_nat),   r_sem = CLIP-agg (or CLIP-cos: --reward cos)",
        "lambda_schedule: 0 for gan.lambda_hold steps, then linear to 0.5",
    ], fill=LOSS, size=14)
    f.arrow([(1130, 530), (1130, 670)])
    f.arrow([(1480, 505), (1505, 505), (1505, 650), (1400, 650), (1400, 670)])
    f.arrow([(1380, 620), (1380, 670)])
    f.arrow([(900, 670), (900, 170)], colour=GRAD, dashed=True, width=3,
            label="policy gradient: AdamW step on MappingNetwork + GPT-2", at=(892, 622),
            anchor="ra")

    # Stage 1 inset: text-only initialisation.
    f.draw.rounded_rectangle((30, 650, 580, 830), radius=10, outline=INIT, width=2)
    f.text((40, 658), "Stage 1: text-only initialisation (train.train_init)", size=16, fill=INIT)
    f.box(40, 690, 150, 760, "s", ["corpus"], fill=DATA, title_size=15, size=12)
    f.box(180, 690, 290, 760, "E_T(s)", ["CLIP text"], fill=FROZEN, title_size=15, size=12)
    f.box(320, 690, 440, 760, "Mapping", ["Network"], fill=TRAINED, title_size=15, size=12)
    f.box(470, 690, 570, 760, "GPT-2", ["rebuilds s"], fill=TRAINED, title_size=15, size=12)
    for x0, x1 in ((150, 180), (290, 320), (440, 470)):
        f.arrow([(x0, 725), (x1, 725)], colour=INIT)
    f.text((40, 772), "cross-entropy (caption_loss); E_T(s) stands in for v: CLIP puts", size=13,
           fill=INIT)
    f.text((40, 790), "text and images in one space, so stage 2 starts from a captioner", size=13,
           fill=INIT)
    f.text((40, 808), "that already writes corpus-like sentences", size=13, fill=INIT)

    # Legend.
    for i, (fill, label) in enumerate(((FROZEN, "frozen CLIP"), (TRAINED, "trained generator"),
                                       (DISC, "trained discriminator"), (REWARD, "reward"),
                                       (LOSS, "loss"), (DATA, "data"))):
        x = 30 + i * 160
        f.draw.rectangle((x, 50, x + 16, 62), fill=fill, outline=INK)
        f.text((x + 22, 48), label, size=13)
    path.parent.mkdir(parents=True, exist_ok=True)
    f.image.save(path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else OUT
    draw(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
