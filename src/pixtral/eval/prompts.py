"""Protocol text: the Explicit prompts, decoding settings and the MM-MT-Bench judge prompt.

These strings are part of each benchmark's definition (Pixtral 12B paper, App. A, and the released
`mistral-evals` harness) and are reproduced verbatim; see docs/evaluation.md ('Explicit prompts', 'MM-MT-Bench').
Do not reflow or "fix" them: the ChartQA prompt keeps the released harness's "should should be".
"""

from __future__ import annotations

# MMMU and MathVista (identical text).
COT_PROMPT = """Analyze the image and question carefully, using step-by-step reasoning.
First, describe any image provided in detail. Then, present your reasoning. And finally your final answer in this format:
Final Answer: <answer>
where <answer> is:
- The single correct letter choice A, B, C, D, E, F, etc. when options are provided. Only include the letter.
- Your direct answer if no options are given, as a single phrase or number.
- If your answer is a number, only include the number without any unit.
- If your answer is a word or phrase, do not paraphrase or reformat the text you see in the image.
- You cannot answer that the question is unanswerable. You must either pick an option or provide a direct answer.
IMPORTANT: Remember, to end your answer with Final Answer: <answer>."""

MMMU_PROMPT = COT_PROMPT
MATHVISTA_PROMPT = COT_PROMPT

CHARTQA_PROMPT = """Analyze the image and question carefully, using step-by-step reasoning.
First, describe any image provided in detail. Then, present your reasoning. And finally your final answer in this format:
Final Answer: <answer>
where <answer> follows the following instructions:
- <answer> should should be a single phrase or number.
- <answer> should not paraphrase or reformat the text in the image.
- If <answer> is a ratio, it should be a decimal value like 0.25 instead of 1:4.
- If the question is a Yes/No question, <answer> should be Yes/No.
- If <answer> is a number, it should not contain any units.
- If <answer> is a percentage, it should include a % sign.
- If <answer> is an entity, it should include the full label from the graph.
IMPORTANT: Remember, to end your answer with Final Answer: <answer>."""

VQAV2_PROMPT = """- Answer the question using a single word, number, or short phrase. Use as few words as possible.
- If the answer is a number, report it as a number, i.e. 2, not Two, and only include the number without any unit.
- If the question is Yes/No, answer with Yes/No, and nothing else (no likely, unknown, etc.).
- You cannot answer that the question is unanswerable. You must answer."""

DOCVQA_PROMPT = "Answer the question using a single word or phrase."

# Decoding: greedy everywhere; max_tokens per task (docs/evaluation.md, 'Common settings'). `synth` answers are short.
TEMPERATURE = 0.0
MAX_TOKENS = {
    "mm_mt_bench": 4096,
    "mmmu": 2048,
    "mathvista": 2048,
    "chartqa": 2048,
    "docvqa": 10,
    "vqav2": 10,
    "synth": 64,
}

# MM-MT-Bench judge (docs/evaluation.md, 'MM-MT-Bench'). The system prompt ends with two newlines.
JUDGE_MODEL = "gpt-4o-2024-05-13"
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 2048
JUDGE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the most recent question given the previous conversation as context. Your "
    "evaluation should consider correctness and helpfulness. You will be given a reference answer "
    "and the assistant's answer. Begin your evaluation by comparing the assistant's answer with the "
    "reference answer. Identify and correct any mistakes. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    'following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
)
JUDGE_OPEN = "<|The Start of Conversation with User|>\n\n"
JUDGE_USER = "### User:\n"
JUDGE_REFERENCE = "\n\n### Reference answer:\n{reference}\n\n"
JUDGE_ANSWER = "\n\n### Assistant's answer:\n{answer}\n\n"
JUDGE_CLOSE = "<|The End of Conversation with User|>\n\n\n"
