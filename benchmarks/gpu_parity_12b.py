"""GPU check: Pixtral-12B shape, random bf16 weights, ours vs Hugging Face transformers.

Builds our model with random weights on the GPU, copies them (q/k permuted) into transformers'
LlavaForConditionalGeneration, and compares logits and greedy continuations for a text-only
prompt and a prompt with two images, in bf16. Then (--fp32-reference, the default) both models
are run again in float32 on the same weights: the float32 pair must agree closely, and each
bf16 run is scored against the float32 logits, which tells rounding apart from a wrong
computation (bf16 runs of two correct implementations differ by rounding alone; a random
12B model amplifies rounding a lot, its logits being near ties). Needs ~100 GB of GPU memory
with the float32 step (an H200), ~55 GB without.

    python benchmarks/gpu_parity_12b.py [--preset pixtral-12b-2409] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pixtral.checkpoint.configs import hf_config  # noqa: E402
from pixtral.checkpoint.layout import HF_CURRENT_TO_LEGACY, key_specs, to_hf_rows
from pixtral.generation import SamplingParams
from pixtral.generation.generate import generate_ids
from pixtral.model import Pixtral, preset


def current_hf_name(legacy: str) -> str:
    for current, old in HF_CURRENT_TO_LEGACY:
        if legacy.startswith(old):
            return current + legacy[len(old):]
    return legacy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="pixtral-12b-2409")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu with a small --preset for a smoke run")
    ap.add_argument("--image-scale", type=int, default=16, help="image sides in patches are multiples of this / 16")
    ap.add_argument("--no-fp32-reference", dest="fp32_reference", action="store_false",
                    help="skip the float32 runs (they need ~100 GB of GPU memory)")
    opts = ap.parse_args()
    import transformers

    torch.manual_seed(0)
    args = preset(opts.preset)
    # Built on the meta device and materialised in bf16: in fp32 first, 12.4B parameters would
    # need 50 GB (and 75 GB at the cast), which with transformers' copy does not fit an H100.
    with torch.device("meta"):
        ours = Pixtral(args)
    ours = ours.to(torch.bfloat16).to_empty(device=opts.device).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config(args))
    with torch.device(opts.device):
        hf = transformers.LlavaForConditionalGeneration._from_config(hf_cfg, dtype=torch.bfloat16).eval()
    params = dict(ours.named_parameters())
    state = {}
    for spec in key_specs(args):
        t = params[spec.mistral].detach()
        state[current_hf_name(spec.hf)] = to_hf_rows(t, spec.permute_heads, spec.head_dim) if spec.permute_heads else t
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)

    results = {"preset": opts.preset, "device": torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__}
    g = torch.Generator().manual_seed(1)
    s = opts.image_scale
    images = [torch.randn(3, 32 * s, 48 * s, generator=g), torch.randn(3, 16 * s, 16 * s, generator=g)]
    inputs, bf16_logits = {}, {}
    for case, imgs in (("text", []), ("two_images", images)):
        ids = [1, 3]
        for img in imgs:
            h, w = img.shape[1] // 16, img.shape[2] // 16
            block = ([10] * w + [12]) * h
            block[-1] = 13
            ids += block
        ids += list(range(5000, 5024)) + [4]
        ids_t = torch.tensor(ids, device=opts.device)
        sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)
        with torch.no_grad():
            dev_imgs = [i.to(opts.device) for i in imgs]
            ours(ids_t, dev_imgs)  # warm-up: kernel selection and allocator, not part of the timing
            sync()
            t0 = time.perf_counter()
            ours_logits = ours(ids_t, dev_imgs)
            sync()
            t_ours = time.perf_counter() - t0
            kw = {}
            if imgs:
                H = max(i.shape[1] for i in imgs)
                W = max(i.shape[2] for i in imgs)
                pv = torch.zeros(len(imgs), 3, H, W)
                for k, im in enumerate(imgs):
                    pv[k, :, : im.shape[1], : im.shape[2]] = im
                kw = {"pixel_values": pv.to(opts.device).bfloat16(),
                      "image_sizes": torch.tensor([[i.shape[1], i.shape[2]] for i in imgs], device=opts.device)}
            hf_logits = hf(input_ids=ids_t[None], **kw).logits[0].float()
            hf_gen = hf.generate(input_ids=ids_t[None], max_new_tokens=opts.new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), device=opts.device, dtype=torch.long), **kw)
        hf_tokens = hf_gen[0, len(ids):].tolist()
        inputs[case] = (ids_t, dev_imgs, kw)
        bf16_logits[case] = (ours_logits.float().cpu(), hf_logits.cpu())
        our_tokens = [t for t, _ in generate_ids(ours, ids, [i.to(opts.device) for i in imgs],
                                                 SamplingParams(temperature=0, max_tokens=opts.new_tokens, ignore_eos=True), 2)]
        agree = next((k for k, (a, b) in enumerate(zip(our_tokens, hf_tokens)) if a != b), len(hf_tokens))
        results[case] = {
            "tokens": len(ids), "max_abs_logit_diff": (ours_logits - hf_logits).abs().max().item(),
            "max_abs_logit": hf_logits.abs().max().item(),
            "argmax_agreement": (ours_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
            "greedy_tokens_identical_prefix": agree, "greedy_tokens": opts.new_tokens, "ours_forward_s": t_ours,
        }
        print(case, json.dumps(results[case]), flush=True)
    if opts.fp32_reference:
        # Real float32 on both sides: cuDNN convolutions (transformers' patch embedding is a Conv2d;
        # ours is a matmul) default to TF32 on the GPU, which alone moves the image logits visibly.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        del hf, hf_gen, hf_logits, ours_logits
        torch.cuda.empty_cache() if opts.device.startswith("cuda") else None
        ours = ours.float()
        with torch.device(opts.device):
            hf = transformers.LlavaForConditionalGeneration._from_config(hf_cfg, dtype=torch.float32).eval()
        params = dict(ours.named_parameters())
        state = {current_hf_name(spec.hf): (to_hf_rows(params[spec.mistral].detach(), spec.permute_heads, spec.head_dim)
                                            if spec.permute_heads else params[spec.mistral].detach())
                 for spec in key_specs(args)}
        hf.load_state_dict(state, strict=False)
        del state, params
        for case, (ids_t, dev_imgs, kw) in inputs.items():
            kw32 = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}
            with torch.no_grad():
                ref = ours(ids_t, [i.float() for i in dev_imgs]).float().cpu()
                hf32 = hf(input_ids=ids_t[None], **kw32).logits[0].float().cpu()
            ours16, hf16 = bf16_logits[case]

            def score(logits):
                return {"max_abs_diff": (logits - ref).abs().max().item(),
                        "mean_abs_diff": (logits - ref).abs().mean().item(),
                        "argmax_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}

            results[case]["fp32"] = {"ours_fp32_vs_transformers_fp32": score(hf32),
                                     "ours_bf16_vs_fp32": score(ours16), "transformers_bf16_vs_fp32": score(hf16)}
            print(case, "fp32", json.dumps(results[case]["fp32"]), flush=True)
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
