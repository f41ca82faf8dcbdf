"""Files shipped inside the package: the embedded default model."""

from __future__ import annotations

from pathlib import Path

from pixtral.errors import CheckpointError

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "params.json").is_file():
        raise CheckpointError(
            f"no --model given and the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
            "pass --model PATH"
        )
    return DEFAULT_MODEL_DIR
