"""The paper-scale path end to end through the real command line (issue 6's Tests section).

On the fixture of tests/fixtures.py (a dozen small images, a Karpathy split file, a corpus file,
random-weight GPT-2 / RoBERTa / CLIP in the released formats): `prepare`, `init`, `train` and
`eval`, in-domain, with an external corpus file, and zero-shot (ZS-IC: trained on uncaptioned "web"
images and a corpus file, scored on the COCO-format and Flickr30k-format test splits). The presets
carry the paper's settings, and a missing download fails with a one-line message naming it. A slow
test builds the real-sized models (GPT-2 124M, RoBERTa-base, ViT-L/14 CLIP; random weights) and runs
one training step on the CPU.
"""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import cli as cgtgan_cli
import commands
import config
import data
import evaluate
import java_metrics
import realdata
import train
from fixtures import build_paperscale_fixture, save_full_size_clip, save_full_size_models

# Tiny training settings: seconds per stage on the fixture (step counts, not the presets' epochs).
TINY = {"init.steps": 3, "init.epochs": 0, "init.batch": 4, "gan.steps": 2, "gan.epochs": 0,
        "gan.batch": 2, "gan.k": 2, "gan.eval_every": 1, "gen.max_len": 8}


def cli(argv: list[str]) -> tuple[int, str, str]:
    """cli.main in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cgtgan_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def sets(options: dict) -> list[str]:
    return [a for key, value in options.items() for a in ("--set", f"{key}={value}")]


def real_options(fx, cache: Path, **extra) -> dict:
    """--set options that point `data=real` at the fixture's files and models."""
    return {"data": "real", "real.split_file": fx.split_file, "real.image_root": fx.image_root,
            "real.clip": fx.clip, "real.clip_bpe": fx.clip_bpe, "real.gpt2": fx.gpt2,
            "real.roberta": fx.roberta, "real.cache_dir": cache, "real.workers": 0,
            "real.batch_size": 4, "real.progress": "false", **extra}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_paperscale_fixture(tmp_path_factory.mktemp("paperscale_cli"))


@pytest.fixture(scope="module")
def in_domain(fx, tmp_path_factory):
    """prepare -> init -> train -> eval through the CLI, in-domain corpus; every command's output."""
    root = tmp_path_factory.mktemp("in_domain")
    argv = sets({**real_options(fx, root / "cache"), **TINY, "runs_dir": root / "runs"})
    outputs = {"prepare": cli(["prepare"] + argv),
               "init": cli(["init", "--name", "coco"] + argv),
               "train": cli(["train", "--name", "coco"] + argv),
               "caption": cli(["caption", str(next(Path(fx.image_root).rglob("*.jpg"))),
                               "--run", str(root / "runs" / "coco")])}
    # eval as a user runs it (METEOR and SPICE where they can run), here as on a machine without
    # Java, so that it stays fast; test_eval_meteor_through_java runs the real thing.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(java_metrics, "missing", lambda metric: f"{metric} needs Java on PATH (test)")
        outputs["eval"] = cli(["eval", "--run", str(root / "runs" / "coco"), "--split", "test"])
    return root, root / "runs" / "coco", outputs


def test_cli_prepare_writes_caches_and_references(fx, in_domain):
    root, _, outputs = in_domain
    code, out, err = outputs["prepare"]
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["train"], summary["val"], summary["test"]) == (8, 2, 2)  # restval is train
    assert summary["corpus"] == 28 and summary["agg_temperature"] == 100.0
    for split in ("val", "test"):
        refs = json.loads(Path(summary["references"][split]).read_text())
        assert len(refs["images"]) == 2 and len(refs["annotations"]) == 10
    assert list((root / "cache" / "coco").glob("agg-*.safetensors"))


def test_cli_init_then_train_then_eval(fx, in_domain):
    _, run_dir, outputs = in_domain
    for command in ("init", "train", "eval", "caption"):
        assert outputs[command][0] == 0, (command, outputs[command][2])
    assert len(outputs["caption"][1].splitlines()) == 1  # a paper-scale run captions a file too
    assert "text-only init" in outputs["init"][1] and "CIDEr-D" in outputs["init"][1]
    # train reuses the initialisation `init` wrote (same data, seed, generator and init settings).
    assert "reusing the text-only initialisation" in outputs["train"][1]
    for name in ("config.json", "init.pt", "last.pt", "best.pt", "metrics.jsonl", "results.json"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"] == "real" and config["real"]["split_file"] == str(fx.split_file)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["stage"] == "gan" and "loss_g" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r[k]) for r in steps for k in ("loss_g", "d_loss", "r_cos", "r_agg"))
    assert any("val_CIDEr-D" in r for r in records)
    results = json.loads((run_dir / "results.json").read_text())
    gan_row = results["test"]["CgT-GAN (agg+gan)"]
    # `eval` prints the test metrics of best.pt: the same numbers as the run's own test table.
    lines = [line for line in outputs["eval"][1].splitlines() if line.startswith("coco (best.pt)")]
    assert len(lines) == 1
    printed = [float(v) for v in lines[0].split()[2:5]]
    assert printed == [round(gan_row[k], 1) for k in ("CIDEr-D", "BLEU-4", "ROUGE-L")]


def test_cli_train_table_names_the_dataset(in_domain):
    out = in_domain[2]["train"][1]
    assert "coco test split" in out and "ShapesWorld" not in out


# ----------------------------------------------------------------------------------------------
# eval's COCO result file, read by evaluate.py and by pycocoevalcap; METEOR and SPICE


def test_eval_names_each_java_metric_it_could_not_compute(in_domain):
    code, out, err = in_domain[2]["eval"]
    assert code == 0 and "Traceback" not in err
    assert "METEOR: not computed: METEOR needs Java on PATH (test)" in out
    assert "SPICE: not computed: SPICE needs Java on PATH (test)" in out


def test_eval_writes_a_coco_result_file_evaluate_py_reads(fx, in_domain):
    root, run_dir, outputs = in_domain
    saved = json.loads((run_dir / "eval-coco-test-best.json").read_text())
    results_file = run_dir / "captions-coco-test-best.json"
    # COCO's integer ids (the test images' cocoid), with the captions eval scored.
    results = json.loads(results_file.read_text())
    assert results == [{"image_id": int(i), "caption": c} for i, c in saved["captions"].items()]
    assert sorted(r["image_id"] for r in results) == [1010, 1011]
    references_file = run_dir / "references-coco-test.json"
    assert f"python evaluate.py {results_file} {references_file}" in outputs["eval"][1]
    assert evaluate.load_results(results_file) == {int(i): c for i, c in saved["captions"].items()}
    # The same scores against eval's references, prepare's and the Karpathy split file.
    for annotations in (references_file, root / "cache" / "coco" / "refs_test.json", fx.split_file):
        scores = evaluate.evaluate_files(results_file, annotations)
        for key in ("CIDEr-D", "BLEU-4", "ROUGE-L"):
            assert 100 * scores[key] == pytest.approx(saved["metrics"][key]), (annotations, key)


def test_eval_coco_files_read_in_pycocotools(in_domain):
    coco = pytest.importorskip("pycocotools.coco")
    run_dir = in_domain[1]
    for references in ("references-coco-test.json", "../../cache/coco/refs_test.json"):
        gts = coco.COCO(str(run_dir / references))
        res = gts.loadRes(str(run_dir / "captions-coco-test-best.json"))
        assert sorted(res.getImgIds()) == sorted(gts.getImgIds()) == [1010, 1011]
        assert all(len(res.imgToAnns[i]) == 1 and len(gts.imgToAnns[i]) == 5
                   for i in gts.getImgIds())


@pytest.mark.java
def test_eval_scores_equal_cocoevalcaps(in_domain, monkeypatch, capsys):
    """COCOEvalCap (its Java PTB tokenizer, its scorers) on eval's two COCO files gives eval's
    BLEU-4, ROUGE-L and CIDEr(-D); its METEOR and SPICE are stubbed out here."""
    if java_metrics.missing("METEOR"):
        pytest.skip(java_metrics.missing("METEOR"))
    from pycocoevalcap import eval as cocoeval
    from pycocotools.coco import COCO

    class Skipped:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "skipped"

    monkeypatch.setattr(cocoeval, "Meteor", Skipped)
    monkeypatch.setattr(cocoeval, "Spice", Skipped)
    run_dir = in_domain[1]
    gts = COCO(str(run_dir / "references-coco-test.json"))
    toolkit = cocoeval.COCOEvalCap(gts, gts.loadRes(str(run_dir / "captions-coco-test-best.json")))
    toolkit.evaluate()
    saved = json.loads((run_dir / "eval-coco-test-best.json").read_text())["metrics"]
    for ours, theirs in (("CIDEr-D", "CIDEr"), ("BLEU-4", "Bleu_4"), ("ROUGE-L", "ROUGE_L")):
        assert 100 * toolkit.eval[theirs] == pytest.approx(saved[ours], abs=1e-6), ours


@pytest.mark.slow
@pytest.mark.java
def test_eval_meteor_through_java(in_domain):
    """Where Java is present, eval adds METEOR (x100, in its table and its file), and SPICE or the
    one line that names what SPICE lacks."""
    if java_metrics.missing("METEOR"):
        pytest.skip(java_metrics.missing("METEOR"))
    run_dir = in_domain[1]
    code, out, err = cli(["eval", "--run", str(run_dir), "--split", "test"])
    assert code == 0, err
    metrics = json.loads((run_dir / "eval-coco-test-best.json").read_text())["metrics"]
    assert 0 <= metrics["METEOR"] <= 100 and "METEOR" in out.splitlines()[1]
    spice = java_metrics.missing("SPICE")
    assert (f"SPICE: not computed: {spice}" in out) if spice else ("SPICE" in metrics)


def test_cli_external_corpus_file(fx, tmp_path):
    """Cross-domain / zero-shot: training sentences from a text file, cleaned, not the captions."""
    options = {**real_options(fx, tmp_path / "cache", **{"real.corpus": fx.corpus_file}), **TINY,
               "runs_dir": tmp_path / "runs"}
    code, out, err = cli(["prepare"] + sets(options))
    assert code == 0, err
    corpus = realdata.clean_sentences(fx.corpus_file.read_text().splitlines(),
                                      config.RealDataConfig())
    assert json.loads(out)["corpus"] == len(corpus) == 24  # blanks, "Ok." and duplicates dropped
    assert (tmp_path / "cache" / "coco" / "corpus-corpus").is_dir()
    code, out, err = cli(["train", "--name", "gcc"] + sets(options))
    assert code == 0, err
    run_dir = tmp_path / "runs" / "gcc"
    cfg = config.config_from_dict(json.loads((run_dir / "config.json").read_text()))
    assert commands.load_data(cfg).corpus == corpus
    assert (run_dir / "best.pt").is_file() and (run_dir / "results.json").is_file()


# ----------------------------------------------------------------------------------------------
# Presets: the paper's settings, and one-line errors for missing downloads


PRESET_SETTINGS = {  # preset: (CLIP-agg t, epochs, corpus, training split file, eval split file)
    "coco": (100.0, 50, "in-domain", "dataset_coco.json", ""),
    "flickr30k": (125.0, 50, "in-domain", "dataset_flickr30k.json", ""),
    "coco-shutterstock": (100.0, 50, "data/shutterstock.txt", "dataset_coco.json", ""),
    "coco-flickr30k": (125.0, 50, "data/flickr30k_captions.txt", "dataset_coco.json", ""),
    "flickr30k-coco": (125.0, 50, "data/coco_captions.txt", "dataset_flickr30k.json", ""),
    "coco-gcc": (175.0, 80, "data/gcc.txt", "dataset_coco.json", ""),
    "zsic": (175.0, 80, "data/gcc.txt", "dataset_web.json", "data/dataset_coco.json"),
}


def test_every_preset_is_tested():
    assert set(PRESET_SETTINGS) == set(config.PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESET_SETTINGS))
def test_preset_has_the_paper_settings(preset, monkeypatch):
    """The data, models and per-setting values of each preset; tests/test_recipe.py checks every
    other setting against the official code's."""
    seen = []
    monkeypatch.setattr(commands, "run_train", lambda cfg, **options: seen.append(cfg))
    code, _, err = cli(["train", "--preset", preset])
    assert code == 0, err
    cfg = seen[0]
    real = commands.real_config(cfg)
    t, epochs, corpus, split_file, eval_split_file = PRESET_SETTINGS[preset]
    assert cfg.data == "real" and real.clip == "ViT-L/14" and real.corpus == corpus
    assert (cfg.gen.prefix_len, cfg.gen.max_len, cfg.gen.end_token) == (10, 20, ".")
    assert (cfg.gan.batch, cfg.gan.epochs, cfg.gan.k, cfg.gan.lr, cfg.init.lr) == (
        128, epochs, 5, 1e-5, 2e-5)
    assert (cfg.gan.reward, cfg.gan.baseline, cfg.gan.lambda_final) == ("agg+gan", "greedy", 0.5)
    assert cfg.gan.lambda_ramp > 0 and cfg.gan.grad_clip == 1.0
    # The temperature of the prepared CLIP-agg targets and of training agree.
    assert real.temperature() == cfg.gan.temperature == t
    assert Path(real.gpt2).name == "gpt2" and Path(real.roberta).name == "roberta-base"
    assert Path(real.split_file).name == split_file and real.eval_split_file == eval_split_file


def test_preset_without_downloads_names_the_split_file(tmp_path):
    code, out, err = cli(["train", "--preset", "coco", "--set",
                          f"real.gpt2={tmp_path / 'nowhere' / 'gpt2'}"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "data/dataset_coco.json does not exist" in err
    assert "Karpathy" in err and "Traceback" not in err


def test_preset_without_clip_weights_names_the_file(fx, tmp_path, monkeypatch):
    monkeypatch.setenv("CGTGAN_CACHE", str(tmp_path / "clip_cache"))
    monkeypatch.setenv("CGTGAN_OFFLINE", "1")
    options = {"real.split_file": fx.split_file, "real.image_root": fx.image_root,
               "real.cache_dir": tmp_path / "cache", "real.workers": 0}
    code, _, err = cli(["prepare", "--preset", "coco"] + sets(options))
    assert code == 2 and err.count("\n") == 1
    assert "cannot load CLIP" in err and str(tmp_path / "clip_cache" / "ViT-L-14.pt") in err


@pytest.fixture(scope="module")
def prepared_cache(fx, tmp_path_factory):
    """The fixture prepared with the coco preset's settings (its corpus cleaning, raw CLIP-agg
    targets), for `train --preset coco` on the fixture."""
    cache = tmp_path_factory.mktemp("preset_cache") / "cache"
    code, _, err = cli(["prepare", "--preset", "coco"] + sets(real_options(fx, cache)))
    assert code == 0, err
    return cache


@pytest.mark.parametrize("model", ["gpt2", "roberta"])
def test_preset_with_a_missing_model_directory(fx, prepared_cache, tmp_path, model):
    """The data is there, a model directory is not: one line naming the directory to fill."""
    missing = tmp_path / "models" / model
    options = {**real_options(fx, prepared_cache), f"real.{model}": missing}
    code, _, err = cli(["train", "--preset", "coco"] + sets(options))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    what = {"gpt2": "GPT-2", "roberta": "RoBERTa"}[model]
    assert f"{what} tokenizer not found at '{missing}'" in err
    assert "hf download" in err and f"--local-dir {missing}" in err


@pytest.mark.parametrize("model,repo", [("gpt2", "gpt2"), ("roberta", "roberta-base")])
def test_missing_model_message_names_the_hub_repository(fx, prepared_cache, tmp_path, model, repo):
    missing = tmp_path / "models" / model
    options = {**real_options(fx, prepared_cache), f"real.{model}": missing}
    code, _, err = cli(["train", "--preset", "coco"] + sets(options))
    assert code == 2 and f"`hf download {repo} --local-dir {missing}`" in err


# ----------------------------------------------------------------------------------------------
# ZS-IC: train without in-domain data, score on other datasets' test splits through `eval`


@pytest.fixture(scope="module")
def zsic(fx, tmp_path_factory):
    """The zsic preset on the fixture: web images + corpus file, validated and tested on the
    COCO-format split; then `eval` on the Flickr30k-format test split, twice (the second reuses
    the embeddings the first cached)."""
    root = tmp_path_factory.mktemp("zsic")
    options = {**real_options(fx, root / "cache"), **TINY, "runs_dir": root / "runs",
               "real.split_file": fx.web_split_file, "real.image_root": fx.web_image_root,
               "real.corpus": fx.corpus_file, "real.eval_split_file": fx.split_file,
               "real.eval_image_root": fx.image_root, "gan.batch": 2, "init.batch": 4}
    argv = ["--preset", "zsic"] + sets(options)
    flickr = sets({"real.eval_split_file": fx.flickr_split_file,
                   "real.eval_image_root": fx.flickr_image_root})
    run = str(root / "runs" / "zsic")
    outputs = {"prepare": cli(["prepare"] + argv), "train": cli(["train", "--name", "zsic"] + argv),
               "eval_coco": cli(["eval", "--run", run, "--fast"]),
               "eval_flickr": cli(["eval", "--run", run, "--fast"] + flickr)}
    return root, root / "runs" / "zsic", outputs, flickr


def test_zsic_prepare_embeds_the_web_images_and_the_eval_dataset(fx, zsic):
    root, _, outputs, _ = zsic
    code, out, err = outputs["prepare"]
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["train"], summary["val"], summary["test"]) == (4, 2, 2)  # web / COCO / COCO
    assert summary["name"] == "web" and summary["eval_dataset"] == "coco"
    # The preset keeps the corpus as written: only blank lines go, duplicates and "Ok." stay.
    assert summary["agg_temperature"] == 175.0 and summary["agg_raw"] is True
    assert summary["corpus"] == len([s for s in fx.corpus_file.read_text().splitlines() if s.strip()])
    assert Path(summary["references"]["test"]) == root / "cache" / "coco" / "refs_test.json"
    assert list((root / "cache" / "coco" / "images").glob("test-*.safetensors"))
    assert not list((root / "cache" / "web" / "images").glob("test-*"))


def test_zsic_train_tests_on_the_other_dataset(zsic):
    _, run_dir, outputs, _ = zsic
    code, out, err = outputs["train"]
    assert code == 0, err
    assert "coco test split (2 images)" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["real"]["corpus"].endswith("corpus.txt")
    assert config["real"]["split_file"].endswith("dataset_web.json")
    # eval without a target scores the run's own evaluation dataset: the test table's numbers.
    code, out, err = outputs["eval_coco"]
    assert code == 0, err
    row = json.loads((run_dir / "results.json").read_text())["test"]["CgT-GAN (agg+gan)"]
    saved = json.loads((run_dir / "eval-coco-test-best.json").read_text())
    assert saved["metrics"]["CIDEr-D"] == pytest.approx(row["CIDEr-D"])


def test_zsic_eval_scores_another_datasets_test_split(fx, zsic):
    root, run_dir, outputs, _ = zsic
    code, out, err = outputs["eval_flickr"]
    assert code == 0, err
    assert "flickr30k test split (3 images)" in out
    saved = json.loads((run_dir / "eval-flickr30k-test-best.json").read_text())
    assert saved["dataset"] == "flickr30k" and len(saved["captions"]) == 3
    assert set(saved["captions"]) == {"4", "5", "6"}  # Flickr30k ids are imgid
    for key in ("CIDEr-D", "BLEU-4", "ROUGE-L"):
        assert math.isfinite(saved["metrics"][key])
    # The Flickr30k test images were embedded on the fly with the run's CLIP, in their own cache.
    assert list((root / "cache" / "flickr30k" / "images").glob("test-*.safetensors"))
    refs = json.loads((root / "cache" / "flickr30k" / "refs_test.json").read_text())
    assert len(refs["images"]) == 3 and len(refs["annotations"]) == 9
    # Its COCO result file uses Flickr30k's integer ids, which the Karpathy file's imgid matches.
    results = run_dir / "captions-flickr30k-test-best.json"
    assert sorted(r["image_id"] for r in json.loads(results.read_text())) == [4, 5, 6]
    scores = evaluate.evaluate_files(results, fx.flickr_split_file)
    assert 100 * scores["CIDEr-D"] == pytest.approx(saved["metrics"]["CIDEr-D"])
    assert "METEOR, SPICE: skipped (--fast)" in out


def test_zsic_eval_reuses_cached_embeddings(fx, zsic, monkeypatch):
    """A second eval on the same split reads the cache: CLIP is never loaded."""
    import clip_model

    _, run_dir, outputs, flickr = zsic
    first = json.loads((run_dir / "eval-flickr30k-test-best.json").read_text())
    monkeypatch.setattr(clip_model, "load", lambda *a, **k: pytest.fail("CLIP was loaded"))
    code, _, err = cli(["eval", "--run", str(run_dir), "--fast"] + flickr)
    assert code == 0, err
    again = json.loads((run_dir / "eval-flickr30k-test-best.json").read_text())
    assert again["metrics"] == first["metrics"] and again["captions"] == first["captions"]


def _one_line_error(argv: list[str]) -> str:
    code, out, err = cli(argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_bad_target_gives_one_line_errors(fx, zsic, tmp_path):
    _, run_dir, _, _ = zsic
    run = ["eval", "--run", str(run_dir)]
    missing = tmp_path / "dataset_nope.json"
    err = _one_line_error(run + sets({"real.eval_split_file": missing,
                                      "real.eval_image_root": fx.flickr_image_root}))
    assert f"split file {missing} does not exist" in err and "real.eval_split_file" in err
    err = _one_line_error(run + sets({"real.eval_split_file": fx.flickr_split_file,
                                      "real.eval_image_root": tmp_path / "no_images"}))
    assert "3 of 3 images listed in" in err and str(fx.flickr_split_file) in err
    assert "fix real.eval_image_root" in err
    err = _one_line_error(run + sets({"real.eval_split_file": fx.web_split_file,
                                      "real.eval_image_root": fx.web_image_root}))
    assert f"split file {fx.web_split_file} has no test images" in err
    err = _one_line_error(run + sets({"real.eval_split_file": fx.flickr_split_file,
                                      "real.eval_image_root": ""}))
    assert "real.eval_image_root is not set" in err


def test_eval_dataset_names_the_missing_download(zsic, tmp_path, monkeypatch):
    """--dataset flickr30k reads the presets' paths; without the download, one line names it."""
    monkeypatch.chdir(tmp_path)
    err = _one_line_error(["eval", "--run", str(zsic[1]), "--dataset", "flickr30k"])
    assert "data/dataset_flickr30k.json does not exist" in err and "Karpathy" in err


def test_eval_dataset_refuses_a_shapesworld_run(tmp_path):
    from dataclasses import asdict

    (tmp_path / "config.json").write_text(json.dumps(asdict(config.Config())))
    err = _one_line_error(["eval", "--run", str(tmp_path), "--dataset", "coco"])
    assert "paper-scale runs (data=real)" in err and "shapesworld" in err


def test_zsic_prepare_without_the_eval_split_file(fx, tmp_path):
    options = {**real_options(fx, tmp_path / "cache"), "real.split_file": fx.web_split_file,
               "real.image_root": fx.web_image_root, "real.corpus": fx.corpus_file,
               "real.eval_split_file": tmp_path / "dataset_coco.json",
               "real.eval_image_root": fx.image_root}
    err = _one_line_error(["prepare"] + sets(options))
    assert f"split file {tmp_path / 'dataset_coco.json'} does not exist" in err


# ----------------------------------------------------------------------------------------------
# Data parallel with the released model formats


def test_ddp_group_of_one_trains_with_a_released_format_roberta(fx, prepared_cache, tmp_path):
    """Inside a torch.distributed group (gloo, one process) `train` wraps both models in
    DistributedDataParallel. A RoBERTa folder holds pooler weights, as roberta-base does; the
    discriminator must leave the pooler out, or DDP stops at the second step on parameters that
    never receive a gradient."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                         world_size=1)
    try:
        options = {**real_options(fx, prepared_cache), **TINY, "runs_dir": tmp_path / "runs",
                   "gan.eval_every": 2}
        code, _, err = cli(["train", "--preset", "coco", "--name", "ddp"] + sets(options))
    finally:
        torch.distributed.destroy_process_group()
    assert code == 0, err
    records = (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss_g"' in r for r in records) == TINY["gan.steps"]


# ----------------------------------------------------------------------------------------------
# bench/bench_paperscale.py on the fixture's tiny models, so that the GPU benchmark cannot rot


def test_bench_paperscale_tiny_runs_on_cpu(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_paperscale

    threads = torch.get_num_threads()
    try:
        results = bench_paperscale.main(["--tiny", "--device", "cpu", "--threads", "1",
                                         "--steps", "1", "--repeats", "1", "--workdir",
                                         str(tmp_path / "work"), "--json", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "b.json").read_text()).keys() == results.keys()
    assert {"init_fp32", "gan_fp32", "sampler_fp32"} <= results.keys()  # bf16: CUDA only
    assert (results["setup"]["B"], results["setup"]["K"]) == (4, 2)
    for key in ("init_fp32", "gan_fp32"):
        assert results[key]["ms"] > 0 and results[key]["peak_gib"] is None
    gan = results["gan_fp32"]
    assert all(math.isfinite(gan[k]) for k in ("loss_g", "loss_sem", "loss_nat", "d_loss"))
    assert results["sampler_fp32"]["speedup"] > 0
    # The CLI options it writes point the coco preset at the same models and data.
    args = (tmp_path / "work" / "cli_args.txt").read_text().split()
    assert args[0] == "--set" and "real.split_file=" in args[1]


# ----------------------------------------------------------------------------------------------
# The real-sized models (random weights): one step of each stage on the CPU


@pytest.mark.slow
def test_real_sized_models_take_one_step_on_cpu(tmp_path):
    """GPT-2 124M, RoBERTa-base and a ViT-L/14 CLIP (random weights, released formats) through
    prepare, 1 init step and 1 CgT-GAN step (B=2, K=2) with the coco preset."""
    import resource
    import shutil
    import time

    t0 = time.time()
    fx = build_paperscale_fixture(tmp_path / "fx", models=False)
    # Four images: 2 train, 1 val, 1 test.
    split = json.loads(fx.split_file.read_text())
    keep = {"train": 2, "val": 1, "test": 1}
    images = []
    for entry in split["images"]:
        if keep.get(entry["split"], 0) > 0:
            keep[entry["split"]] -= 1
            images.append(entry)
    split_file = tmp_path / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    sentences = [s["raw"] for e in images for s in e["sentences"]]

    clip_path = tmp_path / "ViT-L-14.pt"
    save_full_size_clip(clip_path)
    save_full_size_models(tmp_path / "gpt2", tmp_path / "roberta-base", sentences)
    built = time.time() - t0

    options = {"real.split_file": split_file, "real.image_root": fx.image_root,
               "real.clip": clip_path, "real.gpt2": tmp_path / "gpt2", "real.workers": 0,
               "real.roberta": tmp_path / "roberta-base", "real.cache_dir": tmp_path / "cache",
               "real.progress": "false", "device": "cpu", "threads": 0, "runs_dir": tmp_path / "runs",
               **TINY, "init.steps": 1, "init.batch": 2, "gan.steps": 1, "gen.max_len": 20}
    argv = ["--preset", "coco"] + sets(options)
    t1 = time.time()
    code, out, err = cli(["prepare"] + argv)
    assert code == 0, err
    assert json.loads(out)["dim"] == 768
    t2 = time.time()
    code, out, err = cli(["train", "--name", "full"] + argv)
    assert code == 0, err
    t3 = time.time()
    run_dir = tmp_path / "runs" / "full"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    init = [r for r in records if r["stage"] == "init"]
    gan = [r for r in records if r["stage"] == "gan" and "loss_g" in r]
    assert len(init) == 1 and len(gan) == 1
    assert math.isfinite(init[0]["loss"]) and init[0]["loss"] > 5  # ~ln(50257) = 10.8 at random
    assert all(math.isfinite(gan[0][k]) for k in ("loss_g", "loss_sem", "loss_nat", "d_loss"))
    blob = torch.load(run_dir / "best.pt", weights_only=True, map_location="cpu")
    n_gpt2 = sum(v.numel() for k, v in blob["generator"].items() if k.startswith("gpt."))
    assert blob["shapes"] == {"clip_dim": 768, "gpt2_vocab": 50257, "roberta_vocab": 50265}
    assert 124e6 < n_gpt2 < 164e6  # 124M, plus the untied lm_head copy in the state dict
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GB (Linux: KiB)
    print(f"\nreal-sized step: build {built:.0f}s, prepare {t2 - t1:.0f}s, init+GAN+eval "
          f"{t3 - t2:.0f}s, peak RSS {peak:.1f} GB")
    # The run writes about 7 GB (checkpoints with optimiser states, models): free the disk now.
    for path in [*run_dir.glob("*.pt"), clip_path]:
        path.unlink()
    for folder in ("gpt2", "roberta-base"):
        shutil.rmtree(tmp_path / folder)
