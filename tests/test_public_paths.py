"""The paths users type keep working: every import the docs show, every conf `_target_`, every script entry point, and
the old module paths that moved (with a warning that names the new one)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MOVED = {"rlhf.report": "rlhf.tracking.report", "rlhf.wandb_sync": "rlhf.tracking.wandb_sync"}
"""Old path -> new path of the modules that moved and that configs or scripts name."""


def shown_imports() -> list[str]:
    """Every `from rlhf|envs ... import ...` / `import rlhf|envs...` line in the docs' Python blocks."""
    lines = []
    for doc in DOCS:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            lines += [s.strip() for s in block.splitlines() if re.match(r"\s*(from|import) (rlhf|envs)\b", s)]
    return sorted(set(lines))


def test_the_docs_show_imports():
    assert "from envs.base import TextEnv, bradley_terry_pair" in shown_imports()


@pytest.mark.parametrize("statement", shown_imports())
def test_every_import_the_docs_show_works(statement):
    exec(statement, {})


def conf_targets() -> list[str]:
    return sorted(
        {
            m
            for f in (ROOT / "conf").rglob("*.yaml")
            for m in re.findall(r"_target_:\s*([\w.]+)", f.read_text())
        }
    )


@pytest.mark.parametrize("target", conf_targets())
def test_every_conf_target_resolves(target):
    module, _, name = target.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def script_entries() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_scripts_keep_their_names():
    assert set(script_entries()) == {"rlhf", "rlhf-report", "rlhf-sync"}


@pytest.mark.parametrize(("script", "entry"), sorted(script_entries().items()))
def test_every_script_entry_resolves(script, entry):
    module, _, name = entry.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), script


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_module_path_is_the_new_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=re.escape(new)):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_old_sweep_report_target_still_builds_the_callback():
    from hydra.utils import instantiate

    from rlhf.tracking.report import SweepReport

    sys.modules.pop("rlhf.report", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert isinstance(instantiate({"_target_": "rlhf.report.SweepReport"}), SweepReport)


def test_python_m_the_old_pretrained_path_runs_the_new_one():
    old, new = (
        subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        for module in ("rlhf.pretrained", "rlhf.models.pretrained")
    )
    assert old.returncode == new.returncode == 0, old.stderr
    assert "usage:" in old.stdout
    assert (
        old.stdout.split("\n", 1)[1] == new.stdout.split("\n", 1)[1]
    )  # the same options, after the usage line
    assert "moved to rlhf.models.pretrained" in old.stderr
