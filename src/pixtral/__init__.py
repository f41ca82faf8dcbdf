"""pixtral: Pixtral vision-language models in plain PyTorch.

Stable API:
    load_model(path, device=..., dtype=...)   -> model; model(input_ids, images) -> logits
    load_processor(path)                      -> processor; processor.encode_chat(messages) -> (ids, images)
    LLM(path).chat(conversations, SamplingParams(...))   batched offline inference (engine)
    SamplingParams(structured_output=StructuredOutput(json_schema=...))   answers held to a JSON schema
"""

from pixtral.checkpoint import convert_checkpoint, load_model, save_model
from pixtral.generation import SamplingParams
from pixtral.processing import load_processor
from pixtral.structured import StructuredOutput

__version__ = "0.1.0"
__all__ = ["load_model", "load_processor", "save_model", "convert_checkpoint", "SamplingParams", "StructuredOutput",
           "LLM"]


def __getattr__(name):
    # The engine pulls in more machinery; import it only when asked for.
    if name == "LLM":
        from pixtral.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'pixtral' has no attribute {name!r}")
