"""Caption metrics of the COCO caption toolkit (pycocoevalcap 1.2), in pure Python.

CgT-GAN (arXiv:2308.12045, Sec. 4.1 and Tables 1-3) reports BLEU-1..4, METEOR, ROUGE-L, CIDEr and
SPICE as computed by the COCO caption toolkit, and selects its checkpoint by validation CIDEr. This
file reproduces the toolkit's numbers without Java and fast enough to run on every validation pass:

- `ptb_tokenize`: the toolkit's tokenization (Stanford PTBTokenizer 3.4.1 with `-preserveLines
  -lowerCase`, then its punctuation tokens removed), reimplemented with regular expressions.
- `bleu`: BLEU-1..4, corpus level, "closest" reference length, the toolkit's constants 1e-9, 1e-15.
- `rouge_l`: ROUGE-L (LCS F-measure, beta 1.2) with the toolkit's max over references.
- `cider_d`: CIDEr-D. pycocoevalcap 1.2 calls it "CIDEr", but its scorer clips candidate tf-idf
  weights to the reference's and applies a Gaussian length penalty (sigma 6), which is CIDEr-D.
- `score`: all of the above from raw strings; `python evaluate.py RESULTS.json ANNOTATIONS.json`.

METEOR and SPICE are Java programs: `java_scores` runs them through an installed pycocoevalcap
where Java (and, for SPICE, Stanford CoreNLP) is present (java_metrics.py), and `--meteor` /
`--spice` ask for them on the command line. Scores are in the toolkit's units (CIDEr-D x10 already
applied: COCO's 108.1 is 1.081 here). `coco_results` and `coco_annotations` write the COCO formats
that this file's command line and pycocoevalcap's COCO / COCOEvalCap both read.

Toolkit quirks reproduced on purpose, so that the numbers match:
- Brackets become "-lrb-" etc. after lowercasing, so they are NOT removed by the toolkit's
  upper-case punctuation list; "?!" and "!!" stay too (only single "?" and "!" are listed).
- ROUGE-L splits on " ", so an empty caption is one empty token.
- CIDEr-D's length penalty uses the number of bigrams (words - 1) as the "length".
"""
import argparse
import functools
import json
import math
import re
import sys
import unicodedata
# _count_elements is the C loop behind Counter.update; calling it on a plain dict skips Counter's
# per-call overhead, which dominates for ~12-word captions.
from collections import Counter, _count_elements
from pathlib import Path

import data
import java_metrics

# ----------------------------------------------------------------------------------------------
# PTB tokenization as the toolkit applies it

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: the tokens dropped after tokenizing.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def _char_class(keep):
    """A regex character class of the BMP characters for which keep(ch) holds, as ranges."""
    ranges = []
    for code in range(0x10000):
        if keep(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    spans = (re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges)
    return "[" + "".join(spans) + "]"


# Letters and digits as the Java lexer sees them: Unicode letters, decimal digits and combining
# marks (so "café" with a combining accent and Devanagari stay one word); superscripts, fractions
# and other numeric symbols are separate tokens.
_L = _char_class(lambda c: (c.isalpha() or c.isdecimal() or unicodedata.category(c)[0] == "M"))
_LETTER = _char_class(lambda c: c.isalpha())
_L_CHAR = re.compile(_L)
# Characters Java's lexer drops as untokenizable (astral-plane emoji arrive as surrogates there;
# they still end the word they interrupt) and the ones it treats as spaces.
_UNTOKENIZABLE = re.compile("[\U00010000-\U0010ffff\u2010\u2011\x00-\x08\x0e-\x1f\x7f]")
_SPACE = re.compile(r"[\s\u200b]+")

# Abbreviations whose final period stays on the word (Stanford's lists, case-insensitive unless
# capitalised below); some keep it only before a number ("no. 5").
_ABBREV = frozenset("""jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn
    tenn va vt wis wisc wyo inc co cos corp pty ltd plc rt bancorp dept bhd assn univ intl sys ph
    tel est ext sq ft jr sr bros blvd rd esq etc al seq mr mrs ms dr drs prof profs sen sens rep
    reps atty attys lt col gen messrs gov govs adm rev maj sgt cpl pvt mt capt st ste ave pres lieut
    hon brig cmdr comdr pfc spc supt supts det mme mlle vs""".split())
_ABBREV_CAPITAL = frozenset("Ark Del Ill La Mass Miss Ore Pa Tex Wash".split())
_ABBREV_BEFORE_NUMBER = frozenset("no nos prop ca fig figs pp op".split())
_ACRONYM = re.compile(rf"{_LETTER}(?:\.{_LETTER})+|ph\.d", re.IGNORECASE)
# A single letter keeps its period ("vitamin c.") unless one of these words follows, capitalised,
# which Stanford's lexer takes as the start of a new sentence.
_SENTENCE_START = re.compile(r"\s+([A-Z][A-Za-z]*)(?![^\W_])")
_SENTENCE_WORDS = frozenset("""A An The In At It He She They We You This That There These Her Our Their
    What When But So If As One Some Many Then Here Now Other Such While After Since""".split())
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_SYMBOLS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
            "“": "``", "”": "''", "«": "``", "»": "''", "‘": "`", "’": "'", "‹": "`", "›": "'",
            "£": "#", "€": "$", "…": "...", "–": "--", "—": "--", "―": "--",
            "½": "1/2", "¼": "1/4", "¾": "3/4", "⅓": "1/3", "⅔": "2/3"}

# One alternative per token kind, tried in this order at each position.
_TOKEN = re.compile(rf"""
    (?P<url>(?:https?|ftp)://[^\s"<>()]+
        |[a-z0-9][^\s"<>|(){{}}]*@(?:[^\s"<>|(){{}}.]+\.)*[^\s"<>|(){{}}\[\].,;:]+)
  | (?P<dots>\.\.\.+)
  | (?P<dashes>--+)
  | (?P<bangs>[?!]+)
  | (?P<number>[+-]?\d+(?:[.,:]\d+)+(?:-{_L}+)*|[+-]\d+)
  | (?P<apoword>['’]n['’]|['’](?:em|cause|\d0s)(?!{_L})|['’](?=twas|tis)t
        |(?<!{_L})(?-i:[dlnoA-HJ-XZ])['’]{_L}{{2,}}|{_L}+[aeiouy]['’][aeiou]{_L}*
        |(?<!{_L})y['’](?=all|know)|(?<!{_L})['’]\d\d(?!{_L}))
  | (?P<clitic>['’](?:s|re|ve|ll|m|d)(?!{_L}))
  | (?P<caps>(?-i:[A-Z]+(?:[&+][A-Z]+)+|[A-Z]+\$)|(?<!{_L})(?:[cf]\#|c\+\+))
  | (?P<word>{_L}+(?:(?:[-_/]|[.!?](?={_LETTER})){_L}+)*)
  | (?P<tag>[#@]{_LETTER}{_L}*|<[^<>\s]+>|<<|>>|&amp;|''|``|__+)
  | (?P<other>.)
""", re.VERBOSE | re.IGNORECASE)

# Text between spaces and tabs; a chunk of ASCII letters and digits is one token as it is.
_CHUNK = re.compile(r"[^ \t]+")


def _after_word(word, text, end):
    """Split one word the way Stanford's lexer does: contractions and trailing abbreviation periods.

    Returns (tokens, new end) where end is just past what the tokens consumed in `text`.
    """
    low = word.lower()
    if low in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[low]), end
    if (low.endswith("n") and len(low) > 1 and text[end:end + 2].lower() in ("'t", "’t")
            and not _L_CHAR.match(text, end + 2)):
        return [word[:-1], "n't"], end + 2
    if text[end:end + 1] == ".":
        # At the end of a caption Java looks into the next line of its batch; COCO captions
        # mostly start with "A", so assume that.
        follow = _SENTENCE_START.match(text + " A", end + 1)
        new_sentence = follow is not None and follow[1].capitalize() in _SENTENCE_WORDS
        single = len(word) == 1 and word.isascii() and word.isalpha() and not new_sentence
        keep = (single or low in _ABBREV or word in _ABBREV_CAPITAL
                or _ACRONYM.fullmatch(word)
                or low in _ABBREV_BEFORE_NUMBER and re.match(r"\s*\d", text[end + 1:]))
        if keep:
            return [word + "."], end + 1
    return [word], end


def _quote(ch, text, end):
    """ASCII quotes: opening (`` or `) when a letter or digit follows, else closing ('' or ')."""
    opening = bool(_L_CHAR.match(text, end))
    if ch == '"':
        return "``" if opening else "''"
    return "`" if opening and not text[end:end + 1].isdecimal() else "'"


def _lex(text):
    """Stanford PTBTokenizer tokens of one line, before lowercasing and punctuation removal."""
    text = _UNTOKENIZABLE.sub(" ", text)
    # A whole number followed by a fraction is one token joined by a no-break space ("1 1/2"),
    # and spaced dots are one ellipsis: the only tokens that span a space.
    text = re.sub(r"(?<![\d.,])(\d+) (\d+/\d+)(?![\d/])", "\\1\u00a0\\2", text)
    text = re.sub(r"\.(?:[ \u00a0]\.){2,}", "...", text)
    tokens = []
    for chunk in _CHUNK.finditer(text):
        word = chunk.group()
        if word.isascii() and word.isalnum() and word.lower() not in _SPLIT_WORDS:
            tokens.append(word)  # the common case, a plain word between spaces
            continue
        pos, end = chunk.span()
        while pos < end:
            space = _SPACE.match(text, pos, end)
            if space:
                pos = space.end()
                continue
            m = _TOKEN.match(text, pos, end)
            kind, tok, pos = m.lastgroup, m.group(), m.end()
            if kind == "word":
                frac = re.match(r"\u00a0\d+/\d+", text[pos:end])
                if frac:
                    tok, pos = tok + frac.group(), pos + frac.end()
                words, pos = _after_word(tok, text, pos)
                tokens += words
            elif kind == "dots":
                tokens.append("...")
            elif kind == "dashes":
                tokens.append("--")
            elif kind in ("apoword", "clitic"):
                tokens.append(tok.replace("’", "'") if kind == "clitic" or tok[0] in "'’" else tok)
            elif kind == "tag" and tok == "&amp;":
                tokens.append("&")
            elif kind == "other" and tok in "\"'":
                tokens.append(_quote(tok, text, pos))
            else:
                tokens.append(_SYMBOLS.get(tok, tok))
    return tokens


# Most captions are only letters, digits and spaces, with perhaps a final period: for those the
# lexer reduces to lowercasing and splitting (unless the last word may keep its period).
_PLAIN = re.compile(r"[A-Za-z0-9 ]*?([A-Za-z]*)(\.?) *")


def _tokenize_plain(caption):
    """Tokens of a letters-digits-spaces caption, or None when the full lexer is needed."""
    m = _PLAIN.fullmatch(caption)
    if m is None:
        return None
    last, period = m.groups()
    if period and (len(last) == 1 or last.lower() in _ABBREV or last in _ABBREV_CAPITAL):
        return None
    words = caption.lower().replace(".", " ").split()
    if any(w in _SPLIT_WORDS for w in words):
        return None
    return tuple(words)


@functools.lru_cache(maxsize=1 << 17)
def _ptb_tokenize_cached(caption):
    plain = _tokenize_plain(caption)
    if plain is not None:
        return plain
    return tuple(t for t in (tok.lower() for tok in _lex(caption.replace("\n", " ")))
                 if t not in PUNCTUATIONS)


def ptb_tokenize(caption: str) -> list[str]:
    """Tokens of one caption as pycocoevalcap's PTBTokenizer gives them.

    Lowercased Penn Treebank tokens (clitics split, quotes and brackets normalised), then the
    toolkit's PUNCTUATIONS removed, e.g.
    "A man's (red) hat, isn't it?" -> ['a', 'man', "'s", '-lrb-', 'red', '-rrb-', 'hat', 'is', "n't", 'it'].
    Note '-lrb-' survives: the toolkit lists '-LRB-' in upper case, after lowercasing.
    Agreement with the Java tokenizer (bench/bench_tokenizer.py): 99.87% of 6,000 generated
    COCO-like captions identical, 95% when random punctuation is sprinkled in. Known differences:
    a caption-final single letter with a period ("vitamin c."), which Java resolves by looking at
    the next caption of its batch (we assume one starting with "A"), and rare mixes such as
    "US$5", "S&P-500" or a "n't" inside a word.
    """
    return list(_ptb_tokenize_cached(caption))


# ----------------------------------------------------------------------------------------------
# N-grams, BLEU, ROUGE-L, CIDEr-D (inputs: token lists; one candidate and a list of references
# per image, images in the same order in both)

def ngrams(tokens, n=4):
    """[{k-gram: count} for k = 1..n] of a token list, k-grams as tuples: the toolkit's `precook`.

    ngrams(["a", "dog", "a", "dog"], 2) -> [{("a",): 2, ("dog",): 2}, {("a", "dog"): 2, ("dog", "a"): 1}]
    """
    shifted = [tokens[i:] for i in range(n)]  # zip(*shifted[:k]) yields the k-grams
    orders = [{} for _ in range(n)]
    for k, counts in enumerate(orders, 1):
        # Counter's own C counting loop, without Counter's per-call overhead (this runs per caption).
        _count_elements(counts, zip(*shifted[:k]))
    return orders


def bleu_stats(candidate, references, n=4):
    """Sufficient statistics of one image for BLEU: (testlen, reflen, guess[n], correct[n]).

    correct[k] counts candidate (k+1)-grams clipped by their largest count in any one reference;
    guess[k] = max(0, testlen - k); reflen is the reference length closest to testlen (the shorter
    one on a tie), the toolkit's "closest" option.
    """
    ref_counts = [ngrams(r, n) for r in references]
    testlen = len(candidate)
    reflen = min((abs(len(r) - testlen), len(r)) for r in references)[1]
    correct = [0] * n
    for k, cand_k in enumerate(ngrams(candidate, n)):
        refs_k = [rc[k] for rc in ref_counts]
        for gram, c in cand_k.items():
            correct[k] += min(c, max(rk.get(gram, 0) for rk in refs_k))
    return testlen, reflen, [max(0, testlen - k) for k in range(n)], correct


def bleu_from_stats(testlen, reflen, guess, correct):
    """BLEU-1..n from (summed) statistics, with the toolkit's constants.

    BLEU-N = BP * prod_{k<=N} ((correct_k + 1e-15) / (guess_k + 1e-9)) ** (1/N),
    BP = exp(1 - r/c) when c < r, with c = testlen + 1e-15, r = reflen + 1e-9.
    Worked example: candidate "a dog runs", reference "a dog runs fast": guess = [3, 2, 1, 0],
    correct = [3, 2, 1, 0], so BLEU-1..3 = 1 * BP, BLEU-4 ~ (1e-15/1e-9)**(1/4) * BP ~ 0.03 * BP,
    and BP = exp(1 - 4/3) = 0.7165.
    """
    scores, product = [], 1.0
    for k in range(len(guess)):
        product *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(candidates, references, n=4):
    """Corpus BLEU-1..n and per-image BLEU-1..n, as pycocoevalcap's Bleu(4).

    candidates: list of token lists (one per image); references: list of lists of token lists.
    Returns (corpus [n floats], per_image [n lists of floats]): the corpus score sums the
    statistics over images before the formula of `bleu_from_stats`, it is not a mean.
    """
    total = [0, 0, [0] * n, [0] * n]
    per_image = [[] for _ in range(n)]
    for cand, refs in zip(candidates, references):
        testlen, reflen, guess, correct = bleu_stats(cand, refs, n)
        total[0] += testlen
        total[1] += reflen
        total[2] = [a + b for a, b in zip(total[2], guess)]
        total[3] = [a + b for a, b in zip(total[3], correct)]
        for k, s in enumerate(bleu_from_stats(testlen, reflen, guess, correct)):
            per_image[k].append(s)
    return bleu_from_stats(*total), per_image


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (bit-parallel, Hyyro 2004).

    Bit i of `v` is 0 where the LCS of a[:i+1] and the part of b seen so far gains a token; each
    token of b updates all positions at once with one add and one subtract on Python ints.
    lcs_length("a man on a horse".split(), "a horse and a man".split()) -> 2 ("a man").
    """
    masks = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidate, references, beta=1.2):
    """ROUGE-L of one image, as pycocoevalcap's Rouge: F-measure of the best precision and recall.

    P = max_r LCS(c, r) / |c|,  R = max_r LCS(c, r) / |r|  (each maximised separately),
    ROUGE-L = (1 + beta^2) P R / (R + beta^2 P), or 0 when P or R is 0.
    Worked example: c = "a man riding a horse", r = "a man on a horse": LCS = 4 ("a man a horse"),
    P = 4/5, R = 4/5, ROUGE-L = 0.8. The toolkit splits on " ", so an empty caption is [""].
    """
    candidate = candidate or [""]
    prec, rec = 0.0, 0.0
    for ref in references:
        ref = ref or [""]
        lcs = lcs_length(ref, candidate)
        prec = max(prec, lcs / len(candidate))
        rec = max(rec, lcs / len(ref))
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec)


@functools.lru_cache(maxsize=8)
def idf_by_df(n_images):
    """CIDEr-D's idf of an n-gram by its document frequency d = 0..n_images, as a table.

    idf(d) = log(n_images) - log(max(1, d)): 0 for an n-gram in every image's references, and
    log(n_images) for one in a single image's or in none. The table (cached per corpus size) turns
    one logarithm per n-gram into one index. idf_by_df(2) -> (log 2, log 2, 0.0).
    """
    log_images = math.log(n_images)
    return tuple(log_images - math.log(max(1, d)) for d in range(n_images + 1))


# exercise: tfidf_vector (docs/exercises.md)
def tfidf_vector(counts, df, n_images):
    """CIDEr-D's tf-idf vector of one caption, one {n-gram: weight} dict per order.

    w(g) = count(g) * (log(n_images) - log(max(1, df(g)))), with counts = `ngrams(tokens)` and df(g)
    the number of images whose references contain g (at most n_images). An n-gram every image's
    references contain weighs 0; one no reference contains weighs count * log(n_images).
    Worked example, "a dog a dog" over 2 images where df("a") = 2 and df of the rest is 1:
    [{("a",): 2 * (log 2 - log 2) = 0, ("dog",): 2 * log 2}, {("a", "dog"): 2 log 2, ("dog", "a"): log 2}].
    `cider_d_image` weighs every candidate and reference through this function.
    """
    idf = idf_by_df(n_images)  # idf[d], the formula's bracket for df(g) = d
    return [{g: tf * idf[df.get(g, 0)] for g, tf in ck.items()} for ck in counts]


def cider_d_image(cand, refs, df, n_images, sigma=6.0):
    """CIDEr-D of one image: 10 * mean over references of `sum_k cos_k / n * length penalty`.

    cand: `ngrams(candidate)`; refs: [`ngrams(reference)`]; df: {n-gram: number of images whose
    references contain it}; n_images: the number of images scored together. With w = `tfidf_vector`
    of each order k,
        cos_k = sum_g min(w_c(g), w_r(g)) * w_r(g) / (|w_c| |w_r|)   (clipped cosine, 0 if a norm is 0)
        penalty = exp(-(l_c - l_r)^2 / (2 sigma^2)), l = number of bigrams (the toolkit's "length").
    """
    n = len(cand)
    vec = tfidf_vector(cand, df, n_images)  # (n, {g: w})
    norm = [math.hypot(*v.values()) for v in vec]
    length = sum(cand[1].values())
    total = 0.0
    for ref in refs:
        # An order in which the reference shares no n-gram with the candidate has cos_k = 0
        # whatever its weights, so it is weighed as empty (norm 0). Most 3- and 4-gram orders of
        # most references are such; weighing them all would make CIDEr-D about 25% slower.
        shared = [ck.keys() & rk.keys() for ck, rk in zip(cand, ref)]  # (n, {g})
        ref_vec = tfidf_vector([rk if sk else {} for rk, sk in zip(ref, shared)], df, n_images)
        val = 0.0
        for vk, nk, wk, sk in zip(vec, norm, ref_vec, shared):
            ref_norm = math.hypot(*wk.values())
            if nk and ref_norm:
                dot = 0.0
                for g in sk:
                    dot += min(vk[g], wk[g]) * wk[g]
                val += dot / (nk * ref_norm)
        delta = length - sum(ref[1].values())
        total += val * math.exp(-(delta * delta) / (2 * sigma ** 2)) / n
    return 10.0 * total / len(refs)


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D, as pycocoevalcap 1.2's `Cider` (which is CIDEr-D): (mean, per-image list).

    candidates: list of token lists; references: list of lists of token lists. Document
    frequencies come from the references of the evaluated images only, so a score depends on the
    set of images scored together (as in the toolkit).
    Worked example with two images, refs {1: ["a dog"], 2: ["a cat"]} and candidate "a dog" for
    image 1: log(#images) = log 2; df("a") = 2 so "a" weighs log 2 - log 2 = 0; df("dog") = 1 so
    "dog" weighs log 2 = 0.693, and so does the bigram "a dog" (df 1). Unigram vectors
    ("a": 0, "dog": 0.693) and the same for the reference: cosine 1; bigram cosine 1; no 3- or
    4-grams: 0. Both have 1 bigram, penalty 1. CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5.0.
    """
    cand_counts = [ngrams(c, n) for c in candidates]
    ref_counts = [[ngrams(r, n) for r in refs] for refs in references]
    df = Counter()
    for refs in ref_counts:
        df.update(set().union(*(ck.keys() for r in refs for ck in r)))
    n_images = len(references)
    scores = [cider_d_image(c, r, df, n_images, sigma) for c, r in zip(cand_counts, ref_counts)]
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ----------------------------------------------------------------------------------------------
# The public API: raw strings in, the toolkit's scores out

def _check_inputs(candidates, references):
    """One-line ValueError naming the offending id, for everything the toolkit would assert on."""
    if not isinstance(candidates, dict) or not isinstance(references, dict):
        raise ValueError("candidates and references must be dicts {image id: caption(s)}")
    if not candidates:
        raise ValueError("no candidates to score")
    for key, cap in candidates.items():
        if key not in references:
            raise ValueError(f"candidate for image id {key!r} has no references")
        if not isinstance(cap, str):
            raise ValueError(f"candidate for image id {key!r} is {type(cap).__name__}, not a string")
    for key, refs in references.items():
        if key not in candidates:
            raise ValueError(f"references for image id {key!r} have no candidate caption")
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f"references for image id {key!r} must be a list of strings")
        if not refs:
            raise ValueError(f"reference list for image id {key!r} is empty")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"a reference for image id {key!r} is not a string")


def _toolkit_words(tokens):
    """Tokens as the toolkit's BLEU and CIDEr-D see them after joining with spaces.

    Those split on any whitespace, so a PTB token with a no-break space inside ("1\u00a01/2", from
    "1 1/2") counts as two words there, while ROUGE-L (split on " " only) sees one.
    """
    joined = " ".join(tokens)
    return list(tokens) if joined.isascii() else joined.split()


def score_tokens(candidates, references):
    """`score` on already tokenized captions: {id: tokens} and {id: [tokens, ...]}."""
    ids = list(candidates)
    cands = [list(candidates[i]) for i in ids]
    refs = [[list(r) for r in references[i]] for i in ids]
    rouge = [rouge_l(c, r) for c, r in zip(cands, refs)]
    cands = [_toolkit_words(c) for c in cands]
    refs = [[_toolkit_words(r) for r in rs] for rs in refs]
    corpus_bleu, image_bleu = bleu(cands, refs)
    cider, image_cider = cider_d(cands, refs)
    result = {f"BLEU-{k + 1}": s for k, s in enumerate(corpus_bleu)}
    result["ROUGE-L"] = sum(rouge) / len(rouge)
    result["CIDEr-D"] = cider
    result["per_image"] = {"CIDEr-D": dict(zip(ids, image_cider)), "ROUGE-L": dict(zip(ids, rouge)),
                           "BLEU-4": dict(zip(ids, image_bleu[3]))}
    return result


def score(candidates: dict, references: dict) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D of captions, as pycocoevalcap 1.2 computes them.

    Equal to the toolkit within 1e-9 given the same tokens; `ptb_tokenize` gives its tokens.
    CIDEr-D's document frequencies come from these references, so score a whole split at once.
    candidates: {image id: caption}; references: {image id: [caption, ...]} with the same ids.
    Returns {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr-D": float, "per_image": {"CIDEr-D" | "ROUGE-L" |
    "BLEU-4": {image id: float}}}. Raises ValueError (one line, naming the id) on bad input.
    An empty candidate is valid and scores 0.
    """
    _check_inputs(candidates, references)
    return score_tokens({k: _ptb_tokenize_cached(c) for k, c in candidates.items()},
                        {k: [_ptb_tokenize_cached(r) for r in refs] for k, refs in references.items()})


def java_scores(candidates: dict, references: dict, metrics=java_metrics.METRICS) -> tuple[dict, list[str]]:
    """METEOR and SPICE (java_metrics.py) of raw captions, each where it can run here.

    Returns ({"METEOR" | "SPICE": mean}, [one line for each metric not computed, saying what is
    missing and how to get it]). Captions are PTB-tokenized first, as the toolkit does.
    """
    cands = {k: _ptb_tokenize_cached(c) for k, c in candidates.items()}
    refs = {k: [_ptb_tokenize_cached(r) for r in references[k]] for k in candidates}
    scores, notes = {}, []
    for name in metrics:
        compute = java_metrics.meteor if name == "METEOR" else java_metrics.spice
        try:
            scores[name], _ = compute(cands, refs)
        except RuntimeError as err:
            notes.append(f"{name}: not computed: {err}")
    return scores, notes


# ----------------------------------------------------------------------------------------------
# COCO formats: result files and caption annotations


def coco_ids(ids) -> dict:
    """{id: its COCO image id}: integers when every id is a number (COCO's and Flickr30k's ids
    are), else the ids as they are, so that a result file and its annotations always agree."""
    ids = list(ids)
    numeric = all(isinstance(i, int) or (isinstance(i, str) and i.isdigit()) for i in ids)
    return {i: int(i) if numeric else i for i in ids}


def coco_results(captions: dict) -> list[dict]:
    """{id: caption} -> COCO's result format [{"image_id", "caption"}, ...], the file that
    `load_results` and pycocoevalcap (COCO.loadRes, COCOEvalCap) read."""
    key = coco_ids(captions)
    return [{"image_id": key[i], "caption": c} for i, c in captions.items()]


def coco_annotations(references: dict, file_names: dict | None = None) -> dict:
    """{id: [captions]} -> COCO's caption annotations ({"images", "annotations", ...}), the file
    that `load_references` and pycocotools' COCO read; `file_names` {id: name} is optional."""
    key, names = coco_ids(references), file_names or {}
    annotations = [{"image_id": key[i], "id": n, "caption": c}
                   for n, (i, c) in enumerate((i, c) for i, caps in references.items() for c in caps)]
    images = [{"id": key[i], **({"file_name": names[i]} if i in names else {})} for i in references]
    return {"info": {}, "licenses": [], "type": "captions", "images": images,
            "annotations": annotations}


# ----------------------------------------------------------------------------------------------
# Command line: COCO result files against COCO or Karpathy annotations

def load_results(path):
    """COCO result format [{"image_id": id, "caption": str}, ...] -> {id: caption}."""
    content = data.read_json(path)
    if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
        raise ValueError(f"{path}: expected a list of {{\"image_id\", \"caption\"}} objects")
    results = {}
    for r in content:
        if "image_id" not in r or "caption" not in r:
            raise ValueError(f"{path}: entry {r!r:.80} lacks \"image_id\" or \"caption\"")
        if r["image_id"] in results:
            raise ValueError(f"{path}: image id {r['image_id']!r} appears twice")
        results[r["image_id"]] = r["caption"]
    if not results:
        raise ValueError(f"{path}: no results")
    return results


def load_references(path):
    """{str(id): [captions]} from COCO captions or Karpathy split JSON.

    COCO: {"annotations": [{"image_id", "caption"}, ...]}. Karpathy (dataset_coco.json):
    {"images": [{"cocoid"?, "imgid", "filename", "sentences": [{"raw"}]}]}: each image is found
    under its "cocoid" when it has one (COCO result files use COCO ids), else under its "imgid",
    and also under its file name without extension.
    """
    content = data.read_json(path)
    refs = {}
    if isinstance(content, dict) and isinstance(content.get("annotations"), list):
        for a in content["annotations"]:
            if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
                raise ValueError(f"{path}: annotation {a!r:.80} lacks \"image_id\" or \"caption\"")
            refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    elif isinstance(content, dict) and isinstance(content.get("images"), list):
        for img in content["images"]:
            if not isinstance(img, dict) or not isinstance(img.get("sentences"), list):
                raise ValueError(f"{path}: image entry {img!r:.80} lacks a \"sentences\" list")
            caps = [s.get("raw") if isinstance(s, dict) else s for s in img["sentences"]]
            keys = [img.get("cocoid", img.get("imgid"))]
            if "filename" in img:
                keys.append(Path(img["filename"]).stem)
            for k in keys:
                if k is not None:
                    refs.setdefault(str(k), caps)
    else:
        raise ValueError(f"{path}: neither COCO captions ({{\"annotations\": [...]}}) "
                         f"nor Karpathy split format ({{\"images\": [...]}})")
    return refs


def evaluate_files(results_path, annotations_path, java=()):
    """Score a result file against an annotation file, on the images of the result file; `java`
    names the Java metrics to add ("METEOR", "SPICE"), a RuntimeError when one cannot run."""
    results = load_results(results_path)
    refs = load_references(annotations_path)
    missing = [k for k in results if str(k) not in refs]
    if missing:
        raise ValueError(f"image id {missing[0]!r} of {results_path} has no references "
                         f"in {annotations_path}")
    references = {k: refs[str(k)] for k in results}
    scores = score(results, references)
    extra, notes = java_scores(results, references, java)
    if notes:
        raise RuntimeError(notes[0])
    scores.update({f"{name} (pycocoevalcap, Java)": value for name, value in extra.items()})
    return scores


def build_parser() -> argparse.ArgumentParser:
    """`python evaluate.py RESULTS ANNOTATIONS [--json] [--meteor] [--spice]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="COCO result JSON: [{\"image_id\", \"caption\"}, ...]")
    parser.add_argument("annotations", help="COCO captions or Karpathy split JSON (dataset_coco.json)")
    parser.add_argument("--json", action="store_true", help="print all scores, per image too, as JSON")
    parser.add_argument("--meteor", action="store_true", help="add METEOR via pycocoevalcap (needs Java)")
    parser.add_argument("--spice", action="store_true",
                        help="add SPICE via pycocoevalcap (needs Java and Stanford CoreNLP 3.6.0)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    java = [name for name, asked in (("METEOR", args.meteor), ("SPICE", args.spice)) if asked]
    try:
        scores = evaluate_files(args.results, args.annotations, java)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(scores, indent=1))
        return 0
    n = len(scores["per_image"]["CIDEr-D"])
    print(f"{n} images; scores in the toolkit's units, (x100) as papers print them")
    for name, value in scores.items():
        if name != "per_image":
            print(f"{name:<30} {value:8.4f}  ({100 * value:6.1f})")
    for name in java_metrics.METRICS:
        if name not in java:
            print(f"{name}: omitted (it runs in Java; --{name.lower()} adds it through pycocoevalcap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
