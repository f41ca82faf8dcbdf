"""Chat/document encoding and the per-line error reports for bad training data."""

from __future__ import annotations

import json
import multiprocessing.pool

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from pixtral.processing import Processor
from pixtral.train.config import load_config
from pixtral.train.data import DataError, load_jsonl
from pixtral.train.tokenizer import write_small_tekken
from pixtral.model.args import VisionArgs


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return write_small_tekken(300, tmp_path_factory.mktemp("tok") / "tekken.json",
                              VisionArgs(image_size=64, patch_size=16))


@pytest.fixture(scope="module")
def processor(tokenizer_file):
    return Processor.from_file(tokenizer_file)


def test_chat_targets_are_exactly_the_answers_and_eos(processor, chat_data):
    examples, report = load_jsonl(chat_data, processor, 10_000)
    assert report.kept == 40 and not report.skipped
    ex = examples[0]  # two turns
    answers = [json.loads(chat_data.read_text().splitlines()[0])["messages"][k]["content"] for k in (1, 3)]
    spans, cur = [], []
    for tok, on in zip(ex.ids, ex.mask):
        if on:
            cur.append(tok)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    assert [processor.decode(s[:-1]) for s in spans] == answers
    assert all(s[-1] == processor.eos_id for s in spans)


def test_chat_ids_match_mistral_common_finetuning_encoding(processor, tokenizer_file, chat_data):
    """The whole conversation encodes as mistral-common's own (finetuning mode) encoding."""
    examples, _ = load_jsonl(chat_data, processor, 10_000)
    record = json.loads(chat_data.read_text().splitlines()[0])
    tok = MistralTokenizer.from_file(str(tokenizer_file), mode=ValidationMode.finetuning)
    from PIL import Image

    m = record["messages"]
    image = Image.open(chat_data.parent / m[0]["content"][0]["image_url"]["url"])
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk

    req = ChatCompletionRequest(messages=[
        UserMessage(content=[ImageChunk(image=image), TextChunk(text=m[0]["content"][1]["text"])]),
        AssistantMessage(content=m[1]["content"]),
        UserMessage(content=m[2]["content"]),
        AssistantMessage(content=m[3]["content"]),
    ])
    assert tok.encode_chat_completion(req).tokens == examples[0].ids


def test_document_loss_on_text_only(processor, chat_data, tmp_path):
    doc = tmp_path / "docs.jsonl"
    img = str(chat_data.parent / "images" / "train0.png")
    doc.write_text(json.dumps({"content": [{"type": "text", "text": "A picture:"},
                                           {"type": "image_url", "image_url": {"url": img}},
                                           {"type": "text", "text": "the end."}]}) + "\n")
    [ex], _ = load_jsonl(doc, processor, 10_000)
    img_ids = set(processor.image_token_ids.values())
    assert not any(on for t, on in zip(ex.ids, ex.mask) if t in img_ids)
    assert processor.decode([t for t, on in zip(ex.ids, ex.mask) if on]) == "A picture:the end."
    assert ex.ids[-1] == processor.eos_id and ex.mask[-1]


def test_bad_lines_are_reported_with_file_and_line(processor, chat_data, tmp_path):
    good = chat_data.read_text().splitlines()[1]
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "images").symlink_to(chat_data.parent / "images")
    lines = [
        good,
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "images/missing.png"}}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 300}]}),
        json.dumps({"something": 1}),
        "",
        good,
    ]
    bad.write_text("\n".join(lines) + "\n")
    logged = []
    examples, report = load_jsonl(bad, processor, 200, log=logged.append)
    assert len(examples) == 2 and report.kept == 2
    text = "\n".join(logged)
    assert f"{bad}:2: " in text and "Expecting" in text  # invalid JSON
    assert f"{bad}:3: " in text and "missing.png" in text
    assert f"{bad}:4: " in text and "assistant" in text
    assert f"{bad}:5: " in text and "over the limit of 200" in text
    assert f"{bad}:6: " in text and "'messages'" in text
    summary = report.summary("train")
    assert "2 of 7 samples kept" in summary
    assert "1 too long" in summary and "1 bad or missing images" in summary and "1 invalid JSON" in summary
    with pytest.raises(DataError, match=f"{bad}:2: "):
        load_jsonl(bad, processor, 200, on_error="fail", log=lambda *_: None)


def _bad_file(chat_data, tmp_path):
    """The good chat lines with a bad line (invalid JSON) and a missing image among them."""
    lines = chat_data.read_text().splitlines()
    lines[5] = "{not json"
    record = json.loads(lines[12])
    record["messages"][0]["content"][0]["image_url"]["url"] = "images/missing.png"
    lines[12] = json.dumps(record)
    path = tmp_path / "mixed.jsonl"
    (tmp_path / "images").symlink_to(chat_data.parent / "images")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_workers_give_the_same_examples_and_report(processor, chat_data, tmp_path, monkeypatch):
    import pixtral.train.data as data

    path = _bad_file(chat_data, tmp_path)
    one_log, two_log = [], []
    one, one_report = load_jsonl(path, processor, 10_000, log=one_log.append)
    monkeypatch.setattr(data, "MIN_LINES_PER_WORKER", 1)  # fork even for this small file
    chunks = []
    starmap = multiprocessing.pool.Pool.starmap
    monkeypatch.setattr(multiprocessing.pool.Pool, "starmap",
                        lambda pool, f, args: chunks.extend(args) or starmap(pool, f, args))
    two, two_report = load_jsonl(path, processor, 10_000, log=two_log.append, workers=3)
    assert [first for first, _ in chunks] == [0, 14, 28]  # three workers, a third of the lines each
    assert [(e.ids, e.mask, e.images, e.where) for e in one] == [(e.ids, e.mask, e.images, e.where) for e in two]
    assert one_report == two_report and one_report.kept == 38
    assert one_log == two_log and len(one_log) == 2
    assert f"{path}:6: " in one_log[0] and f"{path}:13: " in one_log[1] and "missing.png" in one_log[1]
    with pytest.raises(DataError, match=f"{path}:13: .*missing.png"):  # raised in the second worker
        load_jsonl(_only_bad_image(path), processor, 10_000, on_error="fail", workers=3)


def _only_bad_image(path):
    """`path` without its invalid-JSON line 6 (now a blank line): the missing image on line 13 fails."""
    lines = path.read_text().splitlines()
    lines[5] = ""
    path.write_text("\n".join(lines) + "\n")
    return path


def test_conversation_encodes_each_image_once(processor, chat_data, monkeypatch):
    """Each prefix of a multi-turn conversation holds the same image; it is resized once."""
    encoder = processor._image_encoder._encoder
    calls = []
    monkeypatch.setattr(type(encoder), "__call__", _recording(type(encoder).__call__, calls))
    examples, _ = load_jsonl(chat_data, processor, 10_000)
    record = json.loads(chat_data.read_text().splitlines()[0])
    assert sum(m["role"] == "assistant" for m in record["messages"]) == 2  # two prefixes
    n_images = sum(len(e.images) for e in examples)
    assert len(calls) == n_images  # not once per prefix


def _recording(call, calls):
    def wrapper(self, chunk):
        calls.append(chunk)
        return call(self, chunk)
    return wrapper


def test_images_are_encoded_at_load_and_only_the_stand_in_is_kept(processor, chat_data):
    from mistral_common.protocol.instruct.chunk import ImageChunk
    from PIL import Image

    path = chat_data.parent / "images" / "train0.png"
    a, b = Image.open(path).convert("RGB"), Image.open(path).convert("RGB")
    enc = processor._image_encoder
    stand_in = enc.encode_now(a)
    assert stand_in.size == (1, 1)  # the full-size pixels are not kept
    first = enc(ImageChunk(image=stand_in))
    assert enc(ImageChunk(image=stand_in)) is first  # every prefix gets the same encoding
    other = enc(ImageChunk(image=b))  # an image not loaded by the processor: encoded as usual
    assert other is not first and other.tokens == first.tokens
    assert (other.image == first.image).all()
    assert enc.special_ids == processor._image_encoder._encoder.special_ids  # attributes pass through


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.jsonl\noptim:\n  lr: 1\nsteps: 5\n")
    cfg = load_config(path, ["optim.lr=2e-4", "lora.enabled=true", "lora.targets=[wq, w1]", "freeze=[vision_encoder]"])
    assert cfg.data.train == ["a.jsonl"] and cfg.optim.lr == 2e-4 and cfg.steps == 5
    assert cfg.lora.enabled and cfg.lora.targets == ["wq", "w1"] and cfg.freeze == ["vision_encoder"]
    from pixtral.errors import ConfigError

    unknown = r"c\.yaml: top level: unknown key\(s\) \['optimizer'\]; known: out_dir, model, data, lora, optim, freeze, "
    with pytest.raises(ConfigError, match=unknown):
        load_config(path, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match=r"c\.yaml: steps: expected an integer, got 'abc'$"):
        load_config(path, ["steps=abc"])


def test_config_refuses_bad_worker_counts(tmp_path):
    from pixtral.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.jsonl\n")
    assert load_config(path).data.workers == 0  # one per core
    assert load_config(path, ["data.workers=3"]).data.workers == 3
    with pytest.raises(ConfigError, match="'data.workers' must be a whole number >= 0"):
        load_config(path, ["data.workers=-1"])
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.workers: expected an integer, got True$"):
        load_config(path, ["data.workers=true"])


def test_config_errors_name_the_file_the_key_and_what_is_wrong(tmp_path):
    """Every problem of a config, one line each: the file, the key path, what was expected and what
    was given; YAML 1.1's 2e-4 (a string to PyYAML) is a number, and an empty section its defaults."""
    from pixtral.errors import ConfigError
    from pixtral.train.config import config_from_tree

    path = tmp_path / "c.yaml"
    path.write_text("model:\ndata:\n  train: a.jsonl\noptim:\n  lr: 2e-4\n  betas: [0.9, 1e-3]\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == [0.9, 1e-3] and cfg.model.init == "preset:tiny"
    path.write_text("optim:\n  lr: fast\n  lrr: 1\ndata:\n  train: [a.jsonl, 3]\nbf16: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines() == [
        f"{path}: data.train[1]: expected a string, got 3",
        f"{path}: optim.lr: expected a number, got 'fast'",
        f"{path}: bf16: expected true or false, got 1",
        f"{path}: optim: unknown key(s) ['lrr']; known: lr, min_lr_ratio, warmup_steps, weight_decay, betas, eps, "
        "grad_clip, vision_lr_scale, encoder_lr_scale, image_feature_l2",
    ]
    with pytest.raises(ConfigError, match=r"^x\.pt: top level: expected a mapping, got \[1, 2\]$"):
        config_from_tree([1, 2], "x.pt")
    with pytest.raises(ConfigError, match=r"^config: model: expected a mapping, got 'tiny'$"):
        load_config(None, ["model=tiny"])


def test_config_dumps_to_yaml_and_back(tmp_path):
    """What the trainer writes to config.yaml (and into checkpoints) reads back as the same config."""
    import yaml

    from pixtral.train.config import config_from_tree

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.jsonl\nmodel:\n  args: {dim: 64, vision: {num_hidden_layers: 2}}\n")
    cfg = load_config(path, ["optim.lr=2e-4", "freeze=[vision_encoder]"])
    text = yaml.safe_dump(cfg.model_dump(), sort_keys=False)
    assert config_from_tree(yaml.safe_load(text), "config.yaml") == cfg


def test_removed_model_options_load_when_false_and_are_refused_when_true(tmp_path):
    """model.blank_patch_init and model.local_encoder_init left the trainer: the config.yaml and
    checkpoints of older runs hold them as false, and still load; true names what happened."""
    import re

    from pixtral.errors import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text("data:\n  train: a.jsonl\nmodel:\n  blank_patch_init: false\n  local_encoder_init: false\n")
    cfg = load_config(path)
    assert "blank_patch_init" not in cfg.model.model_dump() and "local_encoder_init" not in cfg.model.model_dump()
    for key in ("blank_patch_init", "local_encoder_init"):
        removed = (rf"^{re.escape(str(path))}: model\.{key}: this option was removed from the trainer .*"
                   r"commit 7ac1025 has it \(git log, research/README\.md\)")
        with pytest.raises(ConfigError, match=removed):
            load_config(path, [f"model.{key}=true"])
