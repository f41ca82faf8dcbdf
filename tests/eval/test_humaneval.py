"""HumanEval: data formats, the instruct prompt, code extraction, program assembly (run for real), pass@k."""

import gzip
import json
import subprocess
import sys
from itertools import combinations
from math import comb

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixtral.eval import humaneval
from pixtral.eval.errors import DataError

ADD = {
    "task_id": "HumanEval/0",
    "prompt": 'from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs.\n'
              '    >>> add_all([1, 2])\n    3\n    """\n',
    "canonical_solution": "    total = 0\n    for x in xs:\n        total += x\n    return total\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
            "    assert candidate([]) == 0\n    assert candidate([-1, 5, 7]) == 11\n",
    "entry_point": "add_all",
}
# Like HumanEval/38: the prompt defines a helper the test calls.
CYCLIC = {
    "task_id": "HumanEval/1",
    "prompt": 'def encode(s: str) -> str:\n    """Shift every letter by one."""\n'
              '    return "".join(chr(ord(c) + 1) for c in s)\n\n\n'
              'def decode(s: str) -> str:\n    """Inverse of encode."""\n',
    "canonical_solution": '    return "".join(chr(ord(c) - 1) for c in s)\n',
    "test": "\n\ndef check(candidate):\n    for s in ['abc', 'hello', '']:\n"
            "        assert candidate(encode(s)) == s\n",
    "entry_point": "decode",
}
PROBLEMS = [ADD, CYCLIC]


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(root, records):
    (root / "openai_humaneval").mkdir(parents=True)
    columns = {k: [r.get(k) for r in records] for k in ADD}
    path = root / "openai_humaneval" / "test-00000-of-00001.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def run(code, test, entry_point):
    return subprocess.run([sys.executable, "-c", humaneval.program(code, test, entry_point)],
                          capture_output=True, text=True, timeout=10)


# ------------------------------------------------------------------------------------------ load


def check_items(ds):
    items = list(ds.items())
    assert ds.task == "humaneval" and ds.total == ds.records == 2 and len(ds.sha256) == 64
    assert [i.id for i in items] == ["HumanEval/0", "HumanEval/1"]
    assert items[0].messages == [{"role": "user", "content": humaneval.instruction(ADD["prompt"])}]
    assert items[0].reference == {"prompt": ADD["prompt"], "test": ADD["test"], "entry_point": "add_all"}
    assert items[1].meta == {}


def test_load_jsonl_file_and_folder(tmp_path):
    path = write_jsonl(tmp_path / "HumanEval.jsonl", PROBLEMS)
    check_items(humaneval.load(path))
    check_items(humaneval.load(tmp_path))
    assert humaneval.load(tmp_path).files == [path]


def test_load_jsonl_gz_file_and_folder(tmp_path):
    path = write_jsonl(tmp_path / "HumanEval.jsonl.gz", PROBLEMS, gz=True)
    check_items(humaneval.load(path))
    check_items(humaneval.load(tmp_path))


def test_load_parquet(tmp_path):
    path = write_parquet(tmp_path, PROBLEMS)
    ds = humaneval.load(tmp_path)
    check_items(ds)
    assert ds.files == [path]
    check_items(humaneval.load(path))


def test_limit_and_hash(tmp_path):
    write_jsonl(tmp_path / "HumanEval.jsonl", PROBLEMS)
    part = humaneval.load(tmp_path, limit=1)
    assert part.total == 1 and [i.id for i in part.items()] == ["HumanEval/0"]
    assert part.sha256 == humaneval.load(tmp_path).sha256


def test_instruction_is_evalplus_wording():
    assert humaneval.INSTRUCTION == ("Please provide a self-contained Python script that solves the following "
                                     "problem in a markdown code block:")
    assert humaneval.instruction("\ndef f():\n    pass\n\n") == (
        "Please provide a self-contained Python script that solves the following problem in a markdown code "
        "block:\n```\ndef f():\n    pass\n```\n")


@pytest.mark.parametrize("field", ["task_id", "prompt", "test", "entry_point"])
def test_error_missing_field_jsonl(tmp_path, field):
    broken = {k: v for k, v in CYCLIC.items() if k != field}
    write_jsonl(tmp_path / "HumanEval.jsonl", [ADD, broken])
    with pytest.raises(DataError) as err:
        humaneval.load(tmp_path)
    assert "HumanEval.jsonl line 2" in str(err.value) and f"field '{field}'" in str(err.value)


def test_error_missing_field_parquet(tmp_path):
    write_parquet(tmp_path, [ADD, {**CYCLIC, "test": None}])
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet row 1 field 'test'"):
        humaneval.load(tmp_path)


def test_error_missing_column_parquet(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"task_id": ["x"], "prompt": ["p"]}), tmp_path / "d" / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match="missing column"):
        humaneval.load(tmp_path / "d")


def test_error_bad_json_wrong_types_duplicates(tmp_path):
    path = tmp_path / "HumanEval.jsonl"
    path.write_text(json.dumps(ADD) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"HumanEval.jsonl line 3: not valid JSON"):
        humaneval.load(path)
    path.write_text(json.dumps([1, 2]) + "\n")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        humaneval.load(path)
    write_jsonl(path, [{**ADD, "prompt": 3}])
    with pytest.raises(DataError, match="line 1 field 'prompt': expected a string"):
        humaneval.load(path)
    write_jsonl(path, [{**ADD, "entry_point": "not valid"}])
    with pytest.raises(DataError, match="line 1 field 'entry_point'"):
        humaneval.load(path)
    write_jsonl(path, [ADD, ADD])
    with pytest.raises(DataError, match="line 2 field 'task_id': duplicate"):
        humaneval.load(path)
    path.write_text("")
    with pytest.raises(DataError, match="no HumanEval problems"):
        humaneval.load(path)


def test_error_unreadable_or_missing(tmp_path):
    (tmp_path / "HumanEval.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="HumanEval.jsonl.gz: cannot read"):
        humaneval.load(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        humaneval.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .parquet or .arrow files"):
        humaneval.load(empty)


# ---------------------------------------------------------------------------------- extraction


def extract(answer, problem=ADD):
    return humaneval.extract_code(answer, problem["prompt"], problem["entry_point"])


def passes(code, problem=ADD):
    return run(code, problem["test"], problem["entry_point"]).returncode == 0


FULL = "from typing import List\n\ndef add_all(xs: List[int]) -> int:\n    return sum(xs)\n"


def test_fenced_python_block_with_full_function():
    answer = f"Here is the solution:\n\n```python\n{FULL}```\n\nIt sums the list."
    assert extract(answer) == FULL
    assert passes(extract(answer))


def test_body_only_completion_gets_the_prompt():
    answer = "```python\n    return sum(xs)\n```"
    assert extract(answer) == ADD["prompt"] + "    return sum(xs)\n"
    assert passes(extract(answer))
    # A body given without its indentation is put back inside the function.
    dedented = extract("```\ntotal = 0\nfor x in xs:\n    total += x\nreturn total\n```")
    assert dedented == ADD["prompt"] + "    total = 0\n    for x in xs:\n        total += x\n    return total\n"
    assert passes(dedented)


def test_several_blocks_pick_the_one_defining_the_entry_point():
    answer = ("First a helper:\n```py\ndef helper(xs):\n    return sum(xs)\n```\n"
              "Then the function:\n```python\ndef add_all(xs):\n    return helper(xs)\n```\n"
              "Usage:\n```python\nprint(add_all([1, 2, 3]))\n```\n")
    code = extract(answer)
    assert "def add_all(xs):\n    return helper(xs)" in code and "print(" not in code
    assert not passes(code)  # helper lives in another block: fails, as the answer is not self-contained
    longest = "```python\ndef helper(xs):\n    return sum(xs)\n\ndef add_all(xs):\n    return helper(xs)\n```"
    two = "```bash\npip install nothing\n```\n" + longest + "\n```python\nadd_all([1])\n```"
    assert passes(extract(two))
    no_def = "```\nx = 1\n```\n```python\n    s = 0\n    for x in xs:\n        s += x\n    return s\n```"
    assert passes(extract(no_def))  # no block defines it: the longest, as a body completion


def test_no_fence():
    assert passes(extract(FULL))
    assert passes(extract("    return sum(xs)\n"))
    prose = ("Sure! Here is an implementation.\n\ndef add_all(xs):\n    total = 0\n    for x in xs:\n"
             "        total += x\n    return total\n\nThis loops over the list and returns the total.")
    code = extract(prose)
    assert code.startswith("from typing import List\n") and "Sure" not in code and "loops over" not in code
    assert passes(code)
    filler = "\n".join(f"Step {i}: if the list is empty, the sum is zero." for i in range(200))
    long_answer = filler + "\nimport math\ndef add_all(xs):\n    return int(math.fsum(xs))\n" + filler
    assert extract(long_answer) == "from typing import List\n\nimport math\ndef add_all(xs):\n    return int(math.fsum(xs))\n"
    assert passes(extract(long_answer))


def test_prose_before_and_after_block_and_example_calls_dropped():
    answer = ("Sure, let's solve it step by step.\n\n```python\nimport math\n\n\ndef add_all(xs):\n"
              "    return int(math.fsum(xs))\n\n\nif __name__ == '__main__':\n    print(add_all([1, 2]))\n"
              "    input()\n```\n\nThe function uses `math.fsum`. Let me know if you need more!")
    code = extract(answer)
    assert code == ("from typing import List\n\nimport math\n\n\ndef add_all(xs):\n    return int(math.fsum(xs))\n")
    assert passes(code)


def test_missing_imports_are_added_from_the_prompt():
    answer = "```python\ndef add_all(xs: List[int]) -> int:\n    return sum(xs)\n```"
    code = extract(answer)
    assert code.startswith("from typing import List\n\n")
    assert passes(code)
    assert not passes("def add_all(xs: List[int]) -> int:\n    return sum(xs)\n")  # why it matters


def test_prompt_helpers_are_kept():
    answer = '```python\ndef decode(s: str) -> str:\n    return "".join(chr(ord(c) - 1) for c in s)\n```'
    code = extract(answer, CYCLIC)
    assert code.startswith("def encode(s: str) -> str:")
    assert passes(code, CYCLIC)


def test_unclosed_fence_and_garbage_never_raise():
    assert passes(extract("```python\ndef add_all(xs):\n    return sum(xs)\n"))
    for answer in ["", "I cannot help with that.", "```", None, "```python\ndef add_all(:\n```", "\x00" * 5]:
        code = humaneval.extract_code(answer, ADD["prompt"], ADD["entry_point"])
        assert isinstance(code, str)
    assert isinstance(humaneval.extract_code("x", None, None), str)


# ---------------------------------------------------------------------------------- program


@pytest.mark.parametrize("problem", PROBLEMS, ids=["add_all", "cyclic"])
def test_program_runs_canonical_solution_and_rejects_a_wrong_one(problem):
    canonical = problem["prompt"] + problem["canonical_solution"]
    program = humaneval.program(canonical, problem["test"], problem["entry_point"])
    assert program == canonical + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    ok = run(canonical, problem["test"], problem["entry_point"])
    assert ok.returncode == 0, ok.stderr
    wrong = run(problem["prompt"] + "    return None\n", problem["test"], problem["entry_point"])
    assert wrong.returncode != 0 and "AssertionError" in wrong.stderr


# ---------------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_values():
    assert humaneval.pass_at_k(10, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert humaneval.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert humaneval.pass_at_k(10, 10, 10) == 1.0
    assert humaneval.pass_at_k(10, 8, 3) == 1.0  # n - c < k
    assert humaneval.pass_at_k(200, 13, 100) == pytest.approx(1 - comb(187, 100) / comb(200, 100))


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (5, 0, 0), (5, 6, 1), (5, -1, 1)])
def test_pass_at_k_invalid(n, c, k):
    with pytest.raises(ValueError):
        humaneval.pass_at_k(n, c, k)
