"""Tensor parallelism, applied from outside the model (`plan`: who holds what; `tensor_parallel`:
the rank's modules and their communication; `loading`: each rank reads only its slices)."""

from pixtral.parallel.loading import load_tp_model
from pixtral.parallel.plan import (
    Split, TensorParallelPlan, check_tensor_parallel, tensor_parallel_problems, vision_choice,
)
from pixtral.parallel.tensor_parallel import TensorParallelInfo, shard_model

__all__ = [
    "Split", "TensorParallelPlan", "TensorParallelInfo", "check_tensor_parallel", "tensor_parallel_problems",
    "vision_choice", "shard_model", "load_tp_model",
]
