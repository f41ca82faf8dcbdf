"""benchmarks/bench_serving.py end to end on a tiny model: our server and `transformers serve
--continuous-batching` (on the text decoder export) on the same chats; the tables parse, nothing fails,
the greedy answers are compared; the mixed-steps section measures. Plus the text decoder export
(benchmarks/hf_text_export.py) on its own: names, config, the same prompt ids as ours, the same logits."""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "engine"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from tiny_model import build_checkpoint  # noqa: E402

import bench_serving  # noqa: E402
import hf_text_export  # noqa: E402

LABELS = [label for label, _ in bench_serving.ROWS]
MIXED_LABELS = [label for label, _ in bench_serving.MIXED_ROWS]
CHATS = [
    [{"role": "user", "content": "What is the title of this picture?"}],
    [{"role": "user", "content": "Describe this picture."}, {"role": "assistant", "content": "A chart, in grey."},
     {"role": "user", "content": "Which colours are used? Ünïcode, 数字 and emoji 🙂 too."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "List every label."}],
]


def transformers_serve_missing() -> str | None:
    try:
        importlib.import_module("transformers.cli.transformers")
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:
        return f"transformers has no `serve` command here: {exc}"
    if not is_serve_available():
        return "transformers serve needs fastapi, uvicorn, pydantic and openai (pip install transformers[serving])"
    return None


def tables(out: str) -> dict[str, tuple[list[str], dict[str, list[str]], str]]:
    """section (image, text-only, mixed) -> (column names, row label -> cells, the line after the table)."""
    found, lines = {}, out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("image:", "text-only:", "mixed steps:")) and lines[i + 1].startswith("|"):
            section = line.split(":")[0].split()[0]
            header = [c.strip() for c in lines[i + 1].strip("|").split("|")][1:]
            rows = {}
            j = i + 3
            while j < len(lines) and lines[j].startswith("|"):
                cells = [c.strip() for c in lines[j].strip("|").split("|")]
                rows[cells[0]] = cells[1:]
                j += 1
            found[section] = (header, rows, lines[j] if j < len(lines) else "")
    return found


def run(args: list[str], tmp_path: Path, timeout: float = 240) -> tuple[str, list[dict]]:
    model = build_checkpoint(tmp_path / "tiny")
    out_json = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--model", str(model),
                             "--workdir", str(tmp_path / "work"), "--requests", "3", "--rates", "inf", "--turns", "2",
                             "--json", str(out_json), *args],
                            capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for failure in ("errors, first", "going on without it", "could not be measured", "mixed steps ("):
        assert failure not in result.stderr, result.stderr
    return result.stdout, json.loads(out_json.read_text())


def check(table, servers: list[str], requests: int) -> None:
    header, rows, agreement = table
    assert header == [f"{s} @ inf/s" for s in servers]
    assert list(rows) == LABELS
    assert all(len(cells) == len(servers) for cells in rows.values())
    assert rows["requests"] == [str(requests)] * len(servers)
    assert rows["errors"] == ["0"] * len(servers)
    for cells in rows.values():
        assert "-" not in cells  # every percentile measured: first turns and follow-ups
    if len(servers) > 1:
        assert agreement.startswith("greedy answers equal on ") and " vs ".join(servers) in agreement
        same, total = agreement.removeprefix("greedy answers equal on ").split(" requests")[0].split(" of ")
        assert int(total) == requests and 0 <= int(same) <= requests


def test_ours_and_transformers_serve_on_a_tiny_model(tmp_path):
    # The default peers: pixtral and `transformers serve --continuous-batching` over HTTP. The image
    # chats run on ours only (transformers serves the text decoder), the text-only chats on both; then
    # the mixed steps: ours with an image and with a long text arriving, transformers with the text.
    missing = transformers_serve_missing()
    if missing:
        pytest.skip(missing)
    start = time.monotonic()
    out, summaries = run(["--mixed-steps", "--mixed-streams", "4", "--mixed-stream-tokens", "256"], tmp_path)
    found = tables(out)
    assert set(found) == {"image", "text-only", "mixed"}, out
    check(found["image"], ["pixtral"], 6)
    check(found["text-only"], ["pixtral", "transformers"], 6)
    header, rows, _ = found["mixed"]
    assert header == ["pixtral: image", "pixtral: long text", "transformers: long text"], out
    assert list(rows) == MIXED_LABELS
    image_tokens, text_tokens, peer_tokens = map(int, rows["arriving request: prompt tokens"])
    assert text_tokens == peer_tokens and abs(text_tokens - image_tokens) <= 8  # about as long as the image's
    assert rows["streams decoding through it"] == ["4"] * 3, out
    for cell in rows["slowdown (p50 during / before)"] + rows["slowdown (mean during / before)"]:
        assert cell.endswith("x") and float(cell[:-1]) > 0
    loads = [s for s in summaries if s["workload"] != "mixed-steps"]
    assert [(s["workload"], s["server"]) for s in loads] == [
        ("image", "pixtral"), ("text-only", "pixtral"), ("text-only", "transformers")]
    for s in loads:
        assert s["requests"] == 6 and s["errors"] == 0 and s["rate"] == float("inf")
        assert s["output_tokens_per_s"] > 0 and s["requests_per_s"] > 0
    mixed = [s for s in summaries if s["workload"] == "mixed-steps"]
    assert [(m["server"], m["arriving"]) for m in mixed] == [
        ("pixtral", "image"), ("pixtral", "long text"), ("transformers", "long text")]
    for m in mixed:
        assert m["gaps_before"] > 0 and m["gaps_during"] > 0 and m["ttft_ms"] > 0
    # reused exports: the decoder export is in the work folder, as a MistralForCausalLM
    config = json.loads((tmp_path / "work" / "hf-text" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert time.monotonic() - start < 180


def test_transformers_cb_in_process(tmp_path):
    out, summaries = run(["--servers", "transformers-cb", "--text-only", "--requests", "2"], tmp_path)
    found = tables(out)
    assert set(found) == {"text-only"}, out
    check(found["text-only"], ["transformers-cb"], 4)
    assert [s["server"] for s in summaries] == ["transformers-cb"]


# ---------------------------------------------------------------------- the text decoder export
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = build_checkpoint(tmp / "tiny")
    hf = bench_serving.hf_export(model, tmp / "hf")
    return model, hf, hf_text_export.export_text_decoder(hf, tmp / "text")


def test_text_names():
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    assert hf_text_export.text_name(name) == "model.layers.0.mlp.up_proj.weight"
    assert hf_text_export.text_name("model.language_model.norm.weight") == "model.norm.weight"
    assert hf_text_export.text_name("language_model.lm_head.weight") == "lm_head.weight"
    assert hf_text_export.text_name("lm_head.weight") == "lm_head.weight"
    for name in ("vision_tower.ln_pre.weight", "multi_modal_projector.linear_1.bias",
                 "model.vision_tower.patch_conv.weight", "model.multi_modal_projector.norm.weight"):
        assert hf_text_export.text_name(name) is None


def test_export_files_keys_and_config(exported):
    from safetensors import safe_open

    _, hf, text = exported
    names = {p.name for p in text.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= names
    assert "tekken.json" not in names  # or transformers picks the mistral-common tokenizer, which serve cannot stream
    with safe_open(text / "model.safetensors", "pt") as f, safe_open(hf / "model.safetensors", "pt") as g:
        keys = set(f.keys())
        source = {k for k in g.keys() if k.startswith("language_model.")}
        assert keys == {hf_text_export.text_name(k) for k in source}
        assert all(k.startswith(("model.", "lm_head.")) for k in keys)
        for k in source:
            assert torch.equal(f.get_tensor(hf_text_export.text_name(k)), g.get_tensor(k))
    config = json.loads((text / "config.json").read_text())
    source_config = json.loads((hf / "config.json").read_text())["text_config"]
    assert config["architectures"] == ["MistralForCausalLM"] and config["model_type"] == "mistral"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "rms_norm_eps"):
        assert config[key] == source_config[key], key
    assert config["rope_parameters"]["rope_theta"] == source_config["rope_theta"]


def test_export_tokenizer_gives_our_prompt_ids(exported):
    from transformers import AutoTokenizer

    from pixtral.processing import load_processor

    model, _, text = exported
    processor = load_processor(model)
    tokenizer = AutoTokenizer.from_pretrained(text)
    assert type(tokenizer).__name__ != "MistralCommonBackend"
    for messages in CHATS:
        ours, _ = processor.encode_chat(messages)
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert theirs["input_ids"] == ours, messages
    answer = processor.encode_chat(CHATS[0])[0][-3:]
    assert tokenizer.decode(answer, skip_special_tokens=True) == processor.decode(answer)


def test_export_logits_are_ours(exported):
    from transformers import AutoModelForCausalLM

    from pixtral.checkpoint import load_model
    from pixtral.processing import load_processor

    model, _, text = exported
    ids, _ = load_processor(model).encode_chat(CHATS[1])
    ours = load_model(model)
    theirs = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        a = ours(torch.tensor(ids), [])
        b = theirs(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sharded_export(tmp_path, monkeypatch):
    import pixtral.checkpoint.save as save
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(save, "HF_SHARD_BYTES", 2 ** 20)  # the tiny model in several shards
    model = build_checkpoint(tmp_path / "tiny")
    from pixtral.checkpoint import load_model, save_model

    ours = load_model(model)
    hf = save_model(ours, tmp_path / "hf", layout="hf", tokenizer_file=model / "tekken.json")
    assert (hf / "model.safetensors.index.json").is_file()
    text = hf_text_export.export_text_decoder(hf, tmp_path / "text")
    index = json.loads((text / "model.safetensors.index.json").read_text())
    assert all(k.startswith(("model.", "lm_head.")) for k in index["weight_map"])
    assert all((text / f).is_file() for f in index["weight_map"].values())
    theirs = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32).eval()
    ids = [1, 3, 1049, 1050, 4]
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor(ids), []), theirs(input_ids=torch.tensor([ids])).logits[0],
                                   rtol=1e-4, atol=1e-4)
    # consume: the same export, the source's weight files deleted as they are done (the rest kept)
    again = hf_text_export.export_text_decoder(hf, tmp_path / "again", consume=True)
    assert not list(hf.glob("*.safetensors")) and (hf / "config.json").is_file() and (hf / "tekken.json").is_file()
    for f in set(index["weight_map"].values()):
        assert (again / f).read_bytes() == (text / f).read_bytes()


# ---------------------------------------------------------------------- the mixed-steps measurement
def test_mixed_steps_measures_the_slowdown():
    # A fake server: one step every 10 ms gives each stream a token; the arriving request's prefill
    # takes 4 steps of 40 ms, after which it has its first token (and the streams theirs of that step).
    async def scenario():
        streams: list = []
        arriving: list = []

        async def engine():
            while True:
                prefilling = bool(arriving) and arriving[0][1] > 0
                await asyncio.sleep(0.04 if prefilling else 0.01)
                now = time.perf_counter()
                for r in list(streams):
                    r.token(now)
                if prefilling:
                    arriving[0][1] -= 1
                    if arriving[0][1] == 0:
                        arriving[0][0].token(now)
                        arriving[0][2].set()

        async def send(messages, max_tokens, result):
            if max_tokens == 1:
                done = asyncio.Event()
                arriving.append([result, 4, done])
                await done.wait()
                result.prompt_tokens = 100
                return result.done()
            streams.append(result)
            while not result.stop:
                await asyncio.sleep(0.002)
            streams.remove(result)
            return result.done()

        task = asyncio.create_task(engine())
        try:
            return await bench_serving.mixed_steps(send, [[{}]] * 4, 1000, [{}], 8, 30)
        finally:
            task.cancel()

    row = asyncio.run(scenario())
    assert row["streams"] == 4 and row["prompt_tokens"] == 100
    assert 5 <= row["itl_before_p50_ms"] <= 30, row
    assert 30 <= row["itl_during_p50_ms"] <= 80, row
    assert 2 <= row["slowdown"] <= 8 and 2 <= row["slowdown_mean"] <= 8, row
    assert 120 <= row["ttft_ms"] <= 400, row
    assert not math.isnan(row["itl_during_max_ms"])
