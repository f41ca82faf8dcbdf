"""Loading streams tensors: at most one tensor is read from disk and not yet in the model.

(A resident-memory reading was tried first; on this shared machine it was too noisy to tell one
copy from two, so the property is checked directly on the loader.)
"""

from __future__ import annotations

import torch

from pixtral.checkpoint import load_model, loader, reader, save_model
from tests.conftest import random_model


def test_at_most_one_tensor_in_flight(tmp_path, monkeypatch):
    path = save_model(random_model("tiny"), tmp_path / "m", layout="hf")  # HF: permutation on the way in
    in_flight, peak, largest = [0], [0], [0]
    real_open, real_set = reader.safe_open, loader._set_parameter

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self._handle = real_open(*args, **kwargs)

        def get_tensor(self, name):
            t = self._handle.get_tensor(name)
            in_flight[0] += t.numel() * t.element_size()
            peak[0] = max(peak[0], in_flight[0])
            largest[0] = max(largest[0], t.numel() * t.element_size())
            return t

    def counting_set(model, name, value):
        in_flight[0] -= value.numel() * value.element_size()
        real_set(model, name, value)

    monkeypatch.setattr(reader, "safe_open", CountingHandle)
    monkeypatch.setattr(loader, "_set_parameter", counting_set)
    model = load_model(path, dtype=torch.float32)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert in_flight[0] == 0
    assert peak[0] == largest[0] < total / 2


def test_model_is_built_without_allocating(monkeypatch, tmp_path):
    """The model skeleton lives on the meta device: parameters only ever exist once, loaded."""
    path = save_model(random_model("tiny"), tmp_path / "m")
    devices = []
    real_set = loader._set_parameter

    def spy(model, name, value):
        devices.append(model.get_submodule(name.rpartition(".")[0])._parameters[name.rpartition(".")[2]].device.type)
        real_set(model, name, value)

    monkeypatch.setattr(loader, "_set_parameter", spy)
    load_model(path)
    assert devices and set(devices) == {"meta"}
