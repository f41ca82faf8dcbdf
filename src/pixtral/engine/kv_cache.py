"""The paged KV cache: keys and values for every layer in fixed-size blocks of tokens.

k[layer, block, slot] holds one token's keys [n_kv_heads, head_dim]. A sequence's tokens live
in the blocks listed in its block table, token p at block_table[p // block_size], slot
p % block_size. The number of blocks comes from a memory budget.
"""

from __future__ import annotations

import torch

from pixtral.engine.config import EngineConfig, default_cpu_kv_bytes
from pixtral.model.args import ModelArgs


def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * itemsize


class PagedKVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.n_kv_heads, self.head_dim = args.n_kv_heads, args.head_dim
        shape = (args.n_layers, num_blocks, block_size, args.n_kv_heads, args.head_dim)
        # GPU: zeros, because the static decode path reads (masked) slots nobody wrote, and a
        # masked NaN would still poison the sum. CPU: reads never go past a sequence's length,
        # and `empty` leaves untouched pages unallocated, so a large budget costs nothing idle.
        make = torch.zeros if device.type == "cuda" else torch.empty
        self.k = make(shape, device=device, dtype=dtype)
        self.v = make(shape, device=device, dtype=dtype)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat views [num_blocks * block_size, n_kv_heads, head_dim] of one layer's keys and values."""
        return (self.k[layer].view(-1, self.n_kv_heads, self.head_dim),
                self.v[layer].view(-1, self.n_kv_heads, self.head_dim))


def num_blocks_for(model, config: EngineConfig, reserved_bytes: int = 0) -> int:
    """How many blocks fit the budget: explicit count, explicit bytes, or what the device has left."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = bytes_per_block(model.args, config.block_size, model.dtype)
    budget = config.kv_cache_bytes
    if budget is None:
        if model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(model.device)
            in_use = total - free
            budget = int(total * config.gpu_memory_utilization) - in_use - reserved_bytes
        else:
            budget = default_cpu_kv_bytes()
    blocks = budget // per_block
    if blocks < 2:
        raise ValueError(
            f"the KV cache budget of {budget / 2**20:.1f} MiB holds {blocks} blocks of {config.block_size} tokens "
            f"({per_block / 2**20:.2f} MiB each); give the engine more memory"
        )
    return int(blocks)


def engine_num_blocks(model, config: EngineConfig) -> int:
    """The blocks an engine over `model` can have on its device: on a GPU without an explicit
    budget, what is left after the largest step's activations and the encoder cache (measured by
    running that step: under tensor parallelism a collective, so every rank calls this together)."""
    reserved = 0
    if model.device.type == "cuda" and config.num_blocks is None and config.kv_cache_bytes is None:
        reserved = reserve_bytes(profile_activation_bytes(model, config), model.args, config)
    return num_blocks_for(model, config, reserved)


def reserve_bytes(peak_activation_bytes: int, args: ModelArgs, config: EngineConfig) -> int:
    """What a GPU engine keeps free beside the weights and the KV cache: the largest step's activation
    peak with a 20% margin, the decode graphs' logits, 2 GiB for the vision encoder on a large image,
    and the encoder cache (bf16 features of `encoder_cache_tokens` image tokens)."""
    logits = config.max_graph_batch * args.vocab_size * 4 * 2
    encoder_cache = config.encoder_cache_tokens * args.dim * 2
    return int(peak_activation_bytes * 1.2) + logits + 2 * 2**30 + encoder_cache


def profile_activation_bytes(model, config: EngineConfig) -> int:
    """GPU: peak memory of the largest step (a full prefill chunk) beyond what is allocated now (measured)."""
    device = model.device
    if device.type != "cuda":
        return 0
    from pixtral.model.attention import PackedCausal

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    n = config.max_num_batched_tokens
    with torch.inference_mode():
        ids = torch.zeros(n, dtype=torch.long, device=device)
        hidden = model.hidden_states(model.tok_embeddings(ids), PackedCausal([n], device=device))
        model.logits(hidden[-config.max_num_seqs:])
        del hidden
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak
