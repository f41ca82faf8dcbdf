"""Each rank reads only its slices, straight from the safetensors files (no processes needed:
loading takes rank and size explicitly; only running the model communicates)."""

from __future__ import annotations

import pytest
import torch

from pixtral.checkpoint import load_model, reader, save
from pixtral.checkpoint.files import find_files, read_args
from pixtral.checkpoint.layout import from_hf_rows, to_hf_rows
from pixtral.checkpoint.reader import TensorReader
from pixtral.errors import ConfigError
from pixtral.model import Pixtral
from pixtral.parallel import TensorParallelPlan, load_tp_model, shard_model
from pixtral.parallel.tensor_parallel import RowParallelLinear, VocabParallelEmbedding, VocabParallelHead

from .conftest import CHECKPOINTS, random_pixtral, tp_args


def test_hf_permutation_commutes_with_slicing_whole_heads():
    heads, head_dim = 6, 8
    mistral = torch.randn(heads * head_dim, 5)
    hf = to_hf_rows(mistral, heads, head_dim)
    for a, b in ((0, 2), (2, 4), (3, 6), (5, 6)):
        rows = slice(a * head_dim, b * head_dim)
        assert torch.equal(from_hf_rows(hf[rows], b - a, head_dim), mistral[rows])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_read_slice_equals_a_slice_of_the_whole_tensor(tp_checkpoints, name):
    files = find_files(tp_checkpoints[name])
    args = read_args(files)
    r = TensorReader(files, args)
    try:
        for rank in range(2):
            for ours, split in TensorParallelPlan(args, 2).splits(rank).items():
                if split is None:
                    continue
                whole = r.read(ours)
                part = r.read_slice(ours, split.dim, split.start, split.stop)
                assert torch.equal(part, whole.narrow(split.dim, split.start, split.stop - split.start)), ours
    finally:
        r.close()


def test_read_slice_refuses_part_of_a_head_in_the_hf_layout(tp_checkpoints):
    files = find_files(tp_checkpoints["hf_kv2"])
    r = TensorReader(files, read_args(files))
    with pytest.raises(ValueError, match="not whole heads of 16"):
        r.read_slice("layers.0.attention.wq.weight", 0, 8, 24)
    with pytest.raises(ValueError, match="cannot take"):
        r.read_slice("layers.0.attention.wq.weight", 0, 0, 1000)


class SpyHandle:
    """Records what safetensors materialises: whole tensors and slices, with their shapes."""

    log: list[tuple[str, str, tuple[int, ...]]] = []

    def __init__(self, *args, **kwargs):
        self._handle = reader_safe_open(*args, **kwargs)

    def get_tensor(self, name):
        t = self._handle.get_tensor(name)
        SpyHandle.log.append(("whole", name, tuple(t.shape)))
        return t

    def get_slice(self, name):
        sl = self._handle.get_slice(name)

        class Slice:
            def __getitem__(self, index):
                t = sl[index]
                SpyHandle.log.append(("slice", name, tuple(t.shape)))
                return t

        return Slice()


reader_safe_open = reader.safe_open


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_each_rank_reads_only_its_slices(tp_checkpoints, monkeypatch, name):
    """Measured where safetensors hands out tensors: a rank materialises whole only the tensors it
    keeps whole (norms, replicated vision parts), and of every sharded weight only its half."""
    files = find_files(tp_checkpoints[name])
    args = read_args(files)
    ours_of = {stored: ours for ours, (stored, _) in TensorReader(files, args).tensors.items()}
    full = {n: tuple(p.shape) for n, p in load_model(tp_checkpoints[name], dtype=torch.float32).named_parameters()}
    nbytes = lambda shape: torch.Size(shape).numel() * 4  # noqa: E731 (float32 checkpoints)
    total = sum(nbytes(s) for s in full.values())
    plan = TensorParallelPlan(args, 2)
    monkeypatch.setattr(reader, "safe_open", SpyHandle)
    read_per_rank = []
    for rank in range(2):
        splits = plan.splits(rank)
        whole = {n for n, s in splits.items() if s is None}
        # sharded: the rank's slice is smaller than the weight (a KV head replicated on both ranks is not)
        sharded = {n for n, s in splits.items() if s is not None and s.stop - s.start < full[n][s.dim]}
        SpyHandle.log = []
        model = load_tp_model(tp_checkpoints[name], rank, 2, dtype=torch.float32)
        log = {ours_of[stored]: (kind, shape) for kind, stored, shape in SpyHandle.log}
        assert len(log) == len(SpyHandle.log) == len(full)  # every tensor read once
        assert {n for n, (kind, _) in log.items() if kind == "whole"} == whole
        for n in sharded:
            kind, shape = log[n]
            assert kind == "slice" and torch.Size(shape).numel() * 2 == torch.Size(full[n]).numel(), n
        tp = model.tensor_parallel
        local = dict(model.named_parameters())
        assert tp.read_shapes == {n: tuple(p.shape) for n, p in local.items()} == {n: s for n, (_, s) in log.items()}
        expected = total - sum(nbytes(full[n]) for n in sharded) // 2
        assert tp.bytes_read == expected == sum(p.numel() * 4 for p in local.values())
        assert tp.bytes_read < 0.75 * total
        read_per_rank.append(tp.bytes_read)
    assert read_per_rank[0] == read_per_rank[1]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_loaded_slices_equal_the_in_memory_split(tp_checkpoints, name):
    """`load_tp_model` (slices from disk) and `shard_model` on a loaded whole model (gpt-fast's way,
    slicing tensors in memory) give the same rank models, HF permutation included."""
    whole = load_model(tp_checkpoints[name], dtype=torch.float32)
    for rank in range(2):
        from_disk = load_tp_model(tp_checkpoints[name], rank, 2, dtype=torch.float32)
        in_memory = shard_model(load_model(tp_checkpoints[name], dtype=torch.float32), rank, 2)
        a, b = dict(from_disk.named_parameters()), dict(in_memory.named_parameters())
        assert a.keys() == b.keys() == dict(whole.named_parameters()).keys()
        for n in a:
            assert torch.equal(a[n], b[n]), n
        assert type(from_disk.layers[0].attention.wo) is type(in_memory.layers[0].attention.wo)
        assert from_disk.args == in_memory.args


def test_sharded_hf_files(tmp_path, monkeypatch):
    """An HF checkpoint in several model-0000N-of-0000M.safetensors files loads the same slices."""
    model = random_pixtral(tp_args("hf_kv2"), seed=5)
    monkeypatch.setattr(save, "HF_SHARD_BYTES", 40_000)
    path = save.save_model(model, tmp_path / "sharded", layout="hf")
    assert len(find_files(path).weight_files) > 3
    for rank in range(2):
        got = dict(load_tp_model(path, rank, 2, dtype=torch.float32).named_parameters())
        want = dict(shard_model(random_pixtral(tp_args("hf_kv2"), seed=5), rank, 2).named_parameters())
        for n in want:
            assert torch.equal(got[n], want[n]), n


def test_refuses_an_impossible_size_before_reading(tp_checkpoints, monkeypatch):
    monkeypatch.setattr(reader, "safe_open", None)  # any read would fail
    with pytest.raises(ConfigError, match=r"n_heads \(4\) is not divisible by the tensor-parallel size 3") as err:
        load_tp_model(tp_checkpoints["hf_kv2"], 0, 3)
    assert str(tp_checkpoints["hf_kv2"]) in str(err.value)


def test_rank_defaults_need_a_process_group(tp_checkpoints):
    with pytest.raises(ValueError, match="give rank and size"):
        load_tp_model(tp_checkpoints["hf_kv2"])


def test_shard_model_keeps_the_meta_device_and_swaps_only_what_communicates():

    with torch.device("meta"):
        model = Pixtral(tp_args("mistral_kv2"))
    shard_model(model, 1, 2)
    assert all(p.is_meta for p in model.parameters())
    attn, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert type(attn.wq) is torch.nn.Linear and attn.wq.out_features == 2 * 16
    assert type(attn.wo) is RowParallelLinear and attn.wo.in_features == 2 * 16
    assert type(ffn.w1) is torch.nn.Linear and type(ffn.w2) is RowParallelLinear
    assert (attn.n_heads, attn.n_kv_heads) == (2, 1)
    assert type(model.tok_embeddings) is VocabParallelEmbedding and model.tok_embeddings.vocab_start == 128
    assert type(model.output) is VocabParallelHead and model.output.out_features == 128
    assert model.vision_encoder.transformer.layers[0].attention.n_heads == 1
    assert type(model.vision_language_adapter.w_out) is RowParallelLinear
    with pytest.raises(ValueError, match="already sharded"):
        shard_model(model, 1, 2)


def test_size_one_is_the_whole_model_without_communication(tp_checkpoints):
    path = tp_checkpoints["hf_kv1_merge"]
    whole = load_model(path, dtype=torch.float32)
    one = load_tp_model(path, 0, 1, dtype=torch.float32)
    assert one.tensor_parallel.size == 1 and one.args == whole.args
    ids = torch.tensor([1, 5, 7, 9])
    torch.testing.assert_close(one(ids), whole(ids), atol=0, rtol=0)  # runs with no process group


def test_images_are_dealt_by_patch_count():
    from pixtral.parallel.tensor_parallel import deal

    assert deal([6, 4, 3], 2) == [0, 1, 1]
    assert deal([1, 1, 1, 1, 8], 2) == [1, 1, 1, 1, 0]
    assert deal([5], 4) == [0]
