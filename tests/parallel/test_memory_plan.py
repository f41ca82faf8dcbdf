"""The memory plan in docs/architecture.md is what our own accounting computes, and the accounting adds up."""

from pathlib import Path

import torch

from pixtral.engine.kv_cache import bytes_per_block
from pixtral.model.presets import preset
from pixtral.parallel.memory import GPUS, memory_plan, plan_table, rank_weight_bytes

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_documented_table_is_the_accountings_output():
    assert plan_table(preset("pixtral-large-2411")) in DOC.read_text()


def test_ranks_split_the_kv_cache_and_the_weights():
    args = preset("pixtral-large-2411")
    whole = bytes_per_block(args, 16, torch.bfloat16) // 16
    assert whole == 2 * 88 * 8 * 128 * 2  # keys and values, every layer, every KV head, bf16
    for tp in (4, 8):
        plan = memory_plan(args, tp, GPUS["H200"])
        assert plan.kv_bytes_per_token * tp == whole  # 8 KV heads over 4 or 8 ranks: no replica
        full = rank_weight_bytes(args, 1)
        assert full / tp < plan.weight_bytes < full / tp * 1.01  # replicated norms and patch conv: < 1%
        assert plan.weight_bytes + plan.reserve_bytes + plan.kv_budget_bytes == int(GPUS["H200"] * 0.9)
        assert plan.kv_tokens * plan.kv_bytes_per_token <= plan.kv_budget_bytes


def test_a_card_too_small_leaves_no_kv_cache():
    plan = memory_plan(preset("pixtral-large-2411"), 4, 40 * 2**30)  # 57.8 GiB of weights a rank do not fit
    assert plan.kv_budget_bytes == 0 and plan.kv_tokens == 0 and plan.longest_context == 0
    assert plan.batch_at(4096) == 0
