"""The wheel ships rlhf, envs and the Hydra configs, so a non-editable install composes and runs the command."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_code_and_configs_and_composes_outside_the_repo(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("rlhf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped_yaml = {n for n in names if n.startswith("conf/") and n.endswith(".yaml")}
    repo_yaml = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped_yaml == repo_yaml
    assert {"rlhf/cli.py", "rlhf/ppo/trainer.py", "envs/review.py", "envs/check.py"} <= set(names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what a non-editable install puts in site-packages
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-m", "rlhf", "--cfg", "job", "experiment=guess"],
        cwd=tmp_path,  # not the repository: configs must come from the installed package
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "env_id: rlhf/GuessNumber-v0" in out
    probe = "import rlhf.cli, envs; print(rlhf.cli.CONF_DIR, envs.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert where.count(str(site)) == 2
