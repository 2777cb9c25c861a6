"""Task data and user datasets in TRL's formats, the held-out split, and the one-line errors."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from rlhf.cli import compose
from rlhf.task.data import check_dataset_spec, join_spacing, preference_splits, sft_splits

SMALL = ["task.num_demonstrations=40", "task.num_preferences=40", "task.eval_fraction=0.25"]


def test_task_demonstrations_and_preferences():
    cfg = compose(SMALL)
    train, evals = sft_splits(cfg, seed=1)
    assert (len(train), len(evals)) == (30, 10)
    assert {"prompt", "completion"} <= set(train.column_names)
    # TRL joins prompt + completion as strings: a word boundary must separate them
    assert all(c.startswith(" ") for c in train["completion"])
    assert train["prompt"][0].startswith("review")
    pairs, held_out = preference_splits(cfg, seed=1)
    assert (len(pairs), len(held_out)) == (30, 10)
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
    again, _ = preference_splits(cfg, seed=1)
    assert again["chosen"] == pairs["chosen"]  # deterministic for a seed
    other, _ = preference_splits(cfg, seed=2)
    assert other["chosen"] != pairs["chosen"]


def test_no_eval_split_when_fraction_is_zero():
    train, evals = sft_splits(compose(["task.num_demonstrations=12", "task.eval_fraction=0"]), seed=0)
    assert len(train) == 12 and evals is None


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_user_files(tmp_path, suffix):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    path = tmp_path / f"data.{suffix}"
    ds = Dataset.from_list(rows)
    {"jsonl": ds.to_json, "parquet": ds.to_parquet, "csv": ds.to_csv}[suffix](str(path))
    train, evals = sft_splits(compose([f"sft.dataset={path}", "task.eval_fraction=0.1"]), seed=0)
    assert (len(train), len(evals)) == (18, 2)
    assert set(train["completion"]) | set(evals["completion"]) == {f" a{i}" for i in range(20)}


def test_user_preferences_and_saved_dataset_dir(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 10
    Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}).save_to_disk(str(tmp_path / "prefs"))
    train, evals = preference_splits(
        compose([f"reward.dataset={tmp_path / 'prefs'}", "task.eval_fraction=0.2"]), 0
    )
    assert (len(train), len(evals)) == (8, 2) and train[0]["chosen"] == " good"
    # implicit-prompt format (TRL standard): chosen/rejected only
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps({"chosen": "p good", "rejected": "p bad"}) + "\n" for _ in range(10)))
    train, _ = preference_splits(compose([f"reward.dataset={path}"]), 0)
    assert train.column_names == ["chosen", "rejected"]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"sft.dataset=.*nope.jsonl: no such file"):
        sft_splits(compose([f"sft.dataset={tmp_path / 'nope.jsonl'}"]), 0)
    with pytest.raises(ValueError, match="no such file"):
        check_dataset_spec("./missing_dir/data.parquet", "reward.dataset")
    check_dataset_spec("org/some-hub-dataset", "sft.dataset")  # hub ids are not paths
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "good"}) + "\n")
    with pytest.raises(ValueError, match="needs columns prompt/chosen/rejected; missing rejected"):
        preference_splits(compose([f"reward.dataset={bad}"]), 0)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="match no SFT format"):
        sft_splits(compose([f"sft.dataset={odd}"]), 0)
    with pytest.raises(ValueError, match="eval_fraction"):
        sft_splits(compose(["task.eval_fraction=1.5"]), 0)


def test_join_spacing():
    assert join_spacing({"prompt": "a b", "completion": "c"}, ("completion",))["completion"] == " c"
    assert join_spacing({"prompt": "a b ", "completion": "c"}, ("completion",))["completion"] == "c"
    assert join_spacing({"prompt": "a", "completion": " c"}, ("completion",))["completion"] == " c"
