from pixtral.checkpoint.files import HF, MISTRAL, find_files, read_args
from pixtral.checkpoint.loader import load_model
from pixtral.checkpoint.save import convert_checkpoint, save_model

__all__ = ["HF", "MISTRAL", "find_files", "read_args", "load_model", "save_model", "convert_checkpoint"]
