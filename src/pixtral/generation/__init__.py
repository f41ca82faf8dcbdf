from pixtral.generation.generate import Completion, chat, generate_ids, stream_chat
from pixtral.generation.params import SamplingParams

__all__ = ["Completion", "SamplingParams", "chat", "generate_ids", "stream_chat"]
