"""evaluate.py against the COCO caption toolkit (pycocoevalcap 1.2): metrics, tokenizer, bad input, CLI.

Parity tests feed the toolkit the same tokens (space-joined) and require every score, corpus and
per image, within 1e-9. The tokenizer is compared with the toolkit's Java PTBTokenizer in a single
Java run (marked `java`); the worked examples of the docstrings are checked too.
"""
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate

ROOT = Path(evaluate.__file__).resolve().parent
bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge, my_lcs  # noqa: E402

TOL = 1e-9


# ----------------------------------------------------------------------------------------------
# Parity of the metrics with the toolkit, given the same tokens

def toolkit_scores(cands, refs):
    """pycocoevalcap's BLEU, ROUGE-L and CIDEr on {id: tokens}, {id: [tokens]}."""
    res = {k: [" ".join(v)] for k, v in cands.items()}
    gts = {k: [" ".join(r) for r in refs[k]] for k in cands}
    bleu, bleu_img = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_img = Rouge().compute_score(gts, res)
    cider, cider_img = Cider().compute_score(gts, res)
    ids = list(gts)
    return {"BLEU": bleu, "BLEU-4 img": dict(zip(ids, bleu_img[3])), "ROUGE-L": rouge,
            "ROUGE-L img": dict(zip(ids, rouge_img)), "CIDEr": cider, "CIDEr img": dict(zip(ids, cider_img))}


def assert_parity(ours, kit):
    for k in range(4):
        assert ours[f"BLEU-{k + 1}"] == pytest.approx(kit["BLEU"][k], abs=TOL)
    assert ours["ROUGE-L"] == pytest.approx(kit["ROUGE-L"], abs=TOL)
    assert ours["CIDEr-D"] == pytest.approx(kit["CIDEr"], abs=TOL)
    for name, key in (("BLEU-4", "BLEU-4 img"), ("ROUGE-L", "ROUGE-L img"), ("CIDEr-D", "CIDEr img")):
        assert ours["per_image"][name].keys() == kit[key].keys()
        for i, v in kit[key].items():
            assert ours["per_image"][name][i] == pytest.approx(v, abs=TOL), (name, i)


EDGE_CANDS = {
    "empty": [], "one word": ["dog"], "exact": "a man riding a horse".split(),
    "repeats": "a a a a dog dog".split(), "long": ("a man on a horse " * 6).split(),
    "unseen": "zebra quartz xylophone".split(), "tie": "a b c d".split(), "common": "a the".split(),
    "cased": "A Man".split(), "empty ref": "a man".split(), "no-break space": ["a", "1\u00a01/2", "cup"],
}
EDGE_REFS = {
    "empty": [["a", "dog"], ["a", "cat", "sits"]], "one word": [["dog"], ["a", "dog"]],
    "exact": ["a man riding a horse".split(), "a person on a horse".split()],
    "repeats": [["a", "dog"], "a dog and a dog".split()], "long": ["a man on a horse".split()] * 3,
    "unseen": [["a", "cat"]], "tie": [["a", "b", "c"], "a b c d e".split()], "common": [["a", "the"]] * 4,
    "cased": [["a", "man"]], "empty ref": [[], ["a", "man", "walks"]],
    "no-break space": [["a", "1\u00a01/2", "cup"], ["1", "1/2", "cup"]],
}


def test_parity_edge_cases():
    assert_parity(evaluate.score_tokens(EDGE_CANDS, EDGE_REFS), toolkit_scores(EDGE_CANDS, EDGE_REFS))


def test_parity_single_image_and_idf_zero():
    # One image: log(#images) = 0, every tf-idf weight is 0, CIDEr-D is 0 as in the toolkit.
    cands, refs = {"x": ["a", "dog"]}, {"x": [["a", "dog"], ["a", "cat"]]}
    assert_parity(evaluate.score_tokens(cands, refs), toolkit_scores(cands, refs))
    assert evaluate.score_tokens(cands, refs)["CIDEr-D"] == 0.0


def test_parity_random_1000_images():
    rng = random.Random(1234)
    vocab = [f"w{i}" for i in range(40)]

    def sentence(lo=0):
        return [rng.choice(vocab) for _ in range(rng.randint(lo, 16))]

    refs = {i: [sentence(1) for _ in range(5)] for i in range(1000)}
    cands = {i: sentence() if rng.random() < 0.7 else list(rng.choice(refs[i])) for i in range(1000)}
    assert_parity(evaluate.score_tokens(cands, refs), toolkit_scores(cands, refs))


def test_lcs_matches_toolkit_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert evaluate.lcs_length(a, b) == my_lcs(a, b)


# ----------------------------------------------------------------------------------------------
# The worked examples in the docstrings

def test_docstring_examples():
    assert evaluate.ngrams(["a", "dog", "a", "dog"], 2) == [{("a",): 2, ("dog",): 2},
                                                            {("a", "dog"): 2, ("dog", "a"): 1}]
    log2 = math.log(2)
    df = {("a",): 2, ("dog",): 1, ("a", "dog"): 1, ("dog", "a"): 1}
    assert evaluate.idf_by_df(2) == pytest.approx((log2, log2, 0.0))
    got = evaluate.tfidf_vector(evaluate.ngrams("a dog a dog".split(), 2), df, 2)
    want = [{("a",): 0.0, ("dog",): 2 * log2}, {("a", "dog"): 2 * log2, ("dog", "a"): log2}]
    assert len(got) == 2 and all(g == pytest.approx(w) for g, w in zip(got, want))
    assert evaluate.lcs_length("a man on a horse".split(), "a horse and a man".split()) == 2
    assert evaluate.rouge_l("a man riding a horse".split(), ["a man on a horse".split()]) == pytest.approx(0.8)
    corpus, _ = evaluate.bleu([["a", "dog", "runs"]], [[["a", "dog", "runs", "fast"]]])
    bp = math.exp(1 - 4 / 3)
    assert corpus[:3] == pytest.approx([bp] * 3, rel=1e-8)
    assert corpus[3] == pytest.approx(bp * (1e-15 / 1e-9) ** 0.25, rel=1e-6)
    mean, per_image = evaluate.cider_d([["a", "dog"], ["x"]], [[["a", "dog"]], [["a", "cat"]]])
    assert per_image == pytest.approx([5.0, 0.0]) and mean == pytest.approx(2.5)
    assert evaluate.ptb_tokenize("A man's (red) hat, isn't it?") == [
        "a", "man", "'s", "-lrb-", "red", "-rrb-", "hat", "is", "n't", "it"]


# ----------------------------------------------------------------------------------------------
# Tokenizer: known outputs of the Java PTBTokenizer (no Java needed), then a live comparison

KNOWN = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Don't they're can't won't I'm you'll it's cat's dogs' James's":
        "do n't they 're ca n't wo n't i 'm you 'll it 's cat 's dogs james 's",
    'He said "hello" and \'bye\' to “them”.': "he said hello and bye to them",
    "A (small) dog [on] {the} bed.": "a -lrb- small -rrb- dog -lsb- on -rsb- -lcb- the -rcb- bed",
    "Numbers 3.5 1,000 1/2 10:30 $5 £3 50% #1": "numbers 3.5 1,000 1/2 10:30 $ 5 # 3 50 % # 1",
    "Wait... what?! Yes -- no - maybe—sure…": "wait what ?! yes no maybe sure",
    "A black-and-white photo of a 2-year-old child's toy.": "a black-and-white photo of a 2-year-old child 's toy",
    "  odd   spacing\ttabs  ": "odd spacing tabs",
    "Café naïve 東京 emoji 😀 done": "café naïve 東京 emoji done",
    "cannot gonna o'clock rock 'n' roll ma'am": "can not gon na o'clock rock 'n' roll ma'am",
    "U.S. flag, Mr. Smith, St. Louis, etc.": "u.s. flag mr. smith st. louis etc.",
    "": "",
}


@pytest.mark.parametrize("caption", list(KNOWN))
def test_ptb_tokenize_known_outputs(caption):
    assert evaluate.ptb_tokenize(caption) == KNOWN[caption].split()


JAVA_CASES = list(KNOWN) + [
    "a dog's bone and the dogs' bones and the boss's desk", "it's 5 o'clock", '"quoted at start" and end "',
    "'single at start' and 'tis", "he said 'no.' then \"yes.\"", "a man in a t-shirt -- and a hat-",
    "-leading hyphen and trailing - hyphen", "a 3-d model, 3D, 4x4 truck, 2x", "the 1990s '90s 90's",
    "ca. 3.5m 10km/h 5'10\" 6' tall 12\" pizza", "100 % 100% 3+4=7 x^2 ~5 a|b \\back",
    "two people walking . . .", "the train.The bus", "a.b.c a.b x.y.z. y", "Hello?? Hi!!! wow?!",
    "A sign that says \"STOP\".", "a 'cat' s", "a cat ' s toy", "a cat`s toy cat´s toy cat’s toy",
    "don’t can’t it’s", "I'd've y'all ain't", "a/b and/or 1/2 1 1/2 ½ ¼", "a°C 90° 5×5 3-4 2–3 1—2",
    "© ® ™ • · … ‹ › « »", "α β γ ñ ø ß æ œ Ω", "中文 日本語 한국어 العربية עברית हिन्दी ไทย",
    "emoji 😀 🐶 ❤ ☺ ★", "(a) [b] {c} <d>", "a-b-c a--b a---b a----b", "a_b a__b _a_ @a #a $a",
    "it''s two''", "a man etc. and a dog", "a st. bernard dog", "a no. 5 bus", "approx. 3 dogs",
    "jr. sr. vs. inc. dept. approx. dr. ft. lbs.", "wait.. two dots", "four.... dots", "a man,a dog",
    "CAN'T DON'T IT'S WE'LL", "'em 'cause 'round", "students' work", "o'neil O'Brien McDonald's",
    "AT&T at&t R&D a&b A+B a+b US$5", "email foo@bar.com g@iraffe www.google.com", "a dog!and a cat?yes",
    "x²  H₂O 3¾ ⅓", "a • b · c ¡hola! ¿que?", "a>b a<b x<y> a<<b>>", "c# f# c++", "a pi😀zza",
    "vitamin c. A dog", "x C. The cat", "x C. b", "a zero\u200bwidth and ideo\u3000space",
]


@pytest.mark.slow
@pytest.mark.java
def test_tokenizer_agreement_on_generated_captions():
    # bench/bench_tokenizer.py's measurement as a regression guard: 5,000 generated COCO-like
    # captions, one Java run. Measured 99.87% (the rest: a caption-final "c." that Java decides by
    # looking into the next caption of its batch).
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    spec = importlib.util.spec_from_file_location("bench_tokenizer", ROOT / "bench" / "bench_tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(0)
    captions = [bench.caption(rng) for _ in range(5000)]
    java = bench.java_tokenize(captions)
    agree = sum(evaluate.ptb_tokenize(c) == j for c, j in zip(captions, java)) / len(captions)
    assert agree >= 0.995


@pytest.fixture(scope="module")
def java_tokens():
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    # Each case is followed by a caption starting with "A" in the Java run, as in COCO
    # reference lists (the lexer looks into the next line for a caption-final "c.").
    batch = {i: [{"caption": c}, {"caption": "A dog."}] for i, c in enumerate(JAVA_CASES)}
    out = PTBTokenizer().tokenize(batch)
    return {JAVA_CASES[i]: (v[0].split(" ") if v[0] else []) for i, v in out.items()}


@pytest.mark.java
def test_ptb_tokenize_matches_java(java_tokens):
    ours = {c: evaluate.ptb_tokenize(c) for c in java_tokens}
    mismatches = {c: (j, ours[c]) for c, j in java_tokens.items() if ours[c] != j}
    assert not mismatches


@pytest.mark.java
def test_score_raw_strings_matches_toolkit_pipeline(java_tokens):
    # The full pipeline: raw captions in, the toolkit's tokenizer (Java) plus its metrics as reference.
    caps = [c for c in JAVA_CASES if java_tokens[c]]
    cands = {i: caps[i] for i in range(0, len(caps) - 3, 3)}
    refs = {i: caps[i + 1:i + 4] for i in cands}
    kit = toolkit_scores({i: java_tokens[c] for i, c in cands.items()},
                         {i: [java_tokens[r] for r in rs] for i, rs in refs.items()})
    assert_parity(evaluate.score(cands, refs), kit)


# ----------------------------------------------------------------------------------------------
# The API: bad input and empty captions

def test_empty_candidate_scores_zero():
    out = evaluate.score({1: "", 2: "a dog"}, {1: ["a cat sits"], 2: ["a dog runs"]})
    assert out["per_image"]["CIDEr-D"][1] == 0.0
    assert out["per_image"]["BLEU-4"][1] == 0.0 and out["per_image"]["ROUGE-L"][1] == 0.0


@pytest.mark.parametrize("cands, refs, words", [
    ({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, "2"),
    ({1: "a dog"}, {1: ["a dog"], 7: ["x"]}, "7"),
    ({1: "a dog"}, {1: []}, "empty"),
    ({1: None}, {1: ["a dog"]}, "not a string"),
    ({1: "a dog"}, {1: ["a dog", 3]}, "not a string"),
    ({1: "a dog"}, {1: "a dog"}, "list of strings"),
    ({}, {}, "no candidates"),
    ([("a", "b")], {1: ["a"]}, "dicts"),
])
def test_score_bad_input_one_line_error(cands, refs, words):
    with pytest.raises(ValueError) as err:
        evaluate.score(cands, refs)
    assert words in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# The command line on both annotation formats

RESULTS = [{"image_id": 42, "caption": "A man riding a horse."}, {"image_id": 7, "caption": "a dog on a couch"}]
REFS = {42: ["A man rides a horse.", "A person on a brown horse."],
        7: ["A dog lying on a couch.", "A puppy sleeps."]}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def coco_annotations():
    return {"images": [{"id": k} for k in REFS],
            "annotations": [{"image_id": k, "id": i, "caption": c} for i, (k, c) in
                            enumerate((k, c) for k, cs in REFS.items() for c in cs)]}


def karpathy_annotations(with_cocoid=True):
    images = []
    for n, (k, caps) in enumerate(REFS.items()):
        img = {"filename": f"COCO_val2014_{k:012d}.jpg", "imgid": n, "split": "test",
               "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]}
        if with_cocoid:
            img["cocoid"] = k
        images.append(img)
    return {"images": images, "dataset": "coco"}


def run_cli(args, capsys):
    code = evaluate.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("annotations", ["coco", "karpathy"])
def test_cli_json_matches_api(tmp_path, capsys, annotations):
    ann = coco_annotations() if annotations == "coco" else karpathy_annotations()
    args = [write(tmp_path, "res.json", RESULTS), write(tmp_path, "ann.json", ann), "--json"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    printed = json.loads(out)
    expected = evaluate.score({r["image_id"]: r["caption"] for r in RESULTS}, REFS)
    assert printed["CIDEr-D"] == pytest.approx(expected["CIDEr-D"])
    assert printed["per_image"]["ROUGE-L"]["42"] == pytest.approx(expected["per_image"]["ROUGE-L"][42])


@pytest.mark.parametrize("key", ["filename stem", "imgid"])
def test_cli_karpathy_without_cocoid(tmp_path, capsys, key):
    ids = {42: 0, 7: 1} if key == "imgid" else {42: "COCO_val2014_000000000042", 7: "COCO_val2014_000000000007"}
    results = [{"image_id": ids[r["image_id"]], "caption": r["caption"]} for r in RESULTS]
    ann = write(tmp_path, "ann.json", karpathy_annotations(with_cocoid=False))
    code, out, _ = run_cli([write(tmp_path, "res.json", results), ann, "--json"], capsys)
    expected = evaluate.score({r["image_id"]: r["caption"] for r in RESULTS}, REFS)
    assert code == 0 and json.loads(out)["CIDEr-D"] == pytest.approx(expected["CIDEr-D"])


def test_cli_table_says_what_is_omitted(tmp_path, capsys):
    code, out, _ = run_cli([write(tmp_path, "res.json", RESULTS), write(tmp_path, "ann.json", coco_annotations())],
                           capsys)
    assert code == 0 and "CIDEr-D" in out and "METEOR: omitted" in out and "SPICE: omitted" in out


@pytest.mark.parametrize("results, annotations, words", [
    ("[{]", None, "not valid JSON"),
    (RESULTS + [{"image_id": 99, "caption": "x"}], None, "99"),
    (RESULTS + [RESULTS[0]], None, "twice"),
    ([{"image_id": 42}], None, "lacks"),
    ([{"image_id": 42, "caption": 5}, RESULTS[1]], None, "not a string"),
    (RESULTS, {"foo": []}, "neither COCO"),
])
def test_cli_bad_input_exit_code_2(tmp_path, capsys, results, annotations, words):
    res = write(tmp_path, "res.json", results)
    ann = write(tmp_path, "ann.json", annotations or coco_annotations())
    code, out, err = run_cli([res, ann], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and out == ""


def test_cli_missing_file_subprocess(tmp_path):
    # A real process: exit status 2 and one line naming the file, no traceback.
    ann = write(tmp_path, "ann.json", coco_annotations())
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "nope.json"), ann],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.json" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.java
def test_cli_meteor_through_toolkit(tmp_path, capsys):
    code, out, _ = run_cli([write(tmp_path, "res.json", RESULTS), write(tmp_path, "ann.json", coco_annotations()),
                            "--json", "--meteor"], capsys)
    assert code == 0 and 0 < json.loads(out)["METEOR (pycocoevalcap, Java)"] <= 1
