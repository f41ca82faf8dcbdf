"""Shared fixtures: small random models with non-trivial logits, the shipped tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixtral.model import Pixtral, preset
from pixtral.processing.loading import SHIPPED_TEKKEN, write_tokenizer_for

REPO = Path(__file__).resolve().parents[1]


def random_model(name: str = "tiny", seed: int = 0, std: float = 0.2) -> Pixtral:
    """A model whose weights are large enough that logits spread over several units.

    With the usual tiny init (std 0.02) every logit is ~0 and parity checks would pass for a
    wrong model, so the weights are drawn wider here.
    """
    torch.manual_seed(seed)
    model = Pixtral(preset(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="session")
def shipped_tekken() -> Path:
    return SHIPPED_TEKKEN


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random `tiny` checkpoint in the Mistral layout, with its tokenizer."""
    from pixtral.checkpoint import save_model

    root = tmp_path_factory.mktemp("ckpt")
    model = random_model("tiny")
    tok = write_tokenizer_for(model.args, root / "tekken.json")
    return save_model(model, root / "tiny", layout="mistral", tokenizer_file=tok)
