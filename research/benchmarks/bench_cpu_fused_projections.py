"""Do fused q/k/v and gate/up projections (`Pixtral.fuse_projections`, used on the GPU) pay on the CPU?

    .venv/bin/python research/benchmarks/bench_cpu_fused_projections.py

The embedded default model in fp32 on one thread, with and without fused projections, measured side
by side (alternating, best of 6) through `LLM.generate`: 64 new tokens for 1 and for 8 prompts of
35 tokens. Both must give the same greedy tokens.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # common.py
from common import text_prompt  # noqa: E402

from pixtral.assets import DEFAULT_MODEL_DIR  # noqa: E402
from pixtral.checkpoint import load_model  # noqa: E402
from pixtral.engine import LLM  # noqa: E402
from pixtral.generation import SamplingParams  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    processor = load_processor(DEFAULT_MODEL_DIR)

    def engine(fused: bool) -> LLM:
        model = load_model(DEFAULT_MODEL_DIR, "cpu", torch.float32)
        if fused:
            model.fuse_projections()
        return LLM.from_model(model, processor, num_blocks=2048, max_num_seqs=16)

    llms = {"separate": engine(False), "fused": engine(True)}
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    print("| prompts | separate (tok/s) | fused (tok/s) | same tokens |\n|---|---|---|---|")
    for n in (1, 8):
        prompts = [text_prompt(processor, 35, seed=s) for s in range(n)]
        tokens = {k: [o.outputs[0].token_ids for o in llm.generate(prompts, params)] for k, llm in llms.items()}
        best = dict.fromkeys(llms, float("inf"))
        for _ in range(6):
            for k, llm in llms.items():
                t = time.perf_counter()
                llm.generate(prompts, params)
                best[k] = min(best[k], time.perf_counter() - t)
        rate = {k: n * 64 / b for k, b in best.items()}
        print(f"| {n} | {rate['separate']:.0f} | {rate['fused']:.0f} | {tokens['separate'] == tokens['fused']} |")


if __name__ == "__main__":
    main()
