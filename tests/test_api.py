"""The package's public names: ``train``, ``evaluate``, ``explain``, ``screen`` and ``export`` are plain
functions, whatever was imported before them."""

from __future__ import annotations

import subprocess
import sys

import pytest


MODULES = {"train": "training.run", "evaluate": "training.evaluation", "explain": "tagging.gradcam",
           "screen": "tagging.screening", "export": "tagging.exporting"}


@pytest.mark.parametrize("name", list(MODULES))
def test_public_function_is_a_plain_function_even_after_its_module_was_imported(name):
    code = (
        "import importlib, inspect, alt_i2v\n"
        f"module = importlib.import_module('alt_i2v.{MODULES[name]}')\n"
        f"from alt_i2v import {name} as public\n"
        f"fn = getattr(module, '{name}')\n"
        "assert inspect.isfunction(public) and public is fn and alt_i2v." + name + " is fn, public\n"
        "try:\n"
        "    public()\n"
        "except TypeError as e:\n"
        f"    assert str(e).startswith('{name}() missing'), e\n"
        "else:\n"
        "    raise AssertionError('no TypeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
