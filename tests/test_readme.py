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


def _bench_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_all", ROOT / "scripts" / "bench_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_are_the_results_file():
    """README's results block is exactly what `bench_all.py --readme` renders from scripts/results.json."""
    bench_all = _bench_all()
    results = bench_all.load_results()
    block = README.split(bench_all.BEGIN, 1)[1].split(bench_all.END, 1)[0].strip("\n")
    assert block == bench_all.render_results(results), "run `python scripts/bench_all.py --readme`"
    names = {e["name"] for e in results["results"]}
    assert {"build", "scrape", "train", "predict", "search", "demo"} <= names
    assert all(e["device"] for e in results["results"])  # every figure names the device it was measured on
    assert any(e.get("status") == "pending" and "GPU" in e["device"] for e in results["results"])


def test_no_benchmark_figure_is_typed_outside_the_generated_block():
    bench_all = _bench_all()
    before, rest = README.split(bench_all.BEGIN, 1)
    outside = before + rest.split(bench_all.END, 1)[1]
    figures = re.findall(r"\d[\d.,]*\s*(?:img/s|req/s|ms\b|x faster)|\b\d+\.\d+x\b|micro.F1 (?:of )?0\.\d+", outside)
    assert figures == [], f"figures typed by hand in README: {figures}"


def test_readme_is_short_and_self_contained():
    assert len(README.splitlines()) <= 250
    docs = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md")}
    for name, text in {"README.md": README, **docs}.items():
        assert "../shared" not in text and "CONTRACTS" not in text, f"{name} points outside the repository"
    for link in re.findall(r"\]\((docs/[^)#]+)\)", README):
        assert (ROOT / link).is_file(), f"README links to a missing {link}"
    for name, text in docs.items():
        for link in re.findall(r"\]\(([a-z0-9_-]+\.md)\)", text):
            assert link in docs, f"docs/{name} links to a missing {link}"
    for page in ("formats.md", "scrape.md", "train.md", "evaluate.md", "tagging.md", "search.md", "demo.md"):
        assert page in docs, page
