"""The command line: every action documented, exit codes, --quiet, and no heavy imports for --help."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alt_i2v.cli import ACTIONS, build_parser, main
from alt_i2v.cli.options import ACTION_OPTIONS, OPTIONS, keywords
from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
ACTION_FLAGS = ["--scrape", "--import", "--vocab", "--maeshori", "--build", "--train", "--evaluate", "--pred",
                "--embed", "--index", "--similar", "--demo"]


def test_help_lists_every_action_with_an_example(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ACTION_FLAGS:
        assert flag in out, flag
    for *_, example in ACTIONS.values():
        assert example in out
    assert out.count("e.g. alt-i2v") == len(ACTIONS)


def test_import_and_help_do_not_load_tensorflow_or_keras():
    code = ("import sys, alt_i2v, alt_i2v.cli, contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = alt_i2v.cli.main(['--help'])\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'jax', 'torch', 'PIL', 'plyvel') if m in sys.modules]\n"
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"


def test_framework_start_up_chatter_stays_off_stderr_unless_debug(tmp_path):
    """A command that loads TensorFlow prints only its own line on stderr; --debug shows everything."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    env["KERAS_BACKEND"] = "tensorflow"
    argv = ["--evaluate", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model")]
    code = ("import sys, alt_i2v.cli\n"
            f"rc = alt_i2v.cli.main({argv!r} + sys.argv[1:])\n"
            "print(rc, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.stdout.split() == ["1", "True"]  # it failed cleanly, after TensorFlow was loaded
    assert done.stderr.splitlines() == [f"alt-i2v: error: {tmp_path / 'model'}: no such model directory; "
                                        "train one with `alt-i2v --train --data DIR --model DIR`"]
    debug = subprocess.run([sys.executable, "-c", code, "--debug"], capture_output=True, text=True, env=env,
                           cwd=ROOT)
    assert "Traceback" in debug.stderr and "no such model directory" in debug.stderr


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "alt_i2v", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("alt-i2v ")


@pytest.mark.parametrize("argv,needle", [
    ([], "one of the arguments"),
    (["--build", "--vocab", "--data", "x"], "not allowed with"),
    (["--build", "--data", "x", "--epochs", "3"], "--epochs does not apply to --build"),
    (["--vocab"], "--vocab needs --data"),
    (["--scrape", "--data", "x"], "at least one --query"),
    (["--build", "--data", "x", "--resize", "squash"], "invalid choice"),
])
def test_usage_errors_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_failures_exit_1_with_a_clear_message(tmp_path, capsys):
    assert main(["--build", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "--vocab" in err and "Traceback" not in err


def test_import_vocab_build_from_the_cli(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, n=30)
    assert main(["--vocab", "--data", str(data), "--size", "5"]) == 0
    assert "== vocab ==" in capsys.readouterr().out
    assert len(json.loads((data / "vocab.json").read_text())["tags"]) == 5
    assert main(["--build", "--data", str(data), "--image-size", "24", "--workers", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    report = json.loads((data / "reports" / "build_report.json").read_text())
    assert report["stored now"] == 30
    assert main(["--maeshori", "--data", str(data), "--categories", "general,rating", "-q"]) == 0
    assert "rating:g" in (data / "vocab.json").read_text()


def test_full_disk_is_reported_clearly(tmp_path, monkeypatch, capsys):
    import errno

    import alt_i2v.data.vocab

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    make_dataset(tmp_path / "d", n=3)
    monkeypatch.setattr(alt_i2v.data.vocab, "atomic_write_json", full)
    assert main(["--vocab", "--data", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and "disk is full" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "vocab.json").exists()


def test_each_option_is_declared_once_and_drives_parser_checks_and_keywords():
    flags = [f for o in OPTIONS for f in o.flags]
    assert len(flags) == len(set(flags))
    args = build_parser().parse_args(["--train", "--data", "d", "--model", "m", "--epochs", "3", "--batch-size",
                                      "8", "--devices", "2", "--resume", "--quiet"])
    assert keywords(args, "train") == {"epochs": 3, "batch_size": 8, "resume": True}  # --data/--model: positional
    assert keywords(args, "train", part="distribution") == {"devices": 2}
    serve = build_parser().parse_args(["--serve", "--batch-size", "4", "--top-k", "5"])
    assert keywords(serve, "serve") == {"max_batch": 4, "top_k": 5}  # the keyword can differ per action
    assert "devices" in ACTION_OPTIONS["train"] and "devices" not in ACTION_OPTIONS["evaluate"]


def test_every_flag_the_library_names_in_a_message_is_declared():
    """Library errors name options by their flag; the table is where flags are declared, so a message
    never points at a flag that does not exist."""
    declared = {f for o in OPTIONS for f in o.flags} | {f for flags, *_ in ACTIONS.values() for f in flags}
    named = {}
    for path in (ROOT / "alt_i2v").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    named.setdefault(flag, path.name)
    assert "--batch-size" in named and "--shards" in named
    assert {f: where for f, where in named.items() if f not in declared | {"--help", "--version"}} == {}
