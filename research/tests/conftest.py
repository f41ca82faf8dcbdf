"""Load a script from research/scripts/ as a module, with the package's shared fixtures."""

from __future__ import annotations

import functools
from pathlib import Path

from tests.scripts.conftest import load_script as _load_script

load_script = functools.partial(_load_script, folder=Path(__file__).resolve().parents[1] / "scripts")

pytest_plugins = ["tests.conftest"]  # tiny checkpoints and the like
