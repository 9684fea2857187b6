"""Throughput of clip_model.CLIP against transformers' CLIPModel on the same ViT-B/32-sized weights.

Both models get the same random weights (Hugging Face's, mapped into OpenAI's key names), the same
image batch and the same 77-token text batch; encode_image and encode_text are timed under
torch.inference_mode, alternating the two models rep by rep so machine noise hits both alike, and
the median rep is reported. A third text row gives CLIPModel the batch cut to its longest caption
(what a Hugging Face tokenizer with padding=True produces), the fair comparison for our
end-token trimming.

    python bench/bench_clip.py [--images 16] [--texts 64] [--reps 5] [--threads 0]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clip_model import CLIP, config_from_state_dict  # noqa: E402
from clip_tokenizer import tokenize  # noqa: E402
from test_clip_parity import hf_to_openai  # noqa: E402

CAPTIONS = ["a man riding a wave on top of a surfboard", "two dogs playing with a frisbee in a grassy park",
            "a plate of food with broccoli and rice", "a red double decker bus driving down a city street",
            "a cat sleeping on a laptop keyboard", "a group of people standing around a kitchen table",
            "a giraffe eating leaves from a tall tree", "an old clock tower against a cloudy blue sky"]


def vit_b_32_peer():
    """transformers' CLIPModel with ViT-B/32's sizes (random weights), quick_gelu as OpenAI."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512)
    return transformers.CLIPModel(cfg).eval()


def median_seconds(fns, reps):
    """Runs each function once to warm up, then reps times, interleaved; median seconds per function."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    peer = vit_b_32_peer()
    state = hf_to_openai(peer.state_dict())
    ours = CLIP(config_from_state_dict(state)).eval()
    ours.load_state_dict(state)

    images = torch.randn(args.images, 3, 224, 224)
    tokens = tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(args.texts)])  # (N, 77)
    trimmed = tokens[:, : int(tokens.argmax(-1).max()) + 1]  # (N, longest caption)

    with torch.inference_mode():
        ours_image = lambda: ours.encode_image(images)  # noqa: E731
        peer_image = lambda: peer.get_image_features(pixel_values=images)  # noqa: E731
        ours_text = lambda: ours.encode_text(tokens)  # noqa: E731
        peer_text = lambda: peer.get_text_features(input_ids=tokens)  # noqa: E731
        peer_text_trimmed = lambda: peer.get_text_features(input_ids=trimmed)  # noqa: E731
        check = (ours_image() - features(peer_image())).norm() / features(peer_image()).norm()
        check_text = (ours_text() - features(peer_text())).norm() / features(peer_text()).norm()
        t_ours_img, t_peer_img = median_seconds([ours_image, peer_image], args.reps)
        t_ours_txt, t_peer_txt, t_peer_trim = median_seconds([ours_text, peer_text, peer_text_trimmed], args.reps)

    print(f"ViT-B/32-sized random weights, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} reps")
    print(f"relative difference of embeddings: images {check:.1e}, texts {check_text:.1e}")
    print(f"| {'task':<42} | {'ours /s':>9} | {'peer /s':>9} | {'ours/peer':>9} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    rows = [(f"encode_image, batch {args.images} x 224px", args.images, t_ours_img, t_peer_img),
            (f"encode_text, batch {args.texts} x 77 tokens", args.texts, t_ours_txt, t_peer_txt),
            (f"encode_text, peer cut to {trimmed.shape[1]} tokens", args.texts, t_ours_txt, t_peer_trim)]
    for name, n, ours_s, peer_s in rows:
        print(f"| {name:<42} | {n / ours_s:>9.1f} | {n / peer_s:>9.1f} | {peer_s / ours_s:>9.2f} |")


def features(output):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


if __name__ == "__main__":
    main()
