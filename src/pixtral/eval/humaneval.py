"""HumanEval (Chen et al., 2021) for chat models: data, prompt, code extraction, program assembly, pass@k.

* Data: `openai/human-eval`'s `HumanEval.jsonl.gz` (or the unzipped `.jsonl`), fields `task_id`, `prompt`,
  `canonical_solution`, `test`, `entry_point`; or the Hugging Face `openai_humaneval` parquet (split `test`).
* Prompt: EvalPlus's instruct prompt for chat models (`INSTRUCTION`, then the problem's prompt in a
  markdown code block), sent as one user message. EvalPlus also pre-fills the assistant turn with a
  response prefix; OpenAI-compatible chat APIs cannot pre-fill, so only the user message is sent.
* Extraction (`extract_code`): EvalPlus's sanitizing idea without tree-sitter: take the code block that
  defines the entry point, keep its imports and the definitions the entry point reaches.
* Execution: `program` builds what human-eval's `execution.py` runs (code, the test, `check(entry_point)`);
  the sandbox that runs it lives elsewhere.
* Metric: `pass_at_k`, human-eval's unbiased estimator.
"""

from __future__ import annotations

import ast
import re
import secrets
import textwrap
from pathlib import Path
from typing import Any, Iterator

from pixtral.eval.data import Dataset, Item, hash_files, iter_rows, read_jsonl, resolve_table_files
from pixtral.eval.errors import DataError

INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
               "markdown code block:")
FIELDS = ("task_id", "prompt", "test", "entry_point")
JSONL_NAMES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")


def instruction(prompt: str) -> str:
    """The user message: EvalPlus's instruct prompt (`make_raw_chat_prompt`'s task prompt)."""
    return f"{INSTRUCTION}\n```\n{prompt.strip()}\n```\n"


# ---------------------------------------------------------------------------------------- load


def load(path: str | Path, limit: int | None = None) -> Dataset:
    """HumanEval from `HumanEval.jsonl(.gz)` (a file, or a folder holding one) or `openai_humaneval` parquet.

    Items: id = task_id, one user message (`instruction(prompt)`), reference = {prompt, test, entry_point}.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory (pass HumanEval's local copy with --data)")
    jsonl = _jsonl_file(root)
    if jsonl is not None:
        files = [jsonl]
        records = _read_jsonl(jsonl)
    else:
        files = resolve_table_files(root, "test", config="openai_humaneval")
        records = []
        for row in iter_rows(files, list(FIELDS)):
            records.append((row.where(), {f: row.get(f) for f in FIELDS}))
    problems = []
    seen: set[str] = set()
    for where, record in records:
        problem = _validate(where, record)
        if problem["task_id"] in seen:
            raise DataError(f"{where} field 'task_id': duplicate task_id {problem['task_id']!r}")
        seen.add(problem["task_id"])
        problems.append(problem)
    if not problems:
        raise DataError(f"{files[0] if len(files) == 1 else root}: no HumanEval problems found")
    if limit is not None:
        problems = problems[:max(0, limit)]

    def stream() -> Iterator[Item]:
        for p in problems:
            yield Item(
                id=p["task_id"],
                messages=[{"role": "user", "content": instruction(p["prompt"])}],
                reference={"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]},
                meta={},
            )

    base = root if root.is_dir() else root.parent
    return Dataset(task="humaneval", files=files, sha256=hash_files(files, base), total=len(problems),
                   records=len(problems), stream=stream)


def _jsonl_file(root: Path) -> Path | None:
    if root.is_file():
        return root if root.name.endswith((".jsonl", ".jsonl.gz")) else None
    for name in JSONL_NAMES:
        if (root / name).is_file():
            return root / name
    candidates = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise DataError(f"{root}: several .jsonl files ({', '.join(p.name for p in candidates)}); "
                        "pass HumanEval.jsonl(.gz) itself")
    return None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    return [(f"{path} line {number}", record) for number, record in read_jsonl(path)]


def _validate(where: str, record: Any) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    problem = {}
    for field in FIELDS:
        value = record.get(field)
        if value is None:
            raise DataError(f"{where} field '{field}': missing")
        if not isinstance(value, str):
            raise DataError(f"{where} field '{field}': expected a string, got {type(value).__name__}")
        if field in ("task_id", "entry_point") and not value.strip():
            raise DataError(f"{where} field '{field}': empty")
        problem[field] = value
    if not problem["entry_point"].isidentifier():
        raise DataError(f"{where} field 'entry_point': not a Python identifier: {problem['entry_point']!r}")
    return problem


# ------------------------------------------------------------------------------------ extraction

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.M | re.S)
_CODE_LANGS = ("", "python", "py", "python3", "py3")
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |return\b|for |while |if |@)", re.M)
_MAX_SPAN_LINES = 150


def extract_code(answer: str, prompt: str, entry_point: str) -> str:
    """The Python program a chat answer gives for a HumanEval problem. Never raises.

    1. The code: among the fenced blocks (```python, ```py or bare ```; an unclosed last fence runs to the
       end), the longest block that defines `entry_point`, else the longest block; with no fence, the whole
       answer if it compiles (or completes the prompt), else the longest compiling run of lines from
       `def entry_point(` (with the imports just above it), else the longest compiling run of lines that
       contains code (answers up to 150 lines), else the whole answer.
    2. If the code defines `def entry_point(` at top level, it is sanitized as EvalPlus does: only imports
       and the definitions (functions, classes, assignments) reachable from the entry point are kept, so
       example calls, prints and `if __name__ == "__main__":` blocks are dropped. Otherwise the code is
       taken as the body completing the prompt (human-eval's `prompt + completion`; a body given without
       indentation is indented by 4 spaces when that compiles) and the prompt is prepended.
    3. The prompt's imports, and its other top-level functions (helpers such as `encode_cyclic` that the
       tests call), are prepended when the code lacks them.
    """
    try:
        return _extract_code(answer if isinstance(answer, str) else "", prompt or "", entry_point or "")
    except Exception:  # noqa: BLE001 - a bad answer must score as a failure, not crash the run
        return answer if isinstance(answer, str) else ""


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.M) is not None


def _parses(code: str) -> bool:
    """Whether `code` compiles (a parse alone accepts `return` outside a function)."""
    try:
        compile(code, "<answer>", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False


def _code_blocks(answer: str) -> list[str]:
    blocks = []
    for m in _FENCE.finditer(answer):
        if m.group(1).lower() in _CODE_LANGS:
            blocks.append(textwrap.dedent(m.group(2)))
    return blocks


def _unfenced(answer: str, prompt: str, entry_point: str) -> str:
    text = textwrap.dedent(answer.strip("\n"))
    if _parses(text) or _parses(prompt + answer):
        return text if _parses(text) else answer
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _defines(line, entry_point)]
    if starts:  # the longest compiling run from the entry point's def (with the imports just above it)
        i = starts[0]
        while i > 0 and re.match(r"(import \S|from \S+ import |@|\s*$)", lines[i - 1]):
            i -= 1
        for j in range(len(lines), starts[0], -1):
            if _parses("\n".join(lines[i:j])):
                return "\n".join(lines[i:j]).strip("\n") + "\n"
    if len(lines) <= _MAX_SPAN_LINES:
        best, best_len = None, 0
        for i in range(len(lines)):
            for j in range(len(lines), i, -1):
                length = sum(1 for line in lines[i:j] if line.strip())
                if length <= best_len:
                    break
                span = "\n".join(lines[i:j])
                if _CODE_LINE.search(span) and _parses(span):
                    best, best_len = span, length
                    break
        if best is not None:
            return best
    return answer


def _extract_code(answer: str, prompt: str, entry_point: str) -> str:
    blocks = _code_blocks(answer)
    if blocks:
        defining = [b for b in blocks if _defines(b, entry_point)]
        code = max(defining or blocks, key=len)
    else:
        code = _unfenced(answer, prompt, entry_point)
    if _defines(code, entry_point):
        code = _sanitize(code, entry_point)
    else:
        body = code if code.strip() else ""
        first = next((line for line in body.split("\n") if line.strip()), "")
        if first and not first[0].isspace() and _parses(prompt + textwrap.indent(body, "    ")):
            body = textwrap.indent(body, "    ")  # a dedented body: put it back inside the function
        sep = "" if prompt.endswith("\n") or not prompt else "\n"
        code = prompt + sep + body
    return _add_prompt_context(code, prompt, entry_point)


def _top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    names = []
    for target in targets:
        names.extend(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _segment(lines: list[str], node: ast.stmt) -> str:
    decorators = getattr(node, "decorator_list", [])
    start = min([node.lineno] + [d.lineno for d in decorators]) - 1
    return "\n".join(lines[start:node.end_lineno])


def _sanitize(code: str, entry_point: str) -> str:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    lines = code.split("\n")
    definitions: list[tuple[list[str], ast.stmt]] = []
    keep_imports = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            keep_imports.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            definitions.append((_top_level_names(node), node))
    uses: dict[str, set[str]] = {}
    for names, node in definitions:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        for name in names:
            uses.setdefault(name, set()).update(used)
    reachable, queue = {entry_point}, [entry_point]
    while queue:
        for name in uses.get(queue.pop(), ()):
            if name not in reachable:
                reachable.add(name)
                queue.append(name)
    kept = keep_imports + [node for names, node in definitions if any(n in reachable for n in names)]
    if len(kept) == len(tree.body):
        return code  # nothing to drop: keep the answer's own layout
    kept.sort(key=lambda n: n.lineno)
    out = ""
    for previous, node in zip([None] + kept, kept):
        if previous is not None:
            both_imports = all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in (previous, node))
            out += "\n" if both_imports else "\n\n\n"
        out += _segment(lines, node)
    return out + "\n"


def _add_prompt_context(code: str, prompt: str, entry_point: str) -> str:
    """Prepend the prompt's import lines and top-level helper functions that `code` lacks."""
    try:
        prompt_tree = ast.parse(prompt)
    except (SyntaxError, ValueError):
        prompt_tree = None
    prompt_lines = prompt.split("\n")
    code_lines = {line.strip() for line in code.split("\n")}
    missing: list[str] = []
    if prompt_tree is not None:
        for node in prompt_tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                segment = _segment(prompt_lines, node)
                if segment.strip() not in code_lines:
                    missing.append(segment)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != entry_point:
                if not re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(node.name)}[ \t]*\(", code, re.M):
                    missing.append(_segment(prompt_lines, node) + "\n")
    else:
        for line in prompt_lines:
            if re.match(r"(import \S|from \S+ import )", line) and line.strip() not in code_lines:
                missing.append(line)
    if not missing:
        return code
    return "\n".join(missing) + "\n\n" + code


# ------------------------------------------------------------------------------ program, metric


def program(code: str, test: str, entry_point: str) -> str:
    """The program the sandbox runs, as human-eval's `execution.py` builds it (with `code` standing for
    `prompt + completion`): code, the test (which defines `check`), then `check(entry_point)`."""
    return code + "\n" + test + "\n" + f"check({entry_point})"


def guarded(program: str) -> tuple[str, str]:
    """`program` wrapped so that it passes only when `check()` returns: (wrapper source, marker).

    human-eval `exec`s the program and records "passed" only when `exec` returns, so `sys.exit(0)`
    (SystemExit) and `os._exit(0)` fail there. Here the program runs in its own process, where both
    would exit 0; so the wrapper `exec`s it the same way, fails on any exception, and prints a marker
    (random per run) after a normal return: the run passes only with exit 0 and the marker.
    """
    marker = f"pixtral-humaneval-passed-{secrets.token_hex(8)}"
    source = (
        "import sys as _pixtral_sys, traceback as _pixtral_traceback\n"
        f"_pixtral_program = {program!r}\n"
        "try:\n"
        "    exec(compile(_pixtral_program, 'program.py', 'exec'), {'__name__': 'program'})\n"
        "except BaseException:\n"
        "    _pixtral_traceback.print_exc()\n"
        "    _pixtral_sys.stderr.flush()\n"
        "    _pixtral_sys.exit(1)\n"
        f"print({marker!r}, flush=True)\n"
    )
    return source, marker


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k),
    computed in human-eval's numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i).

    Returns 1.0 when n - c < k (every k-subset holds a correct sample). Raises ValueError when k > n,
    k < 1, or c is outside 0..n.
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"number correct c={c} must be between 0 and n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
