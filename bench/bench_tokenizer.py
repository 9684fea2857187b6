"""Agreement of evaluate.ptb_tokenize with the COCO toolkit's Java PTBTokenizer on generated captions.

    python bench/bench_tokenizer.py [--n 6000] [--seed 0] [--show 20] [--stress]

Generates COCO-like captions (apostrophes, hyphens, numbers, quotes, brackets, periods, odd spacing,
abbreviations, non-ASCII), tokenizes them all with pycocoevalcap's PTBTokenizer (one Java run) and
with evaluate.ptb_tokenize, and prints the share of captions whose token lists are identical, with
the first disagreements. Needs Java and pycocoevalcap.
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402

SUBJECTS = ["a man", "a woman", "two men", "three women", "a young boy", "a little girl", "a dog",
            "a black and white cat", "a group of people", "an elephant", "two giraffes", "a baseball player",
            "a skier", "a surfer", "the chef", "a police officer", "people", "a herd of sheep", "a teddy bear",
            "an old man", "a toddler", "a brown horse", "a red double-decker bus", "a train", "a pizza"]
VERBS = ["is riding", "rides", "is holding", "holds", "sitting on", "standing next to", "is eating",
         "looking at", "walking down", "is flying", "is playing with", "laying on", "parked near",
         "is cutting", "jumping over", "is throwing", "catching", "waiting for", "talking on", "carrying"]
OBJECTS = ["a skateboard", "a surfboard", "a frisbee", "a kite", "a cell phone", "a tennis racket",
           "a slice of pizza", "the street", "a wooden bench", "a large clock tower", "a plate of food",
           "a snowy hill", "the beach", "a laptop computer", "a hot dog", "an umbrella", "a toilet",
           "a fire hydrant", "a stop sign", "a kitchen counter", "a giraffe", "the ocean", "a bowl of fruit"]
PLACES = ["in a park", "on the beach", "in the kitchen", "at night", "on a sunny day", "in front of a building",
          "next to a fence", "in a field", "on a city street", "at the zoo", "in the snow", "by the water"]
EXTRAS = ["a man's hat", "the dog's toy", "the giraffes' heads", "it's raining", "there's a cat", "doesn't move",
          "can't see", "won't stop", "they're happy", "we'll go", "i'm here", "you've seen", "he'd like",
          "a t-shirt", "a close-up", "a two-story house", "black-and-white photo", "a 3-year-old boy",
          "a well-lit room", "an x-ray", "o'clock", "rock 'n' roll", "the 1990s", "'90s style", "3 people",
          "10 cars", "1,000 birds", "3.5 inches", "2 1/2 slices", "10:30 am", "$5", "50%", "#1 fan",
          "a sign that says \"stop\"", "a 'no parking' sign", "(blurry)", "[sic]", "{photo}", "and/or",
          "w/ cheese", "salt & pepper", "at&t store", "st. mary's church", "dr. smith", "mr. and mrs. jones",
          "the u.s. flag", "vs. the other team", "etc.", "e.g. apples", "café", "crème brûlée", "piñata",
          "jalapeño", "naïve", "résumé", "“quoted”", "‘single’", "it’s", "don’t", "a dog’s", "—", "…",
          "20°", "5×5", "½ cup", "€10", "£20", "😀", "❤", "東京", "zürich", "!", "?", "?!", ";", ":", "--",
          "...", "-", "a 4x4 truck", "3d", "a 12\" pizza", "a 6' tall man", "e-mail", "www.example.com",
          "#hashtag", "@user", "cannot", "gonna", "wanna", "gotta", "ain't", "y'all", "ma'am", "o'neil",
          "mcdonald's", "kids'", "'em", "nothin'", "a.m.", "p.m.", "no. 5", "approx. 3", "ft.", "a+b",
          "a=b", "~", "a*", "x<y", "100 %", "-5 degrees", "+3", "a-", "-b", "a--b", "a---b", "i.e.", "vitamin c."]
PUNCT = [".", ".", ".", "", "", "", " .", "!", "?", "...", " ...", "..", ",", ";"]


def caption(rng):
    """One COCO-like caption with a few random surface features."""
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(PLACES))
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        words.insert(rng.randint(0, len(words)), rng.choice(EXTRAS))
    if rng.random() < 0.2:
        words.insert(rng.randint(1, len(words)), ",")
    text = " ".join(words)
    style = rng.random()
    if style < 0.45:
        text = text[0].upper() + text[1:]
    elif style < 0.52:
        text = text.upper()
    elif style < 0.56:
        text = text.title()
    text += rng.choice(PUNCT)
    if rng.random() < 0.1:
        text = text.replace(" ", "  ", rng.randint(1, 3))
    if rng.random() < 0.05:
        text = " " + text + "  "
    if rng.random() < 0.05:
        text = text.replace(" ,", ",")
    if rng.random() < 0.03:
        text = text.replace(" ", "\t", 1)
    return text


NOISE = list(".,;:!?'\"`-/()[]{}<>&%$#@*+=_~|\\") + list("’‘“”—–…°×½é☺😀\u00a0") + ["  ", "...", "--", "'s", "n't"]


def stress(text, rng):
    """The caption with 1-3 characters from NOISE inserted at random places (a harder test)."""
    for _ in range(rng.randint(1, 3)):
        i = rng.randint(0, len(text))
        text = text[:i] + rng.choice(NOISE) + text[i:]
    return text


def java_tokenize(captions):
    """pycocoevalcap's PTBTokenizer on a list of captions: one Java run, one token list each."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0].split(" ") if out[i][0] else [] for i in range(len(captions))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=20)
    parser.add_argument("--stress", action="store_true", help="insert random punctuation into each caption")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    captions = [caption(rng) for _ in range(args.n)]
    if args.stress:
        captions = [stress(c, rng) for c in captions]
    java = java_tokenize(captions)
    bad = [(c, j, evaluate.ptb_tokenize(c)) for c, j in zip(captions, java) if evaluate.ptb_tokenize(c) != j]
    for c, j, o in bad[:args.show]:
        print(f"{c!r}\n  java: {j}\n  ours: {o}")
    agree = 1 - len(bad) / len(captions)
    kind = "stress (random punctuation inserted)" if args.stress else "realistic"
    print(f"tokenizer agreement, {kind} captions: {len(captions) - len(bad)}/{len(captions)} captions identical ({100 * agree:.2f}%)")


if __name__ == "__main__":
    main()
