"""README's promises: the two quick-start commands, and every action it names exists in --help."""

from __future__ import annotations

import re
from pathlib import Path

from alt_i2v.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
INSTALL_AND_DEMO = 'pip install . && python -m alt_i2v --demo'
INSTALL_AND_TEST = 'pip install ".[test]" && python -m pytest'


def quick_start() -> str:
    return README.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def test_quick_start_has_exactly_the_two_commands():
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", quick_start(), re.S)
    commands = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip()]
    assert commands == [INSTALL_AND_DEMO, INSTALL_AND_TEST]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL_AND_TEST in ci and "python3 -m venv" in ci
    assert "|| true" not in ci  # pytest's "no tests collected" (exit 5) must fail CI


def test_every_action_named_in_readme_exists_in_help():
    help_text = build_parser().format_help()
    named = set(re.findall(r"python -m alt_i2v (--[a-z-]+)", README))
    assert {"--demo", "--vocab", "--build", "--import"} <= named
    for flag in named:
        assert flag in help_text, f"README names {flag}, which --help does not list"
