"""Which tokenizer a checkpoint gets."""

from __future__ import annotations

import pytest

from pixtral.checkpoint import save_model
from pixtral.errors import ConfigError
from pixtral.processing import load_processor
from pixtral.processing.loading import SHIPPED_TEKKEN
from tests.conftest import random_model


def test_checkpoint_tekken_is_preferred(tiny_checkpoint):
    assert load_processor(tiny_checkpoint).tokenizer.instruct_tokenizer.tokenizer.file_path == tiny_checkpoint / "tekken.json"


@pytest.mark.parametrize("layout", ["mistral", "hf"])
def test_shipped_tokenizer_when_the_checkpoint_has_none(tmp_path, layout):
    path = save_model(random_model("tiny"), tmp_path / layout, layout=layout)  # no tokenizer_file
    processor = load_processor(path)
    assert processor.tokenizer.instruct_tokenizer.tokenizer.file_path == SHIPPED_TEKKEN
    assert processor.encode_chat([{"role": "user", "content": "Hello"}])[0] == [1, 3, 22177, 4]


def test_no_matching_tokenizer_is_a_clear_error(tmp_path):
    path = save_model(random_model("tiny-small-3.1"), tmp_path / "s")  # patch 14: nothing shipped matches
    with pytest.raises(ConfigError, match="no tekken.json in the checkpoint"):
        load_processor(path)
    with pytest.raises(ConfigError, match="no such checkpoint directory or tokenizer file"):
        load_processor(tmp_path / "nope")
