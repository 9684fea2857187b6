"""ShapesWorld's language: scenes, the two caption grammars that describe them, and the checker.

ShapesWorld (shapesworld.py) stands in for COCO in the CgT-GAN demo (Yu et al., arXiv:2308.12045).
Its ground truth is what no captioning benchmark has: every caption can be parsed back into the
facts it claims (objects, counts, colours, sizes, positions, relations) and each fact checked
against the scene. This file holds that language:

- scenes: 1-3 objects on a 3x3 grid of cells (jittered a little when drawn),
- two grammars: "plain" (the references' style) and "alt" (other templates and word choices, the
  cross-domain corpus of the paper's Sec. 4.4), each with synonyms so captions vary like different
  annotators' do,
- `parse` (a caption -> its facts, under either grammar) and `check` (fluency and faithfulness).

Captions follow the project's conventions: lowercase, single spaces, no final period.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# Scenes

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = {  # RGB of each colour name; the renderer jitters them a little
    "red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (240, 225, 40),
    "green": (40, 170, 55), "cyan": (40, 215, 220), "blue": (40, 70, 230),
    "purple": (140, 50, 195), "pink": (250, 140, 205),
}
SIZES = ("small", "medium", "large")
GRID = 3  # objects sit in distinct cells of a GRID x GRID grid: rows top->bottom, cols left->right
# Drawing jitter: an object's offset inside its cell (fraction of the cell width) and its rotation
# (degrees). Kept small on purpose: with +-12% and +-20 degrees, the tiny CLIP learned no shapes in
# its pretraining budget (a linear probe on its image embeddings read shapes at chance, 14-22% for
# six shapes, with a ViT or a ResNet image tower); with +-6% and no rotation the ResNet reads them.
JITTER = 0.06
ROTATION = 0.0


@dataclass(frozen=True)
class Obj:
    """One shape: what it is (shape, colour, size), its cell, and its drawing jitter."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0  # jitter inside the cell, as a fraction of the cell width
    dy: float = 0.0
    angle: float = 0.0  # degrees


Scene = tuple  # tuple[Obj, ...]; background is drawn from the scene's index, not stored here


def sample_scene(rng: random.Random, n: int | None = None) -> Scene:
    """A random scene: n objects (default 1-3 at random) in distinct cells; one time in four two
    objects share shape and colour, so captions need counts and plurals ("two red circles")."""
    if n is None:
        n = rng.choices((1, 2, 3), weights=(0.25, 0.4, 0.35))[0]
    cells = rng.sample(range(GRID * GRID), n)
    kinds = [(rng.choice(SHAPES), rng.choice(tuple(COLOURS))) for _ in range(n)]
    if n >= 2 and rng.random() < 0.25:
        kinds[1] = kinds[0]
    return tuple(Obj(shape, colour, rng.choice(SIZES), cell // GRID, cell % GRID,
                     rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER),
                     rng.uniform(-ROTATION, ROTATION))
                 for (shape, colour), cell in zip(kinds, cells))


def scene_to_json(scene: Scene) -> list:
    return [[o.shape, o.colour, o.size, o.row, o.col, round(o.dx, 4), round(o.dy, 4),
             round(o.angle, 2)] for o in scene]


def scene_from_json(rows: list) -> Scene:
    return tuple(Obj(*row) for row in rows)


# Where an object is, and how two objects relate, in terms of their grid cells.
POSITIONS = {
    "left": lambda o: o.col == 0, "right": lambda o: o.col == GRID - 1,
    "top": lambda o: o.row == 0, "bottom": lambda o: o.row == GRID - 1,
    "centre": lambda o: (o.row, o.col) == (1, 1),
    "top left": lambda o: (o.row, o.col) == (0, 0), "top right": lambda o: (o.row, o.col) == (0, 2),
    "bottom left": lambda o: (o.row, o.col) == (2, 0),
    "bottom right": lambda o: (o.row, o.col) == (2, 2),
}
RELATIONS = {
    "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row,
    "left of": lambda a, b: a.col < b.col, "right of": lambda a, b: a.col > b.col,
    "next to": lambda a, b: a.row == b.row and abs(a.col - b.col) == 1,
}

# ----------------------------------------------------------------------------------------------
# The two grammars: lexicons (meaning -> words) and templates

LEXICON = {
    "plain": {
        "shape": {"circle": ["circle", "disk"], "square": ["square", "box"], "triangle": ["triangle"],
                  "diamond": ["diamond"], "star": ["star"], "hexagon": ["hexagon"]},
        "generic": ["shape", "object"],
        "colour": {"red": ["red"], "orange": ["orange"], "yellow": ["yellow"], "green": ["green"],
                   "cyan": ["cyan", "turquoise"], "blue": ["blue"], "purple": ["purple", "violet"],
                   "pink": ["pink"]},
        "size": {"small": ["small", "little"], "medium": ["medium"], "large": ["large", "big"]},
        "count": {1: ["a", "a", "a", "a", "a", "one"], 2: ["two"], 3: ["three"]},
        "position": {"left": ["on the left"], "right": ["on the right"], "top": ["at the top"],
                     "bottom": ["at the bottom"], "centre": ["in the centre", "in the middle"],
                     "top left": ["in the top left corner"], "top right": ["in the top right corner"],
                     "bottom left": ["in the bottom left corner"],
                     "bottom right": ["in the bottom right corner"]},
        "relation": {"above": ["above"], "below": ["below", "under"],
                     "left of": ["to the left of", "left of"],
                     "right of": ["to the right of", "right of"], "next to": ["next to", "beside"]},
    },
    "alt": {
        "shape": {"circle": ["circle", "ball", "disc"], "square": ["square", "block", "tile"],
                  "triangle": ["triangle"], "diamond": ["diamond", "rhombus"], "star": ["star"],
                  "hexagon": ["hexagon"]},
        "generic": ["item", "figure", "thing"],
        "colour": {"red": ["red", "crimson"], "orange": ["orange"], "yellow": ["yellow", "golden"],
                   "green": ["green"], "cyan": ["cyan", "teal"], "blue": ["blue"],
                   "purple": ["purple", "violet"], "pink": ["pink"]},
        "size": {"small": ["tiny", "small"], "medium": ["midsize", "medium"],
                 "large": ["huge", "large"]},
        "count": {1: ["a", "a", "a single"], 2: ["two", "a pair of"], 3: ["three"]},
        "position": {"left": ["towards the left"], "right": ["towards the right"],
                     "top": ["near the top"], "bottom": ["near the bottom"],
                     "centre": ["in the middle", "at the center"],
                     "top left": ["in the upper left corner"],
                     "top right": ["in the upper right corner"],
                     "bottom left": ["in the lower left corner"],
                     "bottom right": ["in the lower right corner"]},
        "relation": {"above": ["over", "above"], "below": ["beneath", "underneath"],
                     "left of": ["on the left of"], "right of": ["on the right of"],
                     "next to": ["beside", "alongside", "near"]},
    },
}
PLURALS = {"box": "boxes", "rhombus": "rhombuses"}

# Slots: {NP} one singular noun phrase, {NPL} a list of noun phrases joined by "and" (all groups not
# yet mentioned), {POS} the position of the preceding {NP}, {REL} the relation between the {NP}s
# around it, {GNP} the scene's object count ("three shapes"). "is|are" agrees with what follows.
TEMPLATES = {
    "plain": ["{NPL}", "{NPL}", "there is|are {NPL}", "{NP} {POS}", "{NP} {POS} and {NPL}",
              "{NP} {REL} {NP}", "{NP} is {REL} {NP}", "{NP} {REL} {NP} and {NPL}",
              "{NP} {POS} and {NP} {POS}"],
    "alt": ["a picture of {NPL}", "an image showing {NPL}", "in this picture we can see {NPL}",
            "{NP} located {POS}", "{NP} located {POS} along with {NPL}", "{NP} sits {REL} {NP}",
            "{NP} placed {REL} {NP} with {NPL}", "{GNP} including {NPL}",
            "{NP} sits {REL} {NP} and {NP} lies {POS}"],
}
STYLES = tuple(LEXICON)


def _plural(word: str) -> str:
    return PLURALS.get(word, word + "s")


# ----------------------------------------------------------------------------------------------
# Generation: scene -> caption


def _groups(scene: Scene, detail: str) -> list[list[int]]:
    """Objects that a caption at this detail cannot tell apart, grouped ("two red circles")."""
    keys: dict[tuple, list[int]] = {}
    for i, o in enumerate(scene):
        key = (o.shape, o.colour if detail != "shape" else None, o.size if detail == "full" else None)
        keys.setdefault(key, []).append(i)
    return list(keys.values())


def _noun_phrase(scene: Scene, group: list[int], detail: str, lex: dict, rng: random.Random) -> str:
    o = scene[group[0]]
    words = []
    if detail == "full":
        words.append(rng.choice(lex["size"][o.size]))
    if detail != "shape":
        words.append(rng.choice(lex["colour"][o.colour]))
    noun = rng.choice(lex["shape"][o.shape])
    words.append(noun if len(group) == 1 else _plural(noun))
    return _determiner(len(group), words[0], lex, rng) + " " + " ".join(words)


def _determiner(count: int, next_word: str, lex: dict, rng: random.Random) -> str:
    det = rng.choice(lex["count"][count])
    return _article(next_word) if det == "a" else det


def _article(next_word: str) -> str:
    """The indefinite article before next_word: "an" before a vowel, else "a"."""
    return "an" if next_word[0] in "aeiou" else "a"


def describe(scene: Scene, style: str, rng: random.Random) -> str:
    """One caption of the scene in the given grammar ("plain" or "alt"), every fact it states true.

    Example: a scene with a small red circle at the top left and a large blue square below it can
    read "a red circle above a blue square", "there are a small red circle and a large blue box"
    (plain) or "a picture of a crimson ball and a blue block" (alt).
    """
    lex = LEXICON[style]
    detail = rng.choices(("full", "colour", "shape"), weights=(0.4, 0.5, 0.1))[0]
    groups = _groups(scene, detail)
    rng.shuffle(groups)
    singles = [g for g in groups if len(g) == 1]
    usable = []
    for template in TEMPLATES[style]:
        n_np = template.count("{NP}")
        has_list = "{NPL}" in template
        if "{GNP}" in template and len(scene) < 2:
            continue  # "a single item including a red ball" says nothing the list does not
        if len(singles) >= n_np and (len(groups) > n_np if has_list else len(groups) == n_np):
            usable.append(template)
    template = rng.choice(usable)
    # NP slots take singular groups (positions and relations are stated of one object); the list
    # slot takes every group not yet named.
    named = singles[:template.count("{NP}")]
    rest = [g for g in groups if g not in named]
    words, prev, nps = [], None, iter(named)
    for part in template.split():
        if part == "{NP}":
            prev = next(nps)
            words.append(_noun_phrase(scene, prev, detail, lex, rng))
        elif part == "{NPL}":
            words.append(" and ".join(_noun_phrase(scene, g, detail, lex, rng) for g in rest))
        elif part == "{GNP}":
            words.append(_determiner(len(scene), "x", lex, rng) + " "
                         + _plural(rng.choice(lex["generic"])))
        elif part == "{POS}":
            # Every cell has at least one position word (the middle one is the centre).
            where = [w for w, holds in POSITIONS.items() if holds(scene[prev[0]])]
            words.append(rng.choice(lex["position"][rng.choice(where)]))
        elif part == "{REL}":
            a, b = scene[prev[0]], scene[named[named.index(prev) + 1][0]]
            rel = rng.choice([r for r, holds in RELATIONS.items() if holds(a, b)])
            words.append(rng.choice(lex["relation"][rel]))
        elif part == "is|are":
            words.append("is" if len(rest[0]) == 1 else "are")
        else:
            words.append(part)
    return " ".join(words)


def references(scene: Scene, style: str, rng: random.Random, n: int = 5) -> list[str]:
    """n distinct captions of the scene (fewer only if the grammar cannot produce n)."""
    refs: list[str] = []
    for _ in range(40 * n):
        caption = describe(scene, style, rng)
        if caption not in refs:
            refs.append(caption)
            if len(refs) == n:
                break
    return refs


# ----------------------------------------------------------------------------------------------
# Parsing: caption -> the facts it claims (under either grammar)

# A noun phrase means (count, shape, colour, size): count "some" for "a"/"an" (at least one), an
# int for "one", "two", ... (exactly that many); None for a word the phrase leaves out.
SOME = "some"


def _union(kind: str) -> dict[str, object]:
    """Every word (or phrase) of a kind in either grammar -> its meaning."""
    table: dict[str, object] = {}
    for lex in LEXICON.values():
        for meaning, words in lex[kind].items():
            for word in words:
                table[word] = meaning
    return table


_NOUNS = {}  # word -> (shape or None for "shape"/"item", is_plural)
for _lex in LEXICON.values():
    for _shape, _words in _lex["shape"].items():
        for _w in _words:
            _NOUNS[_w], _NOUNS[_plural(_w)] = (_shape, False), (_shape, True)
    for _w in _lex["generic"]:
        _NOUNS[_w], _NOUNS[_plural(_w)] = (None, False), (None, True)
_COLOURS, _SIZES = _union("colour"), _union("size")
_COUNTS = [(tuple(p.split()), SOME if p in ("a", "an") else n) for p, n in
           {**_union("count"), "an": 1}.items()]
_PHRASES = {kind: [(tuple(p.split()), m) for p, m in _union(kind).items()]
            for kind in ("position", "relation")}
_TEMPLATES = [t.split() for style in STYLES for t in TEMPLATES[style]]


def _noun_phrases(tokens: list[str], i: int):
    """Yield (np, j) for each noun phrase "det [size] [colour] noun" starting at tokens[i]."""
    for det, count in _COUNTS:
        j = i + len(det)
        if tuple(tokens[i:j]) != det:
            continue
        size = _SIZES.get(tokens[j]) if j < len(tokens) else None
        j += size is not None
        colour = _COLOURS.get(tokens[j]) if j < len(tokens) else None
        j += colour is not None
        if j >= len(tokens) or tokens[j] not in _NOUNS:
            continue
        shape, plural = _NOUNS[tokens[j]]
        if plural != (count not in (SOME, 1)):
            continue  # "a circles", "two circle"
        if det[-1] in ("a", "an") and len(det) == 1 and (det[0] == "an") != (tokens[i + 1][0] in "aeiou"):
            continue  # "an red", "a orange"
        yield (count, shape, colour, size), j + 1


def _match(parts: list[str], k: int, tokens: list[str], i: int, facts: tuple, last, rel):
    """Yield every way tokens[i:] matches template parts[k:] (backtracking), as the facts it claims,
    each with the (start, end) token span of the words that state it: a noun phrase's own words, a
    position's or relation's phrase. `rel` is (np, relation, span) while a relation waits for its
    second noun phrase."""
    if k == len(parts):
        if i == len(tokens):
            yield facts
        return
    part = parts[k]
    if part in ("{NP}", "{NPL}", "{GNP}"):
        for np, j in _noun_phrases(tokens, i):
            if part == "{GNP}" and np[1] is not None:
                continue
            new = facts + ((("np", np), (i, j)),)
            if rel:
                new += ((("rel", rel[0], rel[1], np), rel[2]),)
            if part == "{NPL}" and j < len(tokens) and tokens[j] == "and":
                # More noun phrases may follow in the list, or the list may end here.
                yield from _match(parts, k, tokens, j + 1, new, np, None)
            yield from _match(parts, k + 1, tokens, j, new, np, None)
    elif part in ("{POS}", "{REL}"):
        for phrase, meaning in _PHRASES["position" if part == "{POS}" else "relation"]:
            if tuple(tokens[i:i + len(phrase)]) == phrase and last is not None:
                j = i + len(phrase)
                if part == "{POS}":
                    yield from _match(parts, k + 1, tokens, j,
                                      facts + ((("pos", last, meaning), (i, j)),), last, None)
                else:
                    yield from _match(parts, k + 1, tokens, j, facts, last, (last, meaning, (i, j)))
    elif i < len(tokens) and tokens[i] in part.split("|"):
        yield from _match(parts, k + 1, tokens, i + 1, facts, last, rel)


def normalise(caption: str) -> list[str]:
    """Caption -> tokens: lowercase, split on spaces, a final period (a decoder's end mark) dropped."""
    return caption.lower().strip().rstrip(".").split()


def parse_spans(caption: str) -> list[tuple[tuple, tuple[int, int]]] | None:
    """The facts a caption claims, each with the (start, end) span of normalise(caption)'s tokens
    that states it, or None when neither grammar accepts the caption.

    Example: parse_spans("a red circle above a blue square") ==
    [(("np", ("some", "circle", "red", None)), (0, 3)), (("np", ("some", "square", "blue", None)), (4, 7)),
     (("rel", ("some", "circle", "red", None), "above", ("some", "square", "blue", None)), (3, 4))]
    """
    tokens = normalise(caption)
    for parts in _TEMPLATES:
        for facts in _match(parts, 0, tokens, 0, (), None, None):
            return list(facts)
    return None


def parse(caption: str) -> list[tuple] | None:
    """The facts a caption claims, or None when neither grammar accepts it.

    Facts: ("np", np) "such objects exist" (exactly `count` of them for a number word),
    ("pos", np, where) "they are at `where`", ("rel", np1, relation, np2). Example:
    parse("a red circle above two blue squares") ==
    [("np", ("some", "circle", "red", None)), ("np", (2, "square", "blue", None)),
     ("rel", ("some", "circle", "red", None), "above", (2, "square", "blue", None))]
    """
    spans = parse_spans(caption)
    return None if spans is None else [fact for fact, _ in spans]


# ----------------------------------------------------------------------------------------------
# Checking facts against a scene


def _matches(np: tuple, scene: Scene) -> list[Obj]:
    _, shape, colour, size = np
    return [o for o in scene if shape in (None, o.shape) and colour in (None, o.colour)
            and size in (None, o.size)]


def fact_holds(fact: tuple, scene: Scene) -> bool:
    """Whether one parsed fact is true of the scene ("a" = at least one, numbers = exactly)."""
    count = fact[1][0]
    found = _matches(fact[1], scene)
    if fact[0] == "np":
        return len(found) >= 1 if count == SOME else len(found) == count
    if not found:
        return False
    quantifier = any if count == SOME else all
    if fact[0] == "pos":
        return quantifier(POSITIONS[fact[2]](o) for o in found)
    others = _matches(fact[3], scene)
    return quantifier(any(b is not a and RELATIONS[fact[2]](a, b) for b in others) for a in found)


def check(captions: dict[str, str], scenes: dict[str, Scene]) -> dict[str, float]:
    """Ground-truth quality of captions of known scenes.

    fluency = (captions either grammar accepts) / (all captions).
    faithfulness = (true facts) / (claimed facts), pooled over all facts of the accepted captions
    (a micro-average: a caption stating four facts weighs four times one stating one fact);
    captions the grammar rejects claim no facts here and count only against fluency.
    Example: {"a": "a red circle above a blue square", "b": "circle circle"} for a scene whose red
    circle is below its blue square -> fluency 0.5, faithfulness 2/3 (both objects exist, the
    relation is false).
    """
    if not captions:
        return {"fluency": 0.0, "faithfulness": 0.0}
    fluent = claimed = true = 0
    for image_id, caption in captions.items():
        facts = parse(caption)
        if facts is None:
            continue
        fluent += 1
        claimed += len(facts)
        true += sum(fact_holds(f, scenes[image_id]) for f in facts)
    return {"fluency": fluent / len(captions), "faithfulness": true / claimed if claimed else 0.0}


# ----------------------------------------------------------------------------------------------
# One caption's false words, for figures: which words the checker finds false

_FIELDS = {"count": 0, "shape": 1, "colour": 2, "size": 3}  # a noun phrase's fields


def _np_words(np: tuple, span: tuple[int, int]) -> dict[str, list[int]]:
    """The token positions of a noun phrase ("det [size] [colour] noun") that state each field."""
    _, _, colour, size = np
    noun = span[1] - 1
    colour_at = [noun - 1] if colour is not None else []
    size_at = [noun - 1 - len(colour_at)] if size is not None else []
    det_end = noun - len(colour_at) - len(size_at)
    return {"count": list(range(span[0], det_end)), "shape": [noun], "colour": colour_at,
            "size": size_at}


def _blame(np: tuple, span: tuple[int, int], scene: Scene) -> list[int]:
    """The words to blame for a false noun phrase: each word whose loosening alone makes it true
    (a number -> "a", a shape, colour or size word -> left out), or all its words if none does."""
    words, blamed = _np_words(np, span), []
    for field, index in _FIELDS.items():
        loose = SOME if field == "count" else None
        if np[index] != loose and fact_holds(("np", np[:index] + (loose,) + np[index + 1:]), scene):
            blamed += words[field]
    return blamed or list(range(*span))


def false_words(caption: str, scene: Scene) -> list[bool] | None:
    """For each token of normalise(caption), whether it states something false of the scene; None
    when neither grammar accepts the caption (check counts it against fluency).

    A false fact marks the words that state it: a position's or relation's phrase, or in a noun
    phrase the wrong word (_blame). Example, check's scene (a small red circle in the bottom left
    corner, a large blue square at the top left): "a large red circle above a blue square" ->
    [F, T, F, F, T, F, F, F]: "large" (the circle is small) and "above" (no large red circle is).
    """
    facts = parse_spans(caption)
    if facts is None:
        return None
    marks = [False] * len(normalise(caption))
    for fact, span in facts:
        if not fact_holds(fact, scene):
            for i in _blame(fact[1], span, scene) if fact[0] == "np" else range(*span):
                marks[i] = True
    return marks


def fact_kind(fact: tuple) -> str:
    """A parsed fact's kind, for splitting faithfulness by what a claim says: "object" (shape, with
    or without colour), "object+size", "object+count" (a number word), "position", "relation"."""
    if fact[0] != "np":
        return {"pos": "position", "rel": "relation"}[fact[0]]
    count, _, _, size = fact[1]
    return "object+size" if size is not None else "object" if count == SOME else "object+count"


def fact_split(captions: dict[str, str], scenes: dict[str, Scene]) -> dict[str, tuple[int, int]]:
    """check's faithfulness split by fact_kind: {kind: (true facts, claimed facts)}. Example, check's
    scene: {"a": "a large red circle above a blue square"} -> {"object": (1, 1),
    "object+size": (0, 1), "relation": (0, 1)}."""
    out: dict[str, tuple[int, int]] = {}
    for image_id, caption in captions.items():
        for fact in parse(caption) or []:
            true, claimed = out.get(fact_kind(fact), (0, 0))
            out[fact_kind(fact)] = (true + fact_holds(fact, scenes[image_id]), claimed + 1)
    return dict(sorted(out.items()))


def size_claims(captions: dict[str, str], scenes: dict[str, Scene]) -> dict[str, dict[str, int]]:
    """The size words of the captions' noun phrases, checked: {size claimed: {verdict: count}},
    verdict "right size" (an object of that shape and colour has it), "wrong size" (such objects
    exist, none of that size) or "no such object". Example, check's scene: {"a": "a large red
    circle and a medium green star"} -> {"large": {"wrong size": 1}, "medium": {"no such object": 1}}."""
    out: dict[str, dict[str, int]] = {}
    for image_id, caption in captions.items():
        for fact in parse(caption) or []:
            if fact[0] != "np" or fact[1][3] is None:
                continue
            count, shape, colour, size = fact[1]
            kinds = _matches((count, shape, colour, None), scenes[image_id])
            verdict = ("no such object" if not kinds else "right size"
                       if any(o.size == size for o in kinds) else "wrong size")
            out.setdefault(size, {}).setdefault(verdict, 0)
            out[size][verdict] += 1
    return dict(sorted(out.items()))


def size_variants(scene: Scene) -> list[list[str]]:
    """For each object, one short caption per size in SIZES and one without a size ("a small red
    circle", "a medium red circle", "a large red circle", "a red circle"), in the plain grammar's
    first words: what a reward probe scores to see whether a reward prefers the true size."""
    out = []
    for o in scene:
        colour, noun = LEXICON["plain"]["colour"][o.colour][0], LEXICON["plain"]["shape"][o.shape][0]
        words = [LEXICON["plain"]["size"][s][0] + " " for s in SIZES] + [""]
        out.append([f"{_article(w + colour)} {w}{colour} {noun}" for w in words])
    return out
