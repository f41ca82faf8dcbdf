"""Loading streams tensors: peak memory stays near one copy of the model, never two."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WRITE = textwrap.dedent("""
    import sys, torch
    from pixtral.checkpoint import save_model
    from pixtral.model import Pixtral
    from pixtral.model.args import ModelArgs, VisionArgs
    args = ModelArgs(dim=256, n_layers=2, head_dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, vocab_size=131072,
                     vision=VisionArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2))
    save_model(Pixtral(args).to(torch.bfloat16), sys.argv[1])  # ~130 MB of weights
""")

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from pixtral.checkpoint import load_model
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    base = rss()
    model = load_model(sys.argv[1], dtype=torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(peak - base, size)
""")


def test_peak_memory_below_one_and_a_half_copies(tmp_path):
    # Both steps run in fresh processes so the test process's own memory cannot blur the reading.
    path = tmp_path / "m"
    subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    growth, size = map(int, out.stdout.split())
    assert size > 100 * 2**20
    assert growth < 1.5 * size, f"loading grew memory by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
