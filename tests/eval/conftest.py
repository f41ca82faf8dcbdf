import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `pixtral eval ...` in-process through the real CLI entry point; returns (code, stdout, stderr)."""
    from pixtral.cli import main as cli_main

    monkeypatch.setattr(cli_main, "SUBCOMMAND_MODULES", ["pixtral.cli.eval"])

    def run(*argv: str):
        code = cli_main.main(["eval", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run
