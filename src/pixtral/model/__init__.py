from pixtral.model.args import ModelArgs, VisionArgs
from pixtral.model.presets import PRESETS, preset
from pixtral.model.pixtral import Pixtral

__all__ = ["ModelArgs", "VisionArgs", "Pixtral", "PRESETS", "preset"]
