"""Training data for the SFT and reward stages, in TRL's standard formats.

Either the task's own offline data (the environment class's `demonstrations` / `preferences`), or the user's
dataset: a local jsonl / json / parquet / csv file, a directory written by `Dataset.save_to_disk`, or a hub name
(through `datasets.load_dataset`). Formats (TRL's): SFT takes `text`, `messages`, or `prompt` + `completion`;
the reward model takes `chosen` + `rejected` with an optional `prompt` (explicit or implicit prompt).
A held-out split of `task.eval_fraction` is carved off unless the dataset brings its own `test` split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `datasets` loads lazily so that path checks stay fast
    from datasets import Dataset

    from rlhf.config import RLHFConfig

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SFT_FORMATS = (("messages",), ("prompt", "completion"), ("text",))
PREFERENCE_COLUMNS = ("chosen", "rejected")


def looks_like_path(spec: str) -> bool:
    """A file name or a path, as opposed to a hub id such as `org/name`."""
    return (
        spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_BUILDERS or spec.count("/") > 1
    )


def check_dataset_spec(spec: str | None, key: str) -> None:
    """Fail before any training when a dataset path does not exist or has an unsupported extension."""
    if not spec:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() not in FILE_BUILDERS:
            raise ValueError(f"{key}={spec}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}")
        return
    if looks_like_path(spec):
        raise ValueError(
            f"{key}={spec}: no such file or directory; fix the path or unset {key} to use the task's data"
        )


def check_json_file(path: Path, key: str) -> None:
    """A .json / .jsonl file parses: one JSON document, or one JSON object per line (ValueError naming the line)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # `datasets` also reads JSON lines from a .json file
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{key}={path} line {number}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{key}={path} line {number}: expected a JSON object with the dataset's columns")


def load_user_dataset(spec: str, key: str) -> tuple[Dataset, Dataset | None]:
    """The user's dataset as (train, test-or-None): a local file or directory, or a hub dataset name.

    ValueError (one line, naming `key`) for an empty file, a malformed JSON line, an empty dataset or anything
    else `datasets` cannot read.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    check_dataset_spec(spec, key)
    path = Path(spec).expanduser()
    if path.is_file():
        if not path.read_bytes().strip():
            raise ValueError(f"{key}={spec} is empty; give it at least one row")
        if FILE_BUILDERS[path.suffix.lower()] == "json":
            check_json_file(path, key)
    try:
        if path.is_file():
            loaded = load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path))
        elif path.is_dir() and (
            (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        ):
            loaded = load_from_disk(str(path))
        else:
            loaded = load_dataset(str(path) if path.is_dir() else spec)
    except Exception as e:  # pyarrow, fsspec, the hub: their messages span many lines
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{key}={spec} cannot be read ({type(e).__name__}: {first}); fix it or set another {key}"
        ) from e
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{key}={spec} has no 'train' split (splits: {', '.join(loaded)})")
        train, test = loaded["train"], loaded.get("test")
    else:
        assert isinstance(loaded, Dataset)
        train, test = loaded, None
    if len(train) == 0:
        raise ValueError(f"{key}={spec} holds no rows; give it at least one")
    return train, test


def check_sft_columns(ds: Dataset, key: str) -> None:
    """SFT needs one of TRL's standard formats."""
    columns = set(ds.column_names)
    if not any(set(fmt) <= columns for fmt in SFT_FORMATS):
        raise ValueError(
            f"{key}: columns {sorted(columns)} match no SFT format; provide 'messages', 'prompt'+'completion' or 'text'"
        )


def check_preference_columns(ds: Dataset, key: str) -> None:
    """A preference dataset needs `chosen` and `rejected` (and, for the explicit-prompt format, `prompt`)."""
    missing = [c for c in PREFERENCE_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{key}: preference data needs columns prompt/chosen/rejected; missing {', '.join(missing)} "
            f"(found {', '.join(ds.column_names)})"
        )


def check_distinct_pairs(ds: Dataset, key: str) -> None:
    """A preference pair whose chosen equals its rejected response teaches nothing and hides a data bug."""
    same = [i for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"])) if c == r]
    if same:
        raise ValueError(
            f"{key}: {len(same)} preference pair(s) have chosen == rejected (first: row {same[0] + 1}); "
            "a pair needs two different responses: fix or drop those rows"
        )


def join_spacing(example: dict, continuations: tuple[str, ...]) -> dict:
    """TRL concatenates `prompt + completion` as strings: make sure a word boundary separates them."""
    prompt = example.get("prompt")
    if not isinstance(prompt, str) or not prompt or prompt[-1].isspace():
        return example
    out = dict(example)
    for key in continuations:
        value = out.get(key)
        if isinstance(value, str) and value and not value[0].isspace():
            out[key] = " " + value
    return out


def as_conversation(example: dict, continuations: tuple[str, ...]) -> dict:
    """A plain `prompt` (+ continuations) row in TRL's conversational form: the prompt is a user turn, each
    continuation an assistant turn, so TRL renders it through the chat template exactly as rollouts are laid out."""
    from rlhf.models.chat_format import assistant, user

    out = dict(example)
    out["prompt"] = [user(example["prompt"])]
    for key in continuations:
        if isinstance(out.get(key), str):
            out[key] = [assistant(out[key])]
    return out


def split(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Shuffle and hold out `eval_fraction` of `ds` (None when that is less than one example)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"task.eval_fraction={eval_fraction} must be in [0, 1)")
    n_eval = int(round(len(ds) * eval_fraction))
    if n_eval == 0:
        return ds.shuffle(seed=seed), None
    if n_eval >= len(ds):
        raise ValueError(
            f"task.eval_fraction={eval_fraction} leaves no training data out of {len(ds)} examples"
        )
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _task_class(cfg: RLHFConfig):
    from envs import env_class

    return env_class(cfg.task.env_id)


@dataclass(frozen=True)
class _Data:
    """What one stage trains on: `<section>.dataset` when set, else the task's offline data of this kind."""

    section: str
    """The config section whose `dataset` names the user's data: sft | reward."""
    kind: str
    """The task's classmethod that makes the rows, and `task.num_<kind>`: demonstrations | preferences."""
    check: Callable[[Dataset, str], None]
    continuations: tuple[str, ...]
    """The columns that continue a plain `prompt`."""


_DEMONSTRATIONS = _Data("sft", "demonstrations", check_sft_columns, ("completion",))
_PREFERENCES = _Data("reward", "preferences", check_preference_columns, PREFERENCE_COLUMNS)


def sft_splits(cfg: RLHFConfig, seed: int, chat: bool = False) -> tuple[Dataset, Dataset | None]:
    """SFT data (train, eval): `sft.dataset` when set, else `task.num_demonstrations` of the task's demonstrations.

    `chat`: the model's tokenizer has a chat template (`ChatFormat.is_chat`); plain prompts become conversations.
    """
    return _splits(cfg, seed, chat, _DEMONSTRATIONS)


def preference_splits(cfg: RLHFConfig, seed: int, chat: bool = False) -> tuple[Dataset, Dataset | None]:
    """Preference pairs (train, eval): `reward.dataset` when set, else `task.num_preferences` task pairs.

    `chat`: the reward model's tokenizer has a chat template; plain prompts become conversations.
    """
    return _splits(cfg, seed, chat, _PREFERENCES)


def _splits(cfg: RLHFConfig, seed: int, chat: bool, data: _Data) -> tuple[Dataset, Dataset | None]:
    """(train, eval) from the user's dataset (its own test split when it has one) or from the task's offline data,
    plain prompts turned into conversations (chat) or their continuations' leading space normalised (plain), and
    `task.eval_fraction` held out."""
    from datasets import Dataset

    user_dataset = getattr(cfg, data.section).dataset
    if user_dataset:
        key = f"{data.section}.dataset"
        train, test = load_user_dataset(user_dataset, key)
    else:
        rows = getattr(_task_class(cfg), data.kind)(getattr(cfg.task, f"num_{data.kind}"), seed)
        train, test = Dataset.from_list(rows), None
        key = f"{cfg.task.env_id} {data.kind}"
    data.check(train, key)
    if len(train) == 0:
        raise ValueError(f"{key}: the dataset is empty; give it at least one row")
    plain_prompts = "prompt" in train.column_names and isinstance(train[0]["prompt"], str)
    if plain_prompts and set(data.continuations) <= set(train.column_names):
        convert = as_conversation if chat else join_spacing
        train = train.map(convert, fn_kwargs={"continuations": data.continuations})
        if test is not None:
            test = test.map(convert, fn_kwargs={"continuations": data.continuations})
    if test is not None:
        return train.shuffle(seed=seed), test
    return split(train, cfg.task.eval_fraction, seed)
