"""Writes docs/paper_map.md: CgT-GAN's method, term by term, mapped to code and tests.

Line links rot when code moves, so the map is generated: each row names its code and tests by
(file, dotted name), and this script finds the line where each is defined with `ast`.
tests/test_docs.py fails when paper_map.md differs from what this script writes, or when a link
does not point at the named definition; the fix is to run

    python docs/make_paper_map.py

Sections follow CgT-GAN (Yu et al., ACM MM 2023, arXiv:2308.12045) as cgtgan.py's docstrings
cite them; "official" facts come from the authors' code (Lihr747/CgtGAN), as summarised in the
project's notes on it.
"""
from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "paper_map.md"

T_CG, T_DATA, T_EV, T_RD = ("tests/test_cgtgan.py", "tests/test_data.py", "tests/test_evaluate.py",
                            "tests/test_realdata.py")
T_TR, T_CLIP, T_EX = "tests/test_train.py", "tests/test_clip_model.py", "tests/exercises/test_exercises.py"
T_REC, T_EQ = "tests/test_recipe.py", "tests/test_equations.py"

# Each row: (paper term, equation or statement, [(file, name)], [(test file, test)], exercise,
# how the official code and this project relate to the paper).
ROWS = [
    ("Generator (Sec. 3.1)", [
        ("Frozen CLIP image encoder",
         "v = E_I(image), D-dim; ViT-L/14 (D = 768) at paper scale",
         [("clip_model.py", "CLIP.encode_image"), ("realdata.py", "prepare"),
          ("data.py", "CaptionData")],
         [("tests/test_clip_parity.py", "test_matches_transformers_clipmodel"),
          (T_RD, "test_features_match_a_direct_clip_pass"),
          (T_REC, "test_raw_prefix_needs_stored_norms"),
          (T_REC, "test_prepare_stores_norms_and_raw_targets")], None,
         "Official: the mapper gets raw, unnormalised ViT-L/14 embeddings (`--normalize_prefix` "
         "is off by default and not passed by the README commands). Ours: unit embeddings are "
         "cached with their norms; the mapper reads them unit by default "
         "(`gen.normalize_prefix`), raw in the paper presets, as the official code."),
        ("Mapping network (visual prompts)",
         "prefix = reshape(W_2 tanh(W_1 v + b_1) + b_2) to (P, E); P = 10, hidden P*E/2",
         [("cgtgan.py", "MappingNetwork"), ("config.py", "GeneratorConfig")],
         [(T_CG, "test_mapping_and_generator_shapes")], None,
         "Same as official (MLP 768 -> 3840 -> 7680, tanh, default init)."),
        ("Caption model",
         "p(c | v) = prod_t p(w_t | prefix, w_<t), GPT-2 over [prefix; word embeddings]",
         [("cgtgan.py", "CaptionGenerator.forward"), ("cgtgan.py", "prefix_lm_logits"),
          ("cgtgan.py", "CaptionGenerator.log_probs"), ("cgtgan.py", "build_generator")],
         [(T_CG, "test_mapping_and_generator_shapes"),
          (T_EQ, "test_forward_logits_equal_step_by_step_full_forward"),
          (T_CG, "test_sample_logprobs_equal_forward_logprobs")], "prefix_lm_logits",
         "Same structure (GPT-2 124M at paper scale; a 3-layer GPT-2 trained from scratch on "
         "ShapesWorld)."),
        ("Decoding",
         "captions end at \".\" or after 20 tokens; greedy at test time; K samples in training",
         [("cgtgan.py", "CaptionGenerator.greedy"), ("cgtgan.py", "CaptionGenerator.sample"),
          ("cgtgan.py", "sample_categorical"),
          ("cgtgan.py", "CaptionGenerator.beam_search"), ("decoding.py", "LeanCache")],
         [(T_CG, "test_decoding_stops_at_end_token"),
          (T_CG, "test_sample_categorical_matches_distribution"),
          (T_CG, "test_lean_cache_logits_equal_full_forward"),
          (T_CG, "test_greedy_equals_naive_argmax_loop"),
          (T_CG, "test_sample_with_fixed_uniforms_equals_references")], None,
         "Official: samples are drawn with dropout on (train mode) and the greedy baseline in "
         "eval mode; a caption cut at 20 tokens gets its last token overwritten with \".\". "
         "Ours: dropout 0 by default (`gen.dropout`), a cut caption keeps its tokens; beam "
         "search is an extra (`decode=beam`)."),
        ("Text-only initialisation",
         "L_init = -sum_t log p(w_t | MLP(E_T(s)), w_<t) for corpus sentences s (cross-entropy)",
         [("cgtgan.py", "caption_loss"), ("train.py", "train_init"), ("config.py", "InitConfig")],
         [(T_CG, "test_caption_loss_ignores_padding"), (T_CG, "test_text_only_init_learns"),
          (T_REC, "test_shuffled_epochs_and_warmups")],
         "caption_loss",
         "Official: pads with 0 and uses `ignore_index=0`, which also drops every real GPT-2 "
         "\"!\" (id 0); lr 2e-5, batch 16, one epoch, 5000 warmup steps, wd 0.05, raw text "
         "embeddings, no noise, no gradient clipping. Ours: padding label -1 (`IGNORE_INDEX`); "
         "optional CapDec noise `init.noise` (off, as in the paper); the paper presets take the "
         "official epoch, batch, warm-up and clipping (`init.epochs`, `init.warmup`, "
         "`init.grad_clip`)."),
    ]),
    ("Discriminator and naturalness reward (Sec. 3.2)", [
        ("Discriminator",
         "D(c) = MLP(RoBERTa(c)[<s>]) -> logit; > 0 means \"a corpus sentence\"",
         [("cgtgan.py", "Discriminator"), ("cgtgan.py", "build_discriminator"),
          ("cgtgan.py", "roberta_inputs"), ("config.py", "DiscriminatorConfig")],
         [(T_CG, "test_discriminator_shapes"), (T_REC, "test_pooler_head_reads_robertas_pooler"),
          (T_REC, "test_roberta_inputs_cut_long_texts_with_a_period")], None,
         "Official: head 768 -> 384 -> 1 (tanh) on RoBERTa's pooler output (dense + tanh on <s>); "
         "inputs cut at 22 tokens; pad id 1 hard-coded; its truncation writes <s> (id 0) where "
         "\".\" was meant. Ours: `disc.head=cls` (default), H -> H -> 1 (tanh) on the <s> hidden "
         "state; `disc.head=pooler` and `disc.max_tokens=22` (the paper presets), the official "
         "head and cut, with \".\"; pad id from the tokenizer."),
        ("Discriminator loss",
         "L_D = -E_s[log sigmoid(D(s))] - E_c[log(1 - sigmoid(D(c)))], corpus s real, samples c fake",
         [("cgtgan.py", "discriminator_loss"), ("train.py", "gan_step")],
         [(T_CG, "test_discriminator_loss_falls_when_overfitting")], "discriminator_loss",
         "Official: one BCE over B*5 corpus sentences + B*5 samples (equal counts, so the same "
         "as our mean of the two halves); one D step per G step from step 0, lr = G's lr. "
         "One stored version of the official code never calls `optimizer_D.step()` (D never "
         "trains). Ours: same schedule, its own `gan.d_lr`."),
        ("Naturalness reward",
         "r_nat(c) = D(c), the discriminator's logit",
         [("cgtgan.py", "naturalness_reward")],
         [(T_CG, "test_clip_rewards_worked_examples")], None,
         "Official: the raw logit (no sigmoid), scored in eval mode before D's update. Ours: the "
         "raw logit from the same forward pass as D's loss, before D's update (with D's "
         "dropout active, `disc.dropout`)."),
    ]),
    ("CLIP-based rewards (Sec. 3.3)", [
        ("CLIP-cos",
         "r_cos(c) = 100 * cos(E_I(v), E_T(c))",
         [("cgtgan.py", "clip_cos_reward"), ("cgtgan.py", "ClipText")],
         [(T_CG, "test_clip_rewards_worked_examples")], "clip_cos_reward",
         "Same (100 = CLIP's logit scale). Official: not the default reward (`--clip_weight 0`); "
         "the final \".\" is stripped before CLIP tokenisation. Ours: `--reward cos`."),
        ("CLIP-agg target",
         "a = sum_j softmax_j(t * cos(v, s_j)) * s_j over the whole corpus, temperature t",
         [("cgtgan.py", "clip_agg_target"),
          ("train.py", "agg_targets")],
         [(T_CG, "test_clip_agg_target_equals_float64_direct"),
          (T_DATA, "test_clip_agg_target_chunks_equal_direct_float64"),
          (T_DATA, "test_clip_agg_target_chunks_stable_at_high_temperature_and_accept_tensors"),
          (T_RD, "test_agg_targets_equal_the_equation_over_the_cached_features"),
          (T_REC, "test_clip_agg_target_sums_raw_sentence_embeddings")],
         "clip_agg_target",
         "Official: float64 softmax over the full corpus, but the sum is of the *unnormalised* "
         "sentence embeddings; stored in fp16, not renormalised. Ours: a sum of normalised s_j "
         "by default, of raw ones with `gan.agg_raw` (the paper presets), streamed in chunks "
         "with an online softmax (no (B, M) matrix)."),
        ("Temperature per setting",
         "t = 100 (COCO corpus), 175 (GCC corpus)",
         [("config.py", "AGG_TEMPERATURE"), ("config.py", "PRESETS"),
          ("config.py", "GANConfig")],
         [(T_RD, "test_temperature_table"), (T_CG, "test_presets_apply"),
          (T_REC, "test_flickr30k_images_with_coco_captions")], None,
         "Official README: 100 (COCO) and 175 (GCC); an author's reply in issue #4 lists all six "
         "settings: 125 for Flickr30k, COCO/Flickr30k and Flickr30k/COCO, 100 for ShutterStock. "
         "Ours: the same, per preset."),
        ("CLIP-agg reward",
         "r_agg(c) = 0.5 * 100 * cos(a, E_T(c)) + 0.5 * 100 * (1 - mean_d |a_d - E_T(c)_d|)",
         [("cgtgan.py", "clip_agg_reward")],
         [(T_CG, "test_clip_rewards_worked_examples"),
          (T_REC, "test_clip_agg_reward_raw_l1_compares_raw_vectors")], "clip_agg_reward",
         "Official: the L1 term uses the raw, unnormalised a and caption embedding (mean over "
         "dims, x100). Ours: both L2-normalised first by default, so the L1 term compares "
         "directions like the cosine; raw with `gan.agg_raw` (the paper presets)."),
        ("Semantic reward",
         "r_sem = CLIP-agg (or CLIP-cos in the ablation)",
         [("cgtgan.py", "semantic_reward")],
         [(T_CG, "test_clip_rewards_worked_examples")], None,
         "Official: (1 - clip_weight) * agg + clip_weight * cos with clip_weight 0. Ours: "
         "`gan.agg_weight` w * agg + (1 - w) * cos, w = 1 by default."),
    ]),
    ("Training (Sec. 3.4)", [
        ("Self-critical policy gradient",
         "L = -mean_{b,k} (r(c_bk) - r(c^greedy_b)) * mean_t log p(w_bkt), K = 5 samples",
         [("cgtgan.py", "scst_loss"), ("cgtgan.py", "caption_log_prob"),
          ("cgtgan.py", "CaptionGenerator.sample"), ("train.py", "gan_step")],
         [(T_CG, "test_scst_loss_greedy_and_leave_one_out"),
          (T_EQ, "test_caption_log_prob_is_the_mean_over_real_tokens_per_caption"),
          (T_CG, "test_positive_advantage_raises_sample_logprob")], ("scst_loss", "caption_log_prob"),
         "Same: per-token mean log-prob including the end token, greedy baseline. Ours adds "
         "a leave-one-out baseline (`gan.baseline=loo`)."),
        ("Reward mixing",
         "L_G = lambda * L_SCST(r_sem) + (1 - lambda) * L_SCST(r_nat), each with its own "
         "greedy baseline",
         [("cgtgan.py", "generator_loss"), ("train.py", "gan_step"), ("train.py", "reward_lambda"),
          ("train.py", "with_baseline")],
         [(T_EQ, "test_generator_loss_worked_example_each_term_its_own_baseline"),
          (T_TR, "test_reward_lambda_per_reward_and_baseline_layout"),
          (T_TR, "test_end_to_end_writes_every_output")], "generator_loss",
         "Same. Official: no reward normalisation, so the CLIP terms (x100) dwarf the D logits."),
        ("Lambda schedule",
         "lambda = 0 for the first steps, then a linear ramp to 0.5",
         [("cgtgan.py", "lambda_schedule"), ("config.py", "GANConfig")],
         [(T_CG, "test_lambda_schedule")], "lambda_schedule",
         "Official: 0 while step <= 150, then (step - 150) / 2350 * 0.5, capped at 0.5 (reached at "
         "step 2500). Ours: `gan.lambda_hold`, `gan.lambda_ramp`, `gan.lambda_final`; the paper "
         "presets use the official hold 150 and ramp 2350."),
        ("Optimisation",
         "AdamW, lr 1e-5, gradient clipping 1.0, batch 128, K = 5, 20 tokens",
         [("config.py", "_PAPER"), ("config.py", "DIFFERENCES"), ("train.py", "adamw"),
          ("train.py", "warmup_lr"), ("train.py", "epoch_rows"), ("train.py", "update"),
          ("train.py", "train_gan")],
         [(T_REC, "test_preset_values_are_the_official_ones"),
          (T_REC, "test_shuffled_epochs_and_warmups"),
          (T_REC, "test_adamw_leaves_biases_and_layernorm_weights_undecayed"),
          (T_REC, "test_shuffled_epochs_resume_mid_epoch")], None,
         "Official: AdamW for G and D (lr 1e-5, wd 0.05 without bias/LayerNorm decay, eps 1e-8), "
         "150 warmup steps for G, batch 64 per GPU on 2 GPUs (128 images), 50 epochs on COCO "
         "(80 with GCC), seed 0. Ours: the same in the paper presets (`gan.batch` is the global "
         "batch); the ShapesWorld defaults keep i.i.d. batches for a step budget, no warm-up "
         "and decay on every parameter. `python cgtgan.py config --preset coco` lists what "
         "still differs."),
        ("Model selection",
         "the checkpoint with the best validation CIDEr is tested",
         [("train.py", "train_gan"), ("commands.py", "test_table")],
         [(T_TR, "test_end_to_end_writes_every_output")], None,
         "Same: after each epoch in the paper presets (`gan.eval_every=0`); every "
         "`gan.eval_every` steps otherwise. Step 0, the text-only init itself, is validated for "
         "the curves but is no candidate for best.pt."),
    ]),
    ("Evaluation (Sec. 4.1)", [
        ("Caption metrics",
         "BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE (COCO caption toolkit, PTB tokenisation)",
         [("evaluate.py", "score"), ("evaluate.py", "ptb_tokenize"), ("evaluate.py", "bleu"),
          ("evaluate.py", "rouge_l"), ("evaluate.py", "cider_d"), ("java_metrics.py", "meteor"),
          ("java_metrics.py", "spice"), ("evaluate.py", "coco_results")],
         [(T_EV, "test_parity_random_1000_images"), (T_EV, "test_ptb_tokenize_matches_java"),
          (T_EV, "test_cli_meteor_through_toolkit"),
          ("tests/test_java_metrics.py", "test_spice_runs_the_toolkits_command_and_reads_its_output"),
          ("tests/test_paperscale.py", "test_eval_scores_equal_cocoevalcaps")], None,
         "Official: pycocoevalcap with Java. Ours: pure-Python parity for BLEU, ROUGE-L, CIDEr-D "
         "(the toolkit's \"CIDEr\" is CIDEr-D); METEOR and SPICE through an installed pycocoevalcap "
         "where Java (and SPICE's Stanford CoreNLP jars) are present, else one line naming what is "
         "missing; `eval` also writes a COCO result file that COCOEvalCap reads."),
        ("CIDEr-D",
         "10 * mean_n mean_refs clipped-cos(tf-idf_n(c), tf-idf_n(r)) * exp(-(l_c - l_r)^2 / (2 * 6^2))",
         [("evaluate.py", "cider_d"), ("evaluate.py", "cider_d_image"), ("evaluate.py", "tfidf_vector"),
          ("evaluate.py", "idf_by_df"), ("evaluate.py", "ngrams")],
         [(T_EV, "test_parity_random_1000_images"), (T_EV, "test_docstring_examples"),
          (T_EX, "test_tfidf_vector_gives_evaluate_cider_d")], "tfidf_vector",
         "Same as the toolkit: document frequencies come from the evaluated images' references."),
        ("Test-time decoding and data",
         "greedy captions of the Karpathy test split; corpora from COCO, Flickr30k, GCC, ShutterStock",
         [("train.py", "caption_feats"), ("realdata.py", "read_karpathy"),
          ("corpora.py", "caption_sentence"), ("corpora.py", "gcc_sentence"),
          ("corpora.py", "shutterstock_sentence"), ("corpora.py", "web_image_list"),
          ("realdata.py", "clean_sentences")],
         [(T_RD, "test_reference_files_are_coco_format_for_evaluate"),
          ("tests/test_corpora.py", "test_gcc_drops_every_16_to_19_word_caption_as_the_official_code_does"),
          ("tests/test_corpora.py", "test_shutterstock_draws_only_for_eligible_fragments"),
          (T_RD, "test_external_corpus_is_cleaned_and_used")], None,
         "Official GCC preprocessing re-seeds NumPy inside its loop, so every 16-19-word caption is "
         "dropped (30% kept was intended); ShutterStock keeps only a caption's first clause; COCO "
         "captions get \".\" appended after checking only the last character (so \" .\" "
         "survives). Ours: `python cgtgan.py corpus` applies the official rules to the public "
         "files (GCC's effective drop by default, `--gcc-intended` for p = 0.3; whitespace tidied "
         "before COCO's last-character check); the paper presets then keep sentences as written "
         "(no lowercasing, length filter or de-duplication) but for the final period, which the "
         "generator's end token stands for; RealDataConfig's defaults lowercase, filter by length "
         "and de-duplicate (`realdata.clean_sentences`)."),
        ("Zero-shot setting (ZS-IC)",
         "no in-domain images or captions in training; scored on another dataset's Karpathy test split",
         [("config.py", "PRESETS"), ("config.py", "EVAL_DATASETS"), ("commands.py", "run_eval"),
          ("realdata.py", "load_eval_data")],
         [("tests/test_paperscale.py", "test_zsic_eval_scores_another_datasets_test_split"),
          ("tests/test_paperscale.py", "test_eval_bad_target_gives_one_line_errors")], None,
         "Official: the README documents COCO images with the GCC corpus, validated and tested on "
         "COCO, and evaluation of a checkpoint on any prepared test file. Ours: the `zsic` preset "
         "(web images listed as train, GCC corpus, COCO val/test); `eval --dataset` or "
         "`real.eval_split_file` scores any run on another split, embedding its images on first use."),
    ]),
    ("Beyond the paper: CLIP itself", [
        ("CLIP's contrastive loss",
         "(CE(L, arange B) + CE(L^T, arange B)) / 2; pretrains ShapesWorld's tiny CLIP",
         [("clip_model.py", "contrastive_loss")],
         [(T_CLIP, "test_contrastive_loss_worked_example_and_learning_signal")],
         "contrastive_loss", "Not in CgT-GAN (it uses OpenAI's released CLIP)."),
        ("CLIP's BPE tokenizer",
         "merge the lowest-ranked adjacent pair until none is left",
         [("clip_tokenizer.py", "bpe")],
         [("tests/test_clip_tokenizer.py", "test_parity_with_openai_tokenizer")], "bpe",
         "Same as OpenAI's `clip.simple_tokenizer`."),
    ]),
]


@lru_cache(maxsize=None)
def _tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(), filename=path)


def _defines(node, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def line_of(path: str, dotted: str) -> int:
    """The line where `dotted` (a name, or Class.member) is defined in the file at `path`."""
    body = _tree(path).body
    node = None
    for part in dotted.split("."):
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise SystemExit(f"docs/make_paper_map.py: {path} defines no {dotted!r}; update ROWS "
                             "in docs/make_paper_map.py to the code's current names")
        body = getattr(node, "body", [])
    return node.lineno


def cell(text: str) -> str:
    """Plain text as a table cell: pipes escaped, "<" shown rather than read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def link(path: str, name: str, label: str | None = None) -> str:
    return f"[`{label or name}`](../{path}#L{line_of(path, name)})"


def code_label(path: str, name: str) -> str:
    return f"{Path(path).stem}.{name}"


def render() -> str:
    out = [
        "# Paper map: CgT-GAN, term by term, to code and tests",
        "",
        "Every equation, reward, loss and training detail of the method of CgT-GAN (Yu et al., "
        "ACM MM 2023, arXiv:2308.12045), the function that implements it, the test that checks "
        "it, the classroom exercise that rebuilds it (docs/exercises.md), and where the "
        "authors' code (Lihr747/CgtGAN) differs from the paper or from this project.",
        "",
        "Generated by `python docs/make_paper_map.py` (line numbers come from the source; "
        "tests/test_docs.py fails when they are stale: run the script again).",
        "",
        "Notation: v image, c caption, s_j corpus sentence, E_I / E_T CLIP's image / text "
        "encoders, P prefix tokens, E GPT-2 width, B images, K samples per image, t the "
        "CLIP-agg temperature.",
    ]
    for section, rows in ROWS:
        out += ["", f"## {section}", "",
                "| Paper | Equation | Code | Tests | Official code, and us |",
                "|---|---|---|---|---|"]
        for term, equation, code, tests, exercise, notes in rows:
            code_cell = "<br>".join(link(p, n, code_label(p, n)) for p, n in code)
            test_cell = "<br>".join(link(p, n) for p, n in tests)
            for name in [exercise] if isinstance(exercise, str) else exercise or ():
                test_cell += f"<br>exercise [`{name}`](exercises.md)"
            out.append(f"| **{term}** | {cell(equation)} | {code_cell} | {test_cell} | {cell(notes)} |")
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({sum(len(r) for _, r in ROWS)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
