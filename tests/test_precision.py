"""`model.dtype=auto` (`rlhf.models.precision`): the choice from the CPU's reported features, recorded and kept by a run
directory, and a warning for an explicit bf16 where it is slow."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

import rlhf.models.precision as precision
from rlhf.cli import compose
from rlhf.models.precision import CPUFeatures, cpu_bf16_verdict, resolve_dtype, slow_bf16_warning
from rlhf.run.pipeline import run, settle_precision
from tests.helpers import TINY

SAPPHIRE_RAPIDS = CPUFeatures("Intel Xeon 8480", "AVX512", amx_bf16=True, avx512_bf16=True, onednn_bf16=True)
ZEN4 = CPUFeatures("AMD EPYC 9004", "AVX512", amx_bf16=False, avx512_bf16=True, onednn_bf16=True)
ZEN3 = CPUFeatures("AMD EPYC 7003", "AVX2", amx_bf16=False, avx512_bf16=False, onednn_bf16=False)
SKYLAKE = CPUFeatures("Intel Xeon 8180", "AVX512", amx_bf16=False, avx512_bf16=False, onednn_bf16=True)
ZEN4_CAPPED = CPUFeatures("AMD EPYC 9004", "AVX2", amx_bf16=False, avx512_bf16=True, onednn_bf16=False)
"""A BF16-capable CPU whose kernels are capped at AVX2 (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)."""


@pytest.mark.parametrize(
    ("cpu", "fast"),
    [(SAPPHIRE_RAPIDS, True), (ZEN4, True), (ZEN3, False), (SKYLAKE, False), (ZEN4_CAPPED, False)],
    ids=["amx", "avx512-bf16", "avx2", "avx512-without-bf16", "avx512-bf16-capped-at-avx2"],
)
def test_bf16_is_chosen_only_where_the_cpu_multiplies_it_natively(cpu, fast):
    verdict, why = cpu_bf16_verdict(cpu)
    assert verdict is fast
    assert cpu.name in why


def test_an_explicit_dtype_is_kept_and_auto_follows_the_verdict(monkeypatch):
    assert resolve_dtype("float32", "cpu") == ("float32", "set explicitly")
    assert resolve_dtype("bfloat16", "cpu")[0] == "bfloat16"
    monkeypatch.setattr(precision, "cpu_features", lambda: ZEN3)
    assert resolve_dtype("auto", "cpu")[0] == "float32"
    assert "bfloat16 on this CPU is slower" in slow_bf16_warning("bfloat16", "cpu")
    monkeypatch.setattr(precision, "cpu_features", lambda: SAPPHIRE_RAPIDS)
    assert resolve_dtype("auto", "cpu")[0] == "bfloat16"
    assert slow_bf16_warning("bfloat16", "cpu") is None
    assert slow_bf16_warning("float32", "cpu") is None


def test_this_machine_and_the_same_machine_capped_at_avx2_as_torch_reports_them():
    """The real features, read twice: as they are, and with the kernels capped at AVX2 the way an AVX2-only CPU
    runs (then auto must pick float32 whatever the hardware has)."""
    here = precision.cpu_features()
    assert resolve_dtype("auto", "cpu")[0] == ("bfloat16" if cpu_bf16_verdict(here)[0] else "float32")
    capped = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from rlhf.models.precision import resolve_dtype; print(resolve_dtype('auto', 'cpu')[0])"
    out = subprocess.run([sys.executable, "-c", code], env=capped, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32"


def test_a_run_directory_records_auto_and_keeps_it_on_another_kind_of_machine(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_features", lambda: SAPPHIRE_RAPIDS)
    overrides = ["stages=[sft]", *TINY, "model.dtype=auto"]
    with caplog.at_level(logging.INFO, logger="rlhf"):
        first = run(compose(overrides), run_dir=tmp_path)
    assert first["precision"] == {
        "requested": "auto",
        "dtype": "bfloat16",
        "reason": cpu_bf16_verdict(SAPPHIRE_RAPIDS)[1],
    }
    assert first["stages"]["sft"]["config"]["model.dtype"] == "bfloat16"  # in the stage key
    assert "model.dtype=auto -> bfloat16" in caplog.text

    caplog.clear()
    monkeypatch.setattr(precision, "cpu_features", lambda: ZEN3)  # the same directory on an AVX2 machine
    with caplog.at_level(logging.INFO, logger="rlhf"):
        again = run(compose(overrides), run_dir=tmp_path)
    assert again["precision"]["dtype"] == "bfloat16"
    assert "kept from this run directory's first run" in caplog.text
    assert "sft: finished in this run directory with the same config: reusing it" in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["precision"] == first["precision"]

    fresh = run(compose(overrides), run_dir=tmp_path / "new")  # a new directory decides for its machine
    assert fresh["precision"]["dtype"] == "float32"
    assert fresh["stages"]["sft"]["key"] != first["stages"]["sft"]["key"]


def test_an_explicit_bf16_on_a_slow_cpu_warns_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_features", lambda: ZEN3)
    cfg = compose(["stages=[sft]", *TINY, "model.dtype=bfloat16", "sft.num_train_epochs=0.3"])
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, run_dir=tmp_path)
    assert summary["precision"] == {"requested": "bfloat16", "dtype": "bfloat16", "reason": "set explicitly"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model.dtype=bfloat16 on this CPU is slower than float32" in w for w in warnings)


def test_a_directory_whose_first_stage_was_killed_keeps_its_choice_for_the_checkpoint(monkeypatch):
    """No stage finished yet, but a PPO checkpoint of the first run may lie there: its precision is kept too."""
    monkeypatch.setattr(precision, "cpu_features", lambda: ZEN3)
    recorded = {"requested": "auto", "dtype": "bfloat16", "reason": "made on an AMX CPU"}
    cfg = compose(["model.dtype=auto"])
    assert settle_precision(cfg, {"precision": recorded, "stages": {}}, "cpu", main=True) == recorded
    assert cfg.model.dtype == "bfloat16"
    fresh = compose(["model.dtype=auto"])
    assert settle_precision(fresh, {"stages": {}}, "cpu", main=True)["dtype"] == "float32"
