from pixtral.model.args import ModelArgs, VisionArgs, preset
from pixtral.model.pixtral import Pixtral

__all__ = ["ModelArgs", "VisionArgs", "Pixtral", "preset"]
