"""Without llguidance (or with a mistral-common too old for its Tekken bridge) everything but
structured outputs runs, and a structured request is refused naming what to install."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["llguidance"] = None  # as if not installed: importing it raises ImportError
sys.modules["llguidance.torch"] = None
from pixtral.engine import LLM
from pixtral.errors import RequestError
from pixtral.generation import SamplingParams
from pixtral.structured import StructuredOutput

llm = LLM()
chat = [[{"role": "user", "content": "hi"}]]
print("answer:", repr(llm.chat(chat, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].text))
try:
    llm.chat(chat, SamplingParams(max_tokens=4, structured_output=StructuredOutput(json_object=True)))
except RequestError as exc:
    print("refused:", exc)
"""


def test_only_structured_outputs_need_llguidance():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "answer: '" in out.stdout and "answer: ''" not in out.stdout
    assert "refused: structured outputs (response_format, tools) need llguidance and mistral-common >= 1.13" \
        in out.stdout
