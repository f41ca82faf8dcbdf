"""Tests for `pixtral data synth` (src/pixtral/data/synth, src/pixtral/cli/data.py). CPU, a few seconds."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from pixtral.cli.main import main
from pixtral.data.synth import CATEGORIES, SynthConfig, generate_sample, split_counts, write_dataset
from pixtral.data.synth import writer
from pixtral.data.synth.draw import MAX_SIDE, MIN_SIDE, TEXT, VIEW, Canvas, font
from pixtral.data.synth.vocab import COLOR_NAMES, FIELDS, ITEMS, LETTERS, SHAPES, TITLES
from pixtral.errors import PixtralError

SPLITS = ("train", "val", "test")


def _write(out: Path, n: int, seed: int, **kw) -> dict:
    return write_dataset(SynthConfig(out=out, n=n, seed=seed, **kw), progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, _write(out, n=60, seed=3)


# -- determinism -------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dataset):
    out, _ = dataset
    again = tmp_path / "again"
    _write(again, n=60, seed=3)
    assert _files(again) == _files(out)

    other = tmp_path / "other"
    _write(other, n=60, seed=4)
    a, b = _files(out), _files(other)
    assert a["train.jsonl"] != b["train.jsonl"]
    assert sum(a[k] != b.get(k) for k in a if k.startswith("images/")) > 50


def test_worker_processes_do_not_change_output(tmp_path):
    _write(tmp_path / "one", n=12, seed=5, workers=1)
    _write(tmp_path / "two", n=12, seed=5, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_generate_sample_is_deterministic():
    for category in CATEGORIES:
        a, b = generate_sample(11, 2, category), generate_sample(11, 2, category)
        assert a.turns == b.turns and a.category == b.category == category
        assert a.image.tobytes() == b.image.tobytes()


def test_font_is_scalable_builtin_and_renders_identically():
    assert font(30).getname()[0]  # a FreeType font from Pillow, no file needed
    renders = []
    for _ in range(2):
        c = Canvas(300, 120)
        c.text(150, 60, "Floor: 7 ABC")
        renders.append(c.image.tobytes())
    assert renders[0] == renders[1]


# -- files and lines ---------------------------------------------------------------------


def test_lines_parse_and_reference_matching_images(dataset):
    out, manifest = dataset
    seen_categories = set()
    for split in SPLITS:
        records = _lines(out / f"{split}.jsonl")
        assert len(records) == manifest["splits"][split]["count"]
        for j, rec in enumerate(records):
            assert rec["id"] == f"{split}-{j}"
            assert rec["category"] in CATEGORIES
            seen_categories.add(rec["category"])
            msgs = rec["messages"]
            assert 2 <= len(msgs) <= 6 and len(msgs) % 2 == 0
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
            first = msgs[0]["content"]
            assert [part["type"] for part in first] == ["image_url", "text"]
            url = first[0]["image_url"]["url"]
            assert re.fullmatch(r"images/\d{6}\.png", url)
            assert all(isinstance(m["content"], str) for m in msgs[1:])  # only the first user turn has the image
            assert len(rec["templates"]) == len(msgs) // 2
            assert all(t.startswith(rec["category"] + ".") for t in rec["templates"])
            for answer in (m["content"] for m in msgs[1::2]):
                assert answer and re.fullmatch(r"[A-Za-z]+|\d+", answer) and len(answer) <= 8
            with Image.open(out / url) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                assert all(MIN_SIDE <= side <= MAX_SIDE for side in im.size)
    assert seen_categories == set(CATEGORIES)


def test_image_file_is_the_sample_of_its_category(dataset):
    out, manifest = dataset
    rec = _lines(out / "val.jsonl")[1]
    url = rec["messages"][0]["content"][0]["image_url"]["url"]
    index = int(Path(url).stem)
    sample = generate_sample(manifest["seed"], index, rec["category"])
    with Image.open(out / url) as im:
        assert ImageChops.difference(im.convert("RGB"), sample.image).getbbox() is None
    assert [t.answer for t in sample.turns] == [m["content"] for m in rec["messages"][1::2]]


def test_split_counts_and_manifest(dataset, tmp_path):
    out, manifest = dataset
    assert split_counts(60, 0.05, 0.05) == {"train": 54, "val": 3, "test": 3}
    assert split_counts(20000, 0.05, 0.05) == {"train": 18000, "val": 1000, "test": 1000}
    assert split_counts(10, 0.0, 0.2) == {"train": 8, "val": 0, "test": 2}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["seed"] == 3 and manifest["n"] == 60 and manifest["version"]
    assert sum(s["count"] for s in manifest["splits"].values()) == 60
    train = manifest["splits"]["train"]["categories"]
    assert set(train) == set(CATEGORIES) and max(train.values()) - min(train.values()) <= 1
    images = sorted((out / "images").iterdir())
    assert len(images) == 60 and not list(out.glob(".*"))

    custom = tmp_path / "custom"
    _write(custom, n=20, seed=0, val_frac=0.25, test_frac=0.0, categories=("charts", "misc"))
    counts = {s: len(_lines(custom / f"{s}.jsonl")) for s in SPLITS}
    assert counts == {"train": 15, "val": 5, "test": 0}
    cats = {r["category"] for s in SPLITS for r in _lines(custom / f"{s}.jsonl")}
    assert cats == {"charts", "misc"}


def test_pretrain_documents_describe_the_train_images(dataset):
    out, manifest = dataset
    train = _lines(out / "train.jsonl")
    docs = _lines(out / "pretrain.jsonl")
    assert manifest["pretrain"] == {"file": "pretrain.jsonl", "count": len(train), "format": "document",
                                    "order": "reading"}
    assert len(docs) == len(train)
    for rec, doc in zip(train, docs):
        assert doc["id"] == rec["id"] and doc["category"] == rec["category"]
        image, text = doc["content"]
        assert image == rec["messages"][0]["content"][0]
        index = int(Path(image["image_url"]["url"]).stem)
        assert text == {"type": "text", "text": generate_sample(manifest["seed"], index, rec["category"]).description}


@pytest.mark.parametrize("order", ["lookup", "ranked"])
def test_document_order_changes_only_the_document_text(tmp_path, dataset, order):
    out, _ = dataset
    other = tmp_path / order
    manifest = _write(other, n=60, seed=3, documents=order)
    assert manifest["pretrain"]["order"] == order
    before, after = _files(out), _files(other)
    assert {k: v for k, v in before.items() if k not in ("pretrain.jsonl", "manifest.json")} == \
        {k: v for k, v in after.items() if k not in ("pretrain.jsonl", "manifest.json")}
    for doc in _lines(other / "pretrain.jsonl"):
        index = int(Path(doc["content"][0]["image_url"]["url"]).stem)
        assert doc["content"][1]["text"] == getattr(generate_sample(3, index, doc["category"]), order)


def test_unknown_document_order_is_refused(tmp_path):
    with pytest.raises(PixtralError, match="--documents must be one of reading, lookup, ranked, both"):
        _write(tmp_path / "bad", n=5, seed=3, documents="shuffled")


def test_both_documents_write_each_order_about_the_same_images(tmp_path, dataset):
    out, _ = dataset
    lookup = tmp_path / "lookup"
    _write(lookup, n=60, seed=3, documents="lookup")
    both = tmp_path / "both"
    manifest = _write(both, n=60, seed=3, documents="both")
    assert manifest["pretrain"]["order"] == "reading" and manifest["pretrain_lookup"] == {
        "file": "pretrain_lookup.jsonl", "count": manifest["splits"]["train"]["count"], "format": "document",
        "order": "lookup"}
    reading_files, lookup_files, both_files = _files(out), _files(lookup), _files(both)
    assert both_files["pretrain.jsonl"] == reading_files["pretrain.jsonl"]
    assert both_files["pretrain_lookup.jsonl"] == lookup_files["pretrain.jsonl"]
    assert reading_files["pretrain.jsonl"] != lookup_files["pretrain.jsonl"]
    shared = set(reading_files) - {"pretrain.jsonl", "manifest.json"}
    assert set(both_files) - {"pretrain.jsonl", "pretrain_lookup.jsonl", "manifest.json"} == shared
    assert all(both_files[k] == reading_files[k] for k in shared)
    # --overwrite with one order removes the other order's file: nothing stale looks current.
    _write(both, n=60, seed=3, documents="lookup", overwrite=True)
    assert not (both / "pretrain_lookup.jsonl").exists()


def test_pretrain_documents_load_as_training_documents(dataset):
    from pixtral.processing import Processor
    from pixtral.processing.loading import SHIPPED_TEKKEN
    from pixtral.train.data import load_jsonl

    out, _ = dataset
    examples, report = load_jsonl(out / "pretrain.jsonl", Processor.from_file(SHIPPED_TEKKEN), max_tokens=4096,
                                  fmt="document", log=lambda *_: None)
    assert len(examples) == len(_lines(out / "train.jsonl")) and not report.skipped
    for ex in examples[:5]:
        assert ex.n_targets >= 8  # the description (and EOS) is trained on, the image is not


def _stated(description: str, template: str, question: str, answer: str) -> bool:
    """Whether `description` says what answers `question` (for the templates it states directly)."""
    last = question.rstrip("?").split()[-1]  # the bar, point, word or label asked about
    if template == "charts.value":
        return f"{last} {answer}" in description
    if template == "tables.cell":
        item, column = re.match(r"What is the value for (\w+) in column (\w+)\?", question).groups()
        columns = re.search(r"columns ([A-Z ]+)\.", description).group(1).split()
        row = re.search(rf"{item}: ([\d ]+)\.", description).group(1).split()
        return row[columns.index(column)] == answer
    if template == "documents.after":
        return f"{last}: {answer}." in description
    if template == "documents.title":
        return description.startswith(f"Document titled {answer}.")
    if template in ("diagrams.colour", "diagrams.shape"):
        return re.search(rf"(\w+) (\w+) {last}\b", description).group(1 if template == "diagrams.colour" else 2) == answer
    if template == "diagrams.arrow":
        return f"{question.split()[-3]} to {answer}" in description
    if template == "charts.count":
        return re.search(rf", {answer} (bars|points):", description) is not None
    if template == "tables.rows":
        return f"Table, {answer} items," in description
    if template == "misc.count":
        kind = question.split()[2].removesuffix("s")  # "houses" -> "house": one house, two houses
        return re.search(rf"\b{answer} {kind}s?\b", description) is not None
    if template == "misc.colour":
        return f"{answer} {last}" in description
    return answer in re.findall(r"[A-Za-z]+|\d+", description)  # tallest/shortest/largest/which: named there


# Counts of a shape or of a colour are left for the model to work out from the listed objects.
NOT_STATED = {"diagrams.count", "misc.colour_count"}


def test_description_states_the_answers():
    checked = 0
    for i in range(300):
        sample = generate_sample(21, i)
        for turn in sample.turns:
            if turn.template not in NOT_STATED:
                assert _stated(sample.description, turn.template, turn.question, turn.answer), (sample.description, turn)
                checked += 1
    assert checked > 300


# -- the questions -----------------------------------------------------------------------

ANSWER_SETS = {
    "charts.tallest": set(LETTERS), "charts.shortest": set(LETTERS),
    "charts.value": {str(v) for v in range(1, 10)}, "charts.count": {"2", "3", "4", "5"},
    "tables.cell": {str(v) for v in range(1, 10)}, "tables.largest": set(ITEMS), "tables.rows": {"2", "3", "4"},
    "documents.title": set(TITLES), "documents.after": {str(v) for v in range(1, 10)},
    "documents.which": set(FIELDS),
    "diagrams.count": {"1", "2", "3"}, "diagrams.colour": set(COLOR_NAMES), "diagrams.shape": set(SHAPES),
    "diagrams.arrow": set(LETTERS),
    "misc.count": {"1", "2", "3", "4", "5"}, "misc.colour": set(COLOR_NAMES), "misc.colour_count": {"1", "2", "3", "4"},
}


@pytest.fixture(scope="module")
def many_turns():
    turns, lengths = [], Counter()
    for i in range(1500):
        sample = generate_sample(21, i)
        turns += sample.turns
        lengths[len(sample.turns)] += 1
    return turns, lengths


def test_answers_come_from_closed_balanced_sets(many_turns):
    turns, lengths = many_turns
    by_template: dict[str, Counter] = defaultdict(Counter)
    for turn in turns:
        by_template[turn.template][turn.answer] += 1
    assert set(by_template) == set(ANSWER_SETS)  # every template is used
    for template, answers in by_template.items():
        assert set(answers) <= ANSWER_SETS[template], template
        total = sum(answers.values())
        top_share = answers.most_common(1)[0][1] / total
        assert total >= 30 and top_share <= 0.4, (template, answers)
        assert len(answers) >= min(3, len(ANSWER_SETS[template])), (template, answers)
    # Some conversations have two or three turns, most one.
    assert set(lengths) == {1, 2, 3} and lengths[1] > lengths[2] + lengths[3] > 0.2 * sum(lengths.values())


def test_questions_are_distinct_within_a_conversation():
    for i in range(300):
        sample = generate_sample(2, i)
        questions = [t.question for t in sample.turns]
        assert len(set(questions)) == len(questions)
        assert all(q.endswith("?") for q in questions)


def test_text_is_large_enough_after_downscale():
    # Every image is drawn in view units: after the model's downscale to VIEW px, capital
    # letters are about 15 px tall whatever the image's pixel size.
    for size in ((700, 500), (200, 180)):
        c = Canvas(*size)
        c.text(c.w / 2, c.h / 2, "H", size=TEXT)
        box = ImageChops.invert(c.image.convert("L")).point(lambda v: 255 if v > 128 else 0).getbbox()
        cap_view_px = (box[3] - box[1]) / c.scale
        assert cap_view_px >= 14, (size, cap_view_px)
        assert max(c.w, c.h) <= VIEW


# -- CLI and errors ----------------------------------------------------------------------


def test_cli_writes_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["data", "synth", "--out", str(out), "--n", "10", "--seed", "1", "--categories", "table,docs", "--quiet"])
    assert rc == 0
    assert "wrote 10 conversations" in capsys.readouterr().out
    records = [r for s in SPLITS for r in _lines(out / f"{s}.jsonl")]
    assert len(records) == 10 and {r["category"] for r in records} == {"tables", "documents"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be an integer from 1"),
        (["--n", "abc"], "--n must be a positive integer"),
        (["--n", "5", "--seed", "x"], "--seed must be an integer"),
        (["--n", "5", "--val-frac", "1.5"], "--val-frac must be a fraction"),
        (["--n", "5", "--val-frac", "0.6", "--test-frac", "0.5"], "--val-frac + --test-frac"),
        (["--n", "5", "--categories", "charts,photos"], "unknown category 'photos'"),
        (["--n", "5", "--workers", "0"], "--workers must be"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, capsys, args, message):
    rc = main(["data", "synth", "--out", str(tmp_path / "x"), "--quiet", *args])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_cli_rejects_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert main(["data", "synth", "--out", str(blocker / "sub"), "--n", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"--out {blocker / 'sub'}" in err and "cannot create" in err
    assert main(["data", "synth", "--out", str(blocker), "--n", "3", "--quiet"]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_non_empty_out_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "ds"
    _write(out, n=12, seed=0)
    assert main(["data", "synth", "--out", str(out), "--n", "5", "--quiet"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    keep = out / "notes.txt"
    keep.write_text("mine")
    assert main(["data", "synth", "--out", str(out), "--n", "5", "--quiet", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 5  # stale images from the first run are gone
    assert keep.read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["n"] == 5


def test_interrupted_run_leaves_no_complete_looking_jsonl(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = writer._make

    def failing(job):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(writer, "_make", failing)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        _write(out, n=20, seed=0)
    assert not (out / "manifest.json").exists()
    assert not any((out / f"{s}.jsonl").exists() for s in (*SPLITS, "pretrain"))
    assert not list(out.glob(".*.tmp")) and not list((out / "images").glob(".*"))


def test_api_validates_config(tmp_path):
    with pytest.raises(PixtralError, match="--n"):
        write_dataset(SynthConfig(out=tmp_path / "a", n=-1), progress=False)
    with pytest.raises(PixtralError, match="--categories"):
        write_dataset(SynthConfig(out=tmp_path / "a", n=3, categories=()), progress=False)


def _keyed(lookup: str, template: str, question: str, answer: str) -> bool:
    """Whether `lookup` states the answer to `question` right after the key the question names."""
    last = question.rstrip("?").split()[-1]
    if template == "tables.cell":
        item, column = re.match(r"What is the value for (\w+) in column (\w+)\?", question).groups()
        return f"{item} {column} {answer}." in lookup
    if template == "documents.after":
        return f"{last}: {answer}." in lookup or f"{answer} follows {last}." in lookup
    if template == "documents.which":
        return f"{answer}: {last}." in lookup or f"{last} follows {answer}." in lookup
    if template in ("diagrams.colour", "diagrams.shape"):
        return re.search(rf"\b{last} (\w+) (\w+)", lookup).group(1 if template == "diagrams.colour" else 2) == answer
    if template == "misc.colour":
        return f"{last} {answer}" in lookup
    return _stated(lookup, template, question, answer)  # the same wording as the description


def test_lookup_documents_key_every_answer_in_random_order():
    checked, reordered = 0, 0
    for i in range(300):
        sample = generate_sample(21, i)
        reordered += sample.lookup != sample.description
        for turn in sample.turns:
            if turn.template not in NOT_STATED:
                assert _keyed(sample.lookup, turn.template, turn.question, turn.answer), (sample.lookup, turn)
                checked += 1
    assert checked > 300
    assert reordered > 200  # not the reading order (two-item charts keep it half the time)



def _ranked_pairs(text: str) -> list[tuple[str, int]]:
    return [(name, int(value)) for name, value in re.findall(r"([A-Z][a-z]*) (\d)\b", text)]


def test_ranked_documents_list_each_compared_set_largest_first():
    seen = Counter()
    for i in range(300):
        sample = generate_sample(22, i, layout="grid")
        ranked = sample.ranked
        if sample.category == "charts":
            head, facts = ranked.split(", from ")
            pairs = _ranked_pairs(facts.split(":", 1)[1])
            # the same bars and values as the reading-order description, largest first
            assert sorted(pairs) == sorted(_ranked_pairs(sample.description.split(":", 1)[1]))
            assert [v for _, v in pairs] == sorted((v for _, v in pairs), reverse=True), ranked
            for turn in sample.turns:  # the tallest bar comes first, the shortest last
                if turn.template == "charts.tallest":
                    assert pairs[0][0] == turn.answer, (ranked, turn)
                if turn.template == "charts.shortest":
                    assert pairs[-1][0] == turn.answer, (ranked, turn)
        elif sample.category == "tables":
            columns = re.findall(r"Column ([A-Z]) from largest: ([^.]*)\.", ranked)
            assert [c for c, _ in columns] == sample.description.split("columns ")[1].split(".")[0].split()
            for _, cells in columns:
                values = [int(cell.rsplit(" ", 1)[1]) for cell in cells.split(", ")]
                assert values == sorted(values, reverse=True), ranked
            for turn in sample.turns:
                if turn.template == "tables.largest":
                    column = turn.question.split("column ")[1].rstrip("?")
                    assert dict(columns)[column].split(" ")[0] == turn.answer, (ranked, turn)
        elif sample.category == "documents":
            facts = re.findall(r"(\d) follows ([A-Z][a-z]+)\.", ranked)
            assert [int(n) for n, _ in facts] == sorted((int(n) for n, _ in facts), reverse=True)
            for turn in sample.turns:
                if turn.template == "documents.which":
                    number = turn.question.rstrip("?").split()[-1]
                    assert f"{number} follows {turn.answer}." in ranked, (ranked, turn)
        else:  # nothing compared: the lookup text
            assert ranked == sample.lookup
        seen[sample.category] += 1
    assert len(seen) == 5


# -- grid layout ---------------------------------------------------------------------------


def test_grid_images_are_seen_as_whole_token_cells():
    from pixtral import LLM
    from pixtral.data.synth.draw import CELL

    processor = LLM().processor  # the default model: 16-px patches merged 2x2 at <= 256 px
    sizes = set()
    for i in range(60):
        image = generate_sample(8, i, layout="grid").image
        _, images, _ = processor.encode_document([{"type": "image", "image": image}])
        height, width = images[0].shape[-2:]
        assert width % CELL == 0 and height % CELL == 0, (image.size, (width, height))
        scale = max(1.0, max(image.size) / VIEW)
        assert abs(width - image.width / scale) < 2 and abs(height - image.height / scale) < 2, image.size
        sizes.add(image.size)
        assert MIN_SIDE <= min(image.size) and max(image.size) <= MAX_SIDE
    assert len(sizes) > 40 and max(max(s) for s in sizes) > 2 * VIEW  # varied, and many scaled down


def test_grid_layout_puts_every_label_and_value_in_one_token_cell(monkeypatch):
    from pixtral.data.synth.draw import CELL

    drawn = []
    original = Canvas.text

    def recording(self, x, cy, text, *args, **kwargs):
        bounds = original(self, x, cy, text, *args, **kwargs)
        drawn.append((text, bounds))
        return bounds

    monkeypatch.setattr(Canvas, "text", recording)
    checked = 0
    for i in range(150):
        drawn.clear()
        sample = generate_sample(9, i, layout="grid")
        for text, (x0, y0, x1, y1) in drawn:
            if len(text) == 1:  # a label or a value (titles, items and words span cells)
                assert int(x0 // CELL) == int((x1 - 0.5) // CELL), (sample.category, text, x0, x1)
                assert int(y0 // CELL) == int((y1 - 0.5) // CELL), (sample.category, text, y0, y1)
                checked += 1
    assert checked > 500


def test_grid_layout_keeps_the_questions_answerable_and_differs_from_free():
    for i in range(100):
        free, grid = generate_sample(4, i), generate_sample(4, i, layout="grid")
        assert grid.category == free.category
        for turn in grid.turns:
            if turn.template not in NOT_STATED:
                assert _stated(grid.description, turn.template, turn.question, turn.answer), (grid.description, turn)
    with pytest.raises(ValueError, match="unknown layout 'tiles'"):
        generate_sample(4, 0, layout="tiles")


def test_layout_option_is_written_to_the_manifest(tmp_path):
    manifest = _write(tmp_path / "g", n=10, seed=2, layout="grid")
    assert manifest["layout"] == "grid"
    with pytest.raises(PixtralError, match="--layout must be one of free, grid"):
        _write(tmp_path / "bad", n=5, seed=2, layout="tiles")


# -- questions="all": training conversations with every template -------------------------

EVERY_TEMPLATE = {
    "charts": Counter({"tallest": 1, "shortest": 1, "value": 2, "count": 1}),
    "tables": Counter({"largest": 1, "cell": 2, "rows": 1}),
    "documents": Counter({"title": 1, "after": 1, "which": 1}),
    "diagrams": Counter({"count": 1, "colour": 2, "shape": 2, "arrow": 1}),
}


def test_all_questions_ask_every_template_in_varied_order_about_new_images():
    orders = defaultdict(set)
    scene_plans = Counter()
    for i in range(200):
        sample = generate_sample(2, i, layout="grid", questions="all")
        asked = Counter(t.template.split(".")[1] for t in sample.turns)
        if sample.category == "misc":
            scene_plans[tuple(sorted(asked.elements()))] += 1
        else:
            assert asked == EVERY_TEMPLATE[sample.category], (sample.category, asked)
            orders[sample.category].add(tuple(t.template for t in sample.turns))
        questions = [t.question for t in sample.turns]
        assert len(set(questions)) == len(questions)  # never the same question twice
        for turn in sample.turns:  # and every answer is still right: stated in the description
            if turn.template not in NOT_STATED:
                assert _stated(sample.description, turn.template, turn.question, turn.answer), (sample.description, turn)
        # Its own random stream: a new image, not the "some" sample with more questions.
        assert sample.image.tobytes() != generate_sample(2, i, layout="grid").image.tobytes()
    assert all(len(o) > 5 for o in orders.values()) and len(orders) == 4  # shuffled, not a fixed order
    assert set(scene_plans) == {("colour", "colour", "count"), ("colour_count",)}
    assert min(scene_plans.values()) > 10
    with pytest.raises(ValueError, match="unknown question set 'many'"):
        generate_sample(2, 0, questions="many")


def test_questions_option_is_written_to_the_manifest_and_checked(tmp_path, capsys):
    out = tmp_path / "all"
    rc = main(["data", "synth", "--out", str(out), "--n", "10", "--seed", "1", "--layout", "grid",
               "--questions", "all", "--quiet"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["questions"] == "all"
    records = [r for s in SPLITS for r in _lines(out / f"{s}.jsonl")]
    assert sum(len(r["templates"]) for r in records) > 3 * len(records)
    assert _write(tmp_path / "some", n=5, seed=1)["questions"] == "some"
    with pytest.raises(PixtralError, match="--questions must be one of some, all"):
        _write(tmp_path / "bad", n=5, seed=1, questions="most")
