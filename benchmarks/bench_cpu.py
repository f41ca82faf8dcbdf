"""CPU benchmark: pixtral's engine against Hugging Face transformers on identical weights.

    .venv/bin/python benchmarks/bench_cpu.py [--threads 2] [--new-tokens 64]

Small Pixtral configs in fp32: the embedded default model itself (dim 256 x 4 layers, 4000-token
vocabulary, its own weights), and Pixtral-shaped models with random weights: dim 256 x 4 layers with
the real 131072-token vocabulary, the same with a 32768-token one, and dim 64 x 2 layers with 32768
(prompts use only ids below 30000, so the tokenizer is unchanged). Measured in one run, same inputs:
  - batch-1 decode tokens/s: (N - 1) / (time for N tokens - time for 1 token)
  - 8-way throughput: 8 prompts of equal length decoded together, output tokens/s end to end
  - time to first token for one image + a short question (prefill with the vision encoder)
  - 8 image chats as a server sees them: images of different sizes, questions of different
    lengths, answers of 8 to 120 tokens; requested output tokens/s end to end. transformers
    gets its better of two ways: one padded batch run to the longest answer (static batching),
    or the chats one after another.
transformers runs `model.generate` (greedy, its default dynamic cache, SDPA attention); ours
runs `LLM.generate`, with the prefix and encoder caches cleared before every timed call.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, hf_from_ours, random_model, text_prompt, timed  # noqa: E402

from pixtral.engine import LLM, Prompt  # noqa: E402
from pixtral.generation import SamplingParams  # noqa: E402
from pixtral.model.args import ModelArgs, VisionArgs  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402
from pixtral.processing.loading import write_tokenizer_for  # noqa: E402
from pixtral.assets import DEFAULT_MODEL_DIR  # noqa: E402
from pixtral.checkpoint import load_model  # noqa: E402


def small_args(dim: int = 256, n_layers: int = 4, vocab_size: int = 131072) -> ModelArgs:
    """Pixtral-12B's layout at toy width (GQA 4/2, SiLU FFN 3x), the real vocabulary by default."""
    return ModelArgs(
        dim=dim, n_layers=n_layers, head_dim=dim // 4, hidden_dim=3 * dim, n_heads=4, n_kv_heads=2,
        vocab_size=vocab_size, rope_theta=1e9, max_seq_len=4096,
        vision=VisionArgs(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          image_size=256),
    )


# (dim, layers, vocabulary): the real vocabulary, then smaller ones where per-step overhead shows.
# "default": the embedded default model itself (its own weights and reduced tokenizer).
CONFIGS = {"default": None, "small": (256, 4, 131072), "small-32k": (256, 4, 32768), "tiny-32k": (64, 2, 32768)}


def load_config(name: str):
    """(model, processor, label) for one entry of CONFIGS, in float32 on the CPU."""
    if CONFIGS[name] is None:
        model = load_model(DEFAULT_MODEL_DIR, "cpu", torch.float32)
        return model, load_processor(DEFAULT_MODEL_DIR), "the embedded default model (its own weights)"
    args = small_args(*CONFIGS[name])
    model = random_model(args, torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(write_tokenizer_for(args, Path(tmp) / "tekken.json"))
    return model, processor, "random weights"


def bench(name: str, n: int, prompt_tokens: int, reps: int) -> dict:
    device = torch.device("cpu")
    model, processor, weights = load_config(name)
    args = model.args
    hf = hf_from_ours(model)
    llm = LLM.from_model(model, processor, num_blocks=2048, max_num_seqs=16)

    text = text_prompt(processor, prompt_tokens, seed=0)
    batch = [text_prompt(processor, prompt_tokens, seed=s) for s in range(8)]
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(256, 256, 3, generator=rng) * 255).to(torch.uint8).numpy()

    image_ids, images = processor.encode_chat([{"role": "user", "content": [
        {"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "What is in this image?"}]}])
    image = images[0]
    image_prompt = Prompt(image_ids, [image])

    # Eight different image chats (sizes, question lengths, answer lengths).
    chat_rng = np.random.default_rng(1)
    chats, chat_new = [], [8 + 16 * i for i in range(8)]
    for i in range(8):
        w, h = (int(x) for x in chat_rng.integers(64, 257, size=2))
        picture = Image.fromarray((chat_rng.random((h, w, 3)) * 255).astype(np.uint8))
        question = " ".join(["Describe the picture in detail."] * (1 + i % 3))
        ids, imgs = processor.encode_chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                                         {"type": "text", "text": question}]}])
        top = min(30000, args.vocab_size)  # text ids any of the vocabularies holds (as `text_prompt`)
        chats.append(([t if t < top else 1000 + t % (top - 1000) for t in ids], imgs[0]))
    chat_prompts = [Prompt(ids, [img]) for ids, img in chats]

    def hf_generate(ids, new, img=None):
        kwargs = {}
        if img is not None:
            kwargs = {"pixel_values": img[None], "image_sizes": torch.tensor([list(img.shape[1:])])}
        inputs = torch.tensor(ids if isinstance(ids[0], list) else [ids])
        with torch.inference_mode():
            out = hf.generate(inputs, max_new_tokens=new, do_sample=False, pad_token_id=11,
                              **kwargs)
        return out[:, inputs.shape[1]:].tolist()

    def ours(prompts, new):
        llm.engine.reset_prefix_cache()
        return [o.outputs[0].token_ids for o in
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))]

    def hf_chats_batched():
        """One left-padded batch, images padded to the largest, run until the longest answer is done."""
        longest = max(len(ids) for ids, _ in chats)
        ids = torch.full((8, longest), 11, dtype=torch.long)
        mask = torch.zeros((8, longest), dtype=torch.long)
        h = max(img.shape[1] for _, img in chats)
        w = max(img.shape[2] for _, img in chats)
        pixels = torch.zeros(8, 3, h, w)
        for row, (prompt, img) in enumerate(chats):
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
            pixels[row, :, : img.shape[1], : img.shape[2]] = img
        sizes = torch.tensor([list(img.shape[1:]) for _, img in chats])
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, do_sample=False,
                        max_new_tokens=max(chat_new), pad_token_id=11)

    def hf_chats_sequential():
        for (prompt, img), new in zip(chats, chat_new):
            hf_generate(prompt, new, img)

    def ours_chats():
        llm.engine.reset_prefix_cache()
        llm.generate(chat_prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in chat_new])

    # Identical weights and inputs give identical greedy tokens.
    same_text = hf_generate(text, 16)[0] == ours([text], 16)[0]
    same_image = hf_generate(image_ids, 8, image)[0] == ours([image_prompt], 8)[0]

    results = {}
    for name, gen1, genN, gen8, ttft in (
        ("transformers", lambda: hf_generate(text, 1), lambda: hf_generate(text, n), lambda: hf_generate(batch, n),
         lambda: hf_generate(image_ids, 1, image)),
        ("pixtral", lambda: ours([text], 1), lambda: ours([text], n), lambda: ours(batch, n),
         lambda: ours([image_prompt], 1)),
    ):
        t1, tn = timed(gen1, device, reps), timed(genN, device, reps)
        t8 = timed(gen8, device, reps)
        results[name] = {
            "decode_b1_tok_s": (n - 1) / (tn - t1),
            "throughput_8way_tok_s": 8 * n / t8,
            "ttft_image_ms": 1000 * timed(ttft, device, reps),
        }
    useful = sum(chat_new)
    hf_batched, hf_seq = timed(hf_chats_batched, device, reps), timed(hf_chats_sequential, device, reps)
    results["transformers"]["chats_8_tok_s"] = useful / min(hf_batched, hf_seq)
    results["transformers"]["chats_8_how"] = "padded batch" if hf_batched <= hf_seq else "one after another"
    results["pixtral"]["chats_8_tok_s"] = useful / timed(ours_chats, device, reps)
    hf_r, our_r = results["transformers"], results["pixtral"]
    print(f"## dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, vocab "
          f"{args.vocab_size}, vision {args.vision.hidden_size} wide x {args.vision.num_hidden_layers} layers; fp32, "
          f"{weights}")
    print(f"prompt {len(text)} tokens, {n} new tokens; image prompt {len(image_ids)} tokens "
          f"({image.shape[1]}x{image.shape[2]} px); same greedy tokens as transformers: text {same_text}, "
          f"image {same_image}")
    print()
    print("| metric | transformers | pixtral | ratio |")
    print("|---|---|---|---|")
    for key, label, better_low in (("decode_b1_tok_s", "batch-1 decode (tok/s)", False),
                                   ("throughput_8way_tok_s", "8-way throughput (output tok/s)", False),
                                   ("ttft_image_ms", "time to first token, 1 image (ms)", True),
                                   ("chats_8_tok_s", "8 image chats, mixed lengths (output tok/s)", False)):
        ratio = hf_r[key] / our_r[key] if better_low else our_r[key] / hf_r[key]
        print(f"| {label} | {hf_r[key]:.1f} | {our_r[key]:.1f} | {ratio:.2f}x |")
    print(f"(8 image chats: transformers' better way was {hf_r['chats_8_how']}; answers of "
          f"{min(chat_new)}-{max(chat_new)} tokens, {sum(chat_new)} in all)")
    print()
    return {"dim": args.dim, "n_layers": args.n_layers, "vocab_size": args.vocab_size, "same_text": same_text,
            "same_image": same_image, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads mostly measure contention)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print(f"# CPU benchmark: {describe_machine(torch.device('cpu'))}")
    print()
    runs = [bench(c, opts.new_tokens, opts.prompt_tokens, opts.repeats) for c in opts.configs]
    print(json.dumps({"device": describe_machine(torch.device("cpu")), "runs": runs}))


if __name__ == "__main__":
    main()
