"""How a tensor-parallel model fills its GPUs, on paper: weights, KV cache, the context that fits.

The same accounting the engine does at startup (`engine.kv_cache.num_blocks_for`): the KV cache
gets `gpu_memory_utilization` of the card, less the weights and a reserve for activations; each
rank holds its share of the weights (counted from the rank's sharded model, built on the meta
device: no memory) and the keys and values of its own KV heads (`bytes_per_block` of the rank's
args). The engine measures its activation peak by running the largest step; here it is
estimated from the shapes of that step (`activation_bytes`), with the engine's own margins.
`docs/architecture.md` quotes `memory_plan` for Pixtral-Large on 4 and 8 H100s and H200s, and
a test keeps the two in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixtral.checkpoint.loader import model_bytes
from pixtral.engine.config import EngineConfig
from pixtral.engine.kv_cache import bytes_per_block, reserve_bytes
from pixtral.model.args import ModelArgs
from pixtral.model.pixtral import Pixtral
from pixtral.parallel.plan import TensorParallelPlan
from pixtral.parallel.tensor_parallel import shard_model

GiB = 2**30

# Memory as `torch.cuda.mem_get_info` reports it (nvidia-smi's MiB), for the cards the docs plan for.
GPUS = {"H100 80GB": 81559 * 2**20, "H200": 143771 * 2**20}


@dataclass
class MemoryPlan:
    tp: int
    gpu_bytes: int
    weight_bytes: int  # per rank
    reserve_bytes: int  # per rank: activations, the decode graphs' logits, the encoder cache, a fixed margin
    kv_bytes_per_token: int  # per rank: its KV heads, every layer, keys and values
    kv_budget_bytes: int  # per rank
    max_model_len: int

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache holds (all sequences together), in whole blocks of 16."""
        return max(0, self.kv_budget_bytes // (16 * self.kv_bytes_per_token)) * 16

    @property
    def longest_context(self) -> int:
        return min(self.max_model_len, self.kv_tokens)

    def batch_at(self, context: int) -> int:
        """How many sequences of `context` tokens fit at once."""
        return self.kv_tokens // context if context <= self.max_model_len else 0


def rank_weight_bytes(args: ModelArgs, tp: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one rank's weights (the largest rank's: ranks hold equal shares, replicas included)."""
    with torch.device("meta"):
        model = Pixtral(args)
    if tp > 1:
        shard_model(model, 0, tp)
    return model_bytes(model, dtype)


def activation_bytes(args: ModelArgs, tp: int, config: EngineConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """The engine's reserve beside the weights and the KV cache, per rank (`engine.kv_cache.reserve_bytes`),
    with the activation peak estimated instead of measured (`profile_activation_bytes` on a GPU).

    The peak is a full prefill chunk of `max_num_batched_tokens` tokens through one layer: its
    input and residual, q/k/v of the rank's heads, the attention output, and the FFN's gate, up
    and their product, all live at once, plus the logits of `max_num_seqs` rows (float32, all
    gathered).
    """
    plan = TensorParallelPlan(args, tp)
    item = dtype.itemsize
    t = config.max_num_batched_tokens
    qkv = (plan.n_heads + 2 * plan.n_kv_heads) * args.head_dim
    layer = t * (2 * args.dim + qkv + plan.n_heads * args.head_dim + 3 * plan.hidden_dim) * item
    logits = config.max_num_seqs * args.vocab_size * 4
    return reserve_bytes(layer + logits, args, config)


def memory_plan(args: ModelArgs, tp: int, gpu_bytes: int, config: EngineConfig | None = None,
                dtype: torch.dtype = torch.bfloat16) -> MemoryPlan:
    """The plan for one rank of `tp` on a card of `gpu_bytes` (the engine's GPU defaults unless `config`)."""
    config = (config or EngineConfig()).resolved(torch.device("cuda"))
    plan = TensorParallelPlan(args, tp)
    weights = rank_weight_bytes(args, tp, dtype)
    reserve = activation_bytes(args, tp, config, dtype)
    per_token = bytes_per_block(plan.local_args(), config.block_size, dtype) // config.block_size
    budget = int(gpu_bytes * config.gpu_memory_utilization) - weights - reserve
    return MemoryPlan(tp, gpu_bytes, weights, reserve, per_token, max(0, budget), args.max_seq_len)


def plan_table(args: ModelArgs, sizes=(4, 8), gpus=GPUS, contexts=(4096, 32768, 131072)) -> str:
    """The Markdown table `docs/architecture.md` quotes."""
    head = ["GPUs", "weights / rank", "reserve / rank", "KV / token / rank", "KV cache / rank", "tokens in cache",
            "longest context", *(f"batch at {c // 1024}K" for c in contexts)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, total in gpus.items():
        for tp in sizes:
            p = memory_plan(args, tp, total)
            cells = [f"{tp} x {name}", f"{p.weight_bytes / GiB:.1f} GiB", f"{p.reserve_bytes / GiB:.1f} GiB",
                     f"{p.kv_bytes_per_token / 1024:.0f} KiB", f"{p.kv_budget_bytes / GiB:.1f} GiB",
                     f"{p.kv_tokens:,}", f"{p.longest_context:,}", *(f"{p.batch_at(c)}" for c in contexts)]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
