"""Engine settings, with defaults that suit the device (small batches on CPU, large on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

GiB = 2**30


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int | None = None  # most requests running at once (CPU 64, GPU 256)
    max_num_batched_tokens: int | None = None  # tokens per step, decodes + prefill chunks (CPU 2048, GPU 8192)
    # Prompt tokens per step while other requests are decoding (0: no cap, the whole budget). On the
    # CPU a step's cost grows with every prompt token, so a long prompt arriving amid decodes would
    # stall them: capped, a mixed step costs about twice a decode step there (`bench_serving.py
    # --mixed-steps`), and the prompt takes more, shorter steps. On the GPU, where a decode step is
    # bound by reading the weights, prompt tokens ride along nearly free: no cap by default.
    prefill_tokens_while_decoding: int | None = None  # (CPU 256, GPU 0)
    kv_cache_bytes: int | None = None  # memory for the KV cache; None: sized from the device
    num_blocks: int | None = None  # exact number of blocks (tests); overrides kv_cache_bytes
    gpu_memory_utilization: float = 0.90  # GPU: share of the card's memory the engine may fill
    max_model_len: int | None = None  # longest sequence; default and cap: the model's max_seq_len
    enable_prefix_caching: bool = True
    encoder_cache_tokens: int = 16384  # image features kept for reuse, in image tokens
    max_waiting: int = 1024  # bounded waiting queue: beyond it requests are refused (HTTP 429)
    cuda_graphs: bool = True  # GPU: replay the decode step as CUDA graphs
    max_graph_batch: int = 256  # GPU: largest decode batch captured in a graph
    fuse_projections: bool = True  # GPU: one matmul for q/k/v and one for the FFN's gate/up (`Pixtral.fuse_projections`)
    triton_kernels: bool = True  # GPU, with Triton installed: paged decode attention and fused norm/RoPE/SiLU kernels
    # Ranks the model is split over, one process each (the engine's own is rank 0; see engine/executor.py).
    # 1: the whole model in this process, no other process.
    tensor_parallel_size: int = 1

    def resolved(self, device: torch.device) -> "EngineConfig":
        """A copy with the device-dependent defaults filled in, checked."""
        gpu = device.type == "cuda"
        cfg = replace(
            self,
            max_num_seqs=self.max_num_seqs or (256 if gpu else 64),
            max_num_batched_tokens=self.max_num_batched_tokens or (8192 if gpu else 2048),
            prefill_tokens_while_decoding=(self.prefill_tokens_while_decoding
                                           if self.prefill_tokens_while_decoding is not None else (0 if gpu else 256)),
            cuda_graphs=self.cuda_graphs and gpu,
        )
        tp = cfg.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"engine setting 'tensor_parallel_size' must be a positive integer, got {tp!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "encoder_cache_tokens", "max_waiting"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"engine setting {name!r} must be a positive integer, got {value!r}")
        if not isinstance(cfg.prefill_tokens_while_decoding, int) or cfg.prefill_tokens_while_decoding < 0:
            raise ValueError("engine setting 'prefill_tokens_while_decoding' must be a non-negative integer "
                             f"(0: no cap), got {cfg.prefill_tokens_while_decoding!r}")
        if cfg.max_num_batched_tokens < cfg.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({cfg.max_num_seqs}), so that every running request can decode in each step"
            )
        if cfg.num_blocks is not None and cfg.num_blocks < 2:
            raise ValueError(f"engine setting 'num_blocks' must be at least 2, got {cfg.num_blocks}")
        return cfg


def default_cpu_kv_bytes() -> int:
    """CPU: a fifth of the machine's memory, at most 4 GiB, and at most half of what is still
    available (called once the model is loaded: a large or quantized model leaves less).
    Pages are only touched when used, so this is a cap on what the cache may grow to."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * GiB
    budget = min(4 * GiB, total // 5)
    available = available_memory_bytes()
    return int(budget if available is None else min(budget, available // 2))


def available_memory_bytes() -> int | None:
    """The memory the kernel says new allocations can get without swapping (Linux: MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
