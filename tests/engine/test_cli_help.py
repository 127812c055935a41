"""What `sgtm COMMAND --help` tells a user about options: a flag takes no value."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from sgtm_engine.cli import app


def test_help_shows_flags_without_a_value():
    """Typer 0.29 lists every flag as `--quick <bool>`, which reads as an option that wants true or false (and
    `--quick true` is then refused); pyproject.toml keeps a Typer that does not."""
    command = typer.main.get_command(app)
    runner = CliRunner()
    checked = 0
    for name, sub in command.commands.items():  # type: ignore[attr-defined]
        flags = [opt for p in sub.params if getattr(p, "is_flag", False) for opt in p.opts]
        if not flags:
            continue
        result = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        for line in result.output.splitlines():
            for flag in flags:
                words = line.replace("│", " ").split()
                if flag in words:
                    after = words[words.index(flag) + 1:]
                    assert not after or not after[0].startswith("<"), f"sgtm {name}: {line.strip()}"
        checked += 1
    assert checked >= 5  # run, sweep, demo, attack-matrix, export, ... each have flags
