"""The per-token cost of constrained decoding (response_format / forced tool calls) in the engine.

    .venv/bin/python benchmarks/bench_structured.py [--batch 8] [--new-tokens 64] [--threads 2]

For the embedded default model (4000-token vocabulary) and a random dim-256 x 4-layer model with the
real 131072-token vocabulary, in fp32 on the CPU: a batch of `--batch` short prompts decoded greedily
for exactly `--new-tokens` tokens each (the schema needs more than that, so constrained rows run to
max_tokens too), with no row constrained, half of them, and all. Printed side by side: output tokens/s
and the time overhead over the unconstrained batch; then what the mask itself costs per row and token
(computed and applied, outside the engine), for the same schema.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, random_model, text_prompt  # noqa: E402

from pixtral.assets import DEFAULT_MODEL_DIR  # noqa: E402
from pixtral.checkpoint import load_model  # noqa: E402
from pixtral.engine import LLM  # noqa: E402
from pixtral.generation import SamplingParams  # noqa: E402
from pixtral.model.args import ModelArgs  # noqa: E402
from pixtral.processing import load_processor  # noqa: E402
from pixtral.processing.loading import write_tokenizer_for  # noqa: E402
from pixtral.structured import StructuredOutput, grammar_tokenizer  # noqa: E402
from pixtral.structured.masks import Masker  # noqa: E402

# An invoice: 8 line items, so that no answer finishes before max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["number", "items", "total"], "properties": {
    "number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
    "items": {"type": "array", "minItems": 8, "maxItems": 8, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "qty", "price"], "properties": {
            "name": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01}}}},
    "total": {"type": "number", "minimum": 0, "multipleOf": 0.01},
    "currency": {"enum": ["EUR", "USD", "GBP"]}}}


def load(name: str):
    if name == "default":
        return load_model(DEFAULT_MODEL_DIR, "cpu", torch.float32), load_processor(DEFAULT_MODEL_DIR)
    args = ModelArgs(dim=256, n_layers=4, head_dim=64, hidden_dim=768, n_heads=4, n_kv_heads=2,
                     vocab_size=131072, rope_theta=1e9, max_seq_len=4096)
    model = random_model(args, torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(write_tokenizer_for(args, Path(tmp) / "tekken.json"))
    return model, processor


def bench(name: str, batch: int, new_tokens: int, reps: int) -> dict:
    model, processor = load(name)
    llm = LLM.from_model(model, processor, num_blocks=2048, max_num_seqs=max(16, batch))
    prompts = [text_prompt(processor, 32, seed=s) for s in range(batch)]
    free = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=new_tokens,
                                 structured_output=StructuredOutput(json_schema=SCHEMA))
    mixes = {"none": 0, "half": batch // 2, "all": batch}

    def run(label: str) -> float:
        params = [constrained] * mixes[label] + [free] * (batch - mixes[label])
        llm.engine.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs), "a row ended early"
        return seconds

    for label in mixes:  # warm up
        run(label)
    # Interleaved, so that a busy neighbour on a shared CPU slows every mix alike; the median of each.
    times = {label: [] for label in mixes}
    for _ in range(reps):
        for label in mixes:
            times[label].append(run(label))
    row = {"model": name, "vocab": processor.vocab_size, "mask_us": mask_cost(processor, new_tokens)}
    row.update({label: batch * new_tokens / float(np.median(t)) for label, t in times.items()})
    return row


def mask_cost(processor, tokens: int) -> float:
    """Microseconds per row and token to compute the mask alone: one matcher driven along a valid answer."""
    grammar = StructuredOutput(json_schema=SCHEMA).compile(grammar_tokenizer(processor))
    answer = ('{"number":"AB-1234","items":[' + ",".join(['{"name":"bolts","qty":3,"price":12.5}'] * 8)
              + '],"total":100.25,"currency":"EUR"}')
    masker, matcher, times = Masker(processor.vocab_size), grammar.matcher(), []
    for token in processor.encode_text(answer)[:tokens]:
        start = time.perf_counter()
        masker.start({"row": matcher}).apply(torch.zeros(1, processor.vocab_size), ["row"])
        times.append(time.perf_counter() - start)
        assert matcher.consume_token(token)
    masker.close()
    return 1e6 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(describe_machine(torch.device("cpu")))
    print(f"batch {a.batch}, {a.new_tokens} new tokens per row, greedy; output tokens/s (overhead vs none)")
    print(f"{'model':>8} {'vocab':>7} {'none':>9} {'half':>17} {'all':>17} {'mask/row/token':>15}")
    for name in ("default", "random131k"):
        r = bench(name, a.batch, a.new_tokens, a.reps)
        half, full = (f"{r[k]:9.1f} ({100 * (r['none'] / r[k] - 1):+4.0f}%)" for k in ("half", "all"))
        print(f"{r['model']:>8} {r['vocab']:>7} {r['none']:9.1f} {half:>17} {full:>17} {r['mask_us']:12.0f} us")


if __name__ == "__main__":
    main()
