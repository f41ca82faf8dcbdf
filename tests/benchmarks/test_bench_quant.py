"""bench_quant.py end to end on the tiny preset: every peer runs in its own process and is reported,
with memory, and the quantized peers' drift and agreement against the float32 reference are there and sane.

The values are deterministic (seeded weights, fixed prompts); on the tiny preset they were: int8 max
|drift| / std 0.043 (bfloat16 alone: 0.028), fp8 0.114, every top token and greedy token the reference's.
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_quant.py"
PEERS = ["float32", "int8", "int8+head", "fp8", "transformers"]  # the GPU run's code paths too (fp8, transformers)


def test_bench_quant_reports_every_peer_with_memory_and_drift(tmp_path):
    out = tmp_path / "quant.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--layers", "0", "--peers", ",".join(PEERS),
                          "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| | " + " | ".join(PEERS) + " |" in run.stdout
    for line in ("logit drift vs float32: max abs / std", "top token = float32's", "greedy tokens before 1st difference"):
        assert line in run.stdout, line

    report = json.loads(out.read_text())
    assert report["reference"] == "float32" and list(report["peers"]) == PEERS
    peers = report["peers"]
    for name, r in peers.items():
        assert "error" not in r, name
        assert r["e2e_b2_tok_s"] > 0 and r["decode_read_bytes"] > 0, name
        assert r["serving_peak_bytes"] > 0 and r["build_peak_bytes"] > 0, name
    assert "drift_max_rel" not in peers["float32"]  # the reference is not compared with itself

    # The quantized weights are smaller: int8 linears, then the head too.
    assert peers["int8"]["weight_bytes"] < peers["transformers"]["weight_bytes"] < peers["float32"]["weight_bytes"]
    assert peers["int8+head"]["decode_read_bytes"] < peers["int8"]["decode_read_bytes"]
    # Quantized, so not equal to float32, yet close: int8 within bfloat16's rounding and a bit, fp8 coarser.
    int8, fp8 = peers["int8"], peers["fp8"]
    assert 0 < int8["drift_max_rel"] < 0.15, int8
    assert int8["drift_max_rel"] < fp8["drift_max_rel"] < 0.4, fp8
    for name in ("int8", "fp8", "transformers"):
        assert peers[name]["top1_agreement"] >= 0.9, (name, peers[name])
        assert peers[name]["greedy_agreement"] >= 0.5, (name, peers[name])
        assert 0 <= peers[name]["greedy_identical"] <= 2
