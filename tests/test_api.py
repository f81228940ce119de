"""The package's public names: functions that share their module's name stay callable however imported."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["train", "evaluate", "explain", "screen", "export"])
def test_public_function_is_callable_even_after_its_module_was_imported(name):
    code = (
        "import importlib, inspect, alt_i2v\n"
        f"module = importlib.import_module('alt_i2v.{name}')\n"
        f"from alt_i2v import {name} as public\n"
        f"fn = getattr(module, '{name}')\n"
        "assert callable(public) and public is module, public\n"
        "assert inspect.isfunction(fn)\n"
        "try:\n"
        "    public()\n"
        "except TypeError as e:\n"
        f"    assert str(e).startswith('{name}() missing'), e\n"
        "else:\n"
        "    raise AssertionError('no TypeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
