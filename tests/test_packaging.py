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


def test_the_torch_floor_covers_what_the_code_and_transformers_need():
    """pyproject's lowest torch must be one every dependency accepts and that has the APIs the code calls:
    transformers 5 requires torch 2.6; scaled_dot_product_attention's enable_gqa (the sampler) arrived in 2.5."""
    import tomllib
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ours = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    floor = min(Version(s.version) for s in ours.specifier if s.operator == ">=")
    theirs = [Requirement(r) for r in requires("transformers") if r.startswith("torch")]
    needed = [
        Version(s.version) for r in theirs if r.name == "torch" for s in r.specifier if s.operator == ">="
    ]
    assert needed and floor >= max(needed)
    assert floor >= Version("2.5")
