# SPDX-License-Identifier: Apache-2.0
"""The docs stay true: every public name has an entry in docs/api.md, and every Python example in README.md and
docs/*.md runs."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fourbit
from fourbit.__main__ import main as _cli  # noqa: F401  (the CLI module imports)

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PUBLIC_MODULES = ["fourbit", "fourbit.nn", "fourbit.qat", "fourbit.distributed", "fourbit.trainer"]
CLI_COMMANDS = ["info", "demo", "bench"]


def _public_names():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name.startswith("__"):
                continue
            yield module_name, name


def test_every_public_name_has_an_api_entry():
    api = (ROOT / "docs" / "api.md").read_text()
    # An entry is a heading naming the object: "### `fourbit.quantize_4bit(...)`" or "### `fourbit.nn.Linear4bit`".
    headings = set(re.findall(r"^#{2,4} `([\w.]+)", api, flags=re.M))
    missing = []
    for module_name, name in _public_names():
        obj = getattr(importlib.import_module(module_name), name)
        home = f"{module_name}.{name}"
        canonical = f"{getattr(obj, '__module__', module_name)}.{name}"
        if home not in headings and canonical not in headings and f"fourbit.{name}" not in headings:
            missing.append(home)
    for command in CLI_COMMANDS:
        if f"python -m fourbit {command}" not in api:
            missing.append(f"CLI: python -m fourbit {command}")
    assert not missing, f"docs/api.md has no entry for: {missing}"


def _examples():
    for path in DOC_FILES:
        text = path.read_text()
        for i, match in enumerate(re.finditer(r"```python\n(.*?)```", text, flags=re.S)):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{path.name}:{line}")


@pytest.mark.parametrize("code", list(_examples()))
def test_documented_example_runs(code, tmp_path):
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, f"example failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"


def test_guide_figures_are_filled_in():
    """Each figure block of docs/guide.md holds the output of docs/make_figures.py, not an empty placeholder."""
    guide = (ROOT / "docs" / "guide.md").read_text()
    blocks = re.findall(r"<!-- figure:(\w+) -->\n(.*?)<!-- /figure:\1 -->", guide, flags=re.S)
    assert {name for name, _ in blocks} >= {"memory", "quant_error", "merge", "qat", "demo"}
    for name, body in blocks:
        assert "|---|" in body, f"figure {name} in docs/guide.md is empty: run python docs/make_figures.py"
