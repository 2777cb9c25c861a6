"""Stage keys: which settings change which stage's key, chained through the stages each one reads."""

from __future__ import annotations

import pytest

from rlhf.cli import compose
from rlhf.run.stage_keys import PROJECT_ROOT, SOURCE_DIRS, changes, code_source, fingerprint, stage_keys

ALL = ("base", "sft", "reward", "ppo", "evaluate")


def changed(overrides: list[str], base: list[str] | None = None) -> set[str]:
    """The stages whose key differs between `base` and `base + overrides`."""
    before = stage_keys(compose(base or []))
    after = stage_keys(compose([*(base or []), *overrides]))
    return {name for name in ALL if before[name].key != after[name].key}


def test_the_same_config_gives_the_same_keys():
    a, b = stage_keys(compose(["seed=3"])), stage_keys(compose(["seed=3"]))
    assert {n: k.key for n, k in a.items()} == {n: k.key for n, k in b.items()}
    assert all(len(k.key) == 16 for k in a.values()) and len({k.key for k in a.values()}) == 5


@pytest.mark.parametrize(
    "override",
    [
        "logger=none",
        "logger.project=other",
        "num_threads=2",
        "stages=[sft]",
        "sft.logging_steps=1",
        "reward.logging_steps=1",
        "ppo.log_every=5",
        "ppo.samples_every=1",
        "ppo.save_every=1",
        "ppo.resume=false",
        "ppo.critic_process=true",  # a checkpoint of either resumes in the other (tests/ppo/test_critic_process.py)
    ],
)
def test_logging_and_cadence_settings_change_no_key(override):
    assert changed([override]) == set()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=1", set(ALL)),
        ("model.hidden_size=32", set(ALL)),
        ("task=arithmetic", set(ALL)),
        ("model.dtype=bfloat16", {"sft", "reward", "ppo", "evaluate"}),  # not the base model's weights
        ("sft.learning_rate=0.01", {"sft", "reward", "ppo", "evaluate"}),
        ("task.num_demonstrations=10", {"sft", "reward", "ppo", "evaluate"}),
        ("task.num_preferences=10", {"reward", "ppo", "evaluate"}),
        ("reward.learning_rate=0.01", {"reward", "ppo", "evaluate"}),
        ("ppo.kl_coef=0.1", {"ppo", "evaluate"}),
        ("ppo.total_episodes=128", {"ppo", "evaluate"}),  # another learning-rate schedule
        ("evaluate.num_prompts=8", {"evaluate"}),
    ],
)
def test_a_setting_changes_its_stage_and_every_stage_that_reads_it(override, expected):
    assert changed([override]) == expected


def test_a_stage_given_a_path_no_longer_depends_on_the_stage_it_replaces(tmp_path):
    paths = [f"ppo.policy_path={tmp_path / 'policy'}", f"ppo.reward_model_path={tmp_path / 'rm'}"]
    assert changed(["sft.learning_rate=0.01"], base=paths) == {"sft", "reward"}
    assert changed(["reward.init_from=/some/model"]) == {"reward", "ppo", "evaluate"}


def test_local_files_enter_by_content(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"text": "a"}\n')
    before = stage_keys(compose([f"sft.dataset={data}"]))
    data.write_text('{"text": "b"}\n')
    after = stage_keys(compose([f"sft.dataset={data}"]))
    assert before["sft"].key != after["sft"].key and before["base"].key == after["base"].key
    assert fingerprint(str(data)).startswith(f"{data} sha256:")
    assert fingerprint("org/hub-model") == "org/hub-model"


def test_changes_name_what_differs():
    assert changes({"seed": 0, "a": 1}, {"seed": 1, "a": 1}) == "seed 0 -> 1"
    assert changes({}, {"b": 2}) == "b (unset) -> 2"
    assert changes({f"k{i}": 0 for i in range(5)}, {f"k{i}": 1 for i in range(5)}).endswith("2 more")


# ------------------------------------------------------------------------------- code and data outside this package

USER_ENV = """\
import gymnasium

from envs.base import TextEnv
from keys_env_pkg.words import WORDS


class EchoEnv(TextEnv):
    charset = "abcdefghijklmnopqrstuvwxyz "
    max_action_length = 16
    max_observation_length = 16

    def _reset(self, options):
        self._word = WORDS[self.np_random.integers(len(WORDS))]
        return self._word, {}

    def _step(self, action):
        return "", float(action == self._word), True, {}

    @classmethod
    def vocabulary(cls):
        return WORDS


gymnasium.register("KeysEcho-v0", entry_point="keys_env_pkg.echo:EchoEnv")
"""

USER_PACKAGES = {
    "keys_env_pkg/__init__.py": "",
    "keys_env_pkg/echo.py": USER_ENV,
    "keys_env_pkg/words.py": 'WORDS = ["apple", "river"]\n',
    "keys_rubric_pkg/__init__.py": "",
    "keys_rubric_pkg/score.py": "def bonus(prompt, completion, info):\n    return 1.0\n",
    "keys_adapter_pkg/__init__.py": "",
    "keys_adapter_pkg/rg.py": (
        "import gymnasium\n"
        "from envs.reasoning_gym import ReasoningGymEnv\n\n\n"
        "class MyReasoning(ReasoningGymEnv):\n    pass\n\n\n"
        'gymnasium.register("KeysReasoning-v0", entry_point="keys_adapter_pkg.rg:MyReasoning")\n'
    ),
}
USER_ENV_ID = "task.env_id=keys_env_pkg.echo:KeysEcho-v0"
RUBRIC = ['+task.rubric={bonus:{kind:function,function:"keys_rubric_pkg.score:bonus"}}']


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A user's environment package, a rubric package and an adapter subclass written to tmp_path, importable."""
    import sys

    import gymnasium

    for relative, source in USER_PACKAGES.items():
        (tmp_path / relative).parent.mkdir(exist_ok=True)
        (tmp_path / relative).write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0].startswith("keys_")]:
        del sys.modules[name]
    for env_id in ("KeysEcho-v0", "KeysReasoning-v0"):
        gymnasium.registry.pop(env_id, None)


def keys_before_and_after(overrides: list[str], edit) -> tuple[dict, dict]:
    before = stage_keys(compose(overrides))
    edit()
    return before, stage_keys(compose(overrides))


def differ(before: dict, after: dict) -> set[str]:
    return {name for name in ALL if before[name].key != after[name].key}


@pytest.mark.parametrize("edited", ["keys_env_pkg/echo.py", "keys_env_pkg/words.py"])
def test_editing_the_users_environment_package_changes_every_key_and_says_so(user_code, edited):
    path = user_code / edited
    before, after = keys_before_and_after([USER_ENV_ID], lambda: path.write_text(path.read_text() + "# v2\n"))
    assert differ(before, after) == set(
        ALL
    )  # the tiny tokenizer, the offline data and the episodes all read it
    why = changes(before["sft"].config, after["sft"].config)
    assert why.startswith("task.env_id.source keys_env_pkg sha256:") and " -> keys_env_pkg sha256:" in why
    assert "," not in why  # nothing else changed
    unchanged = stage_keys(compose([USER_ENV_ID]))
    assert {n: k.key for n, k in unchanged.items()} == {n: k.key for n, k in after.items()}  # stable


def test_files_beside_the_package_and_bytecode_change_no_key(user_code):
    def edit():
        (user_code / "notes.py").write_text("x = 1\n")  # another top-level module: not the env's package
        (user_code / "keys_env_pkg" / "__pycache__").mkdir()
        (user_code / "keys_env_pkg" / "__pycache__" / "echo.py").write_text("stale")

    assert differ(*keys_before_and_after([USER_ENV_ID], edit)) == set()


def test_editing_a_rubric_function_changes_only_ppo_and_evaluate(user_code):
    path = user_code / "keys_rubric_pkg" / "score.py"
    before, after = keys_before_and_after(
        [USER_ENV_ID, *RUBRIC], lambda: path.write_text(path.read_text().replace("1.0", "2.0"))
    )
    assert differ(before, after) == {"ppo", "evaluate"}
    assert changes(before["ppo"].config, after["ppo"].config).startswith(
        "task.rubric.bonus.function.source keys_rubric_pkg sha256:"
    )


def test_a_file_named_in_env_kwargs_enters_by_content(user_code):
    data = user_code / "words.txt"
    data.write_text("apple\n")
    before, after = keys_before_and_after(
        [USER_ENV_ID, f"+task.env_kwargs.words_file={data}"], lambda: data.write_text("river\n")
    )
    assert differ(before, after) == set(ALL)
    assert changes(before["sft"].config, after["sft"].config).startswith(
        f"task.env_kwargs.words_file {data} sha256:"
    )


def test_an_adapters_key_holds_its_librarys_version(user_code):
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = f"reasoning-gym=={version('reasoning-gym')}"
    except PackageNotFoundError:
        expected = "reasoning-gym==not installed"
    builtin = stage_keys(compose(["task=reasoning_gym"]))
    assert builtin["sft"].config["task.env_id.library"] == expected
    assert "task.env_id.source" not in builtin["sft"].config  # this package's code: in its version already
    subclass = stage_keys(compose(["task=reasoning_gym", "task.env_id=keys_adapter_pkg.rg:KeysReasoning-v0"]))
    assert subclass["ppo"].config["task.env_id.library"] == expected
    assert subclass["ppo"].config["task.env_id.source"].startswith("keys_adapter_pkg sha256:")
    assert "task.env_id.library" not in stage_keys(compose([]))["sft"].config


def test_the_package_version_hashes_this_projects_source():
    """Every stage key holds a hash of rlhf/, envs/ and conf/: they must be found where the package lies."""
    for d in SOURCE_DIRS:
        assert (PROJECT_ROOT / d).is_dir(), d
    assert (PROJECT_ROOT / "rlhf" / "run" / "stage_keys.py").exists()


def test_installed_third_party_code_enters_by_its_version():
    import numpy

    assert code_source(["numpy.linalg"]) == f"numpy=={numpy.__version__}"
    assert code_source(["rlhf.rewards.components", "envs.review"]) is None  # this package's own code
    assert code_source(["no_such_package_here.module"]) is None


def test_a_hub_model_id_enters_with_its_cached_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    overrides = ["model.kind=hf", "model.name_or_path=some-org/some-model"]
    assert stage_keys(compose(overrides))["base"].config["model.name_or_path"] == "some-org/some-model"
    ref = tmp_path / "models--some-org--some-model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    first = stage_keys(compose(overrides))
    assert first["base"].config["model.name_or_path"] == f"some-org/some-model rev:{'a' * 40}"
    ref.write_text("b" * 40)  # a new snapshot of the same id was downloaded
    assert differ(first, stage_keys(compose(overrides))) == set(ALL)


@pytest.fixture
def readme_echo(tmp_path, monkeypatch):
    """The README's `my_pkg/echo.py` (Echo-v0) written to tmp_path and importable (then forgotten)."""
    import sys

    import gymnasium

    from tests.envs.test_env_custom import ECHO_SOURCE

    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").touch()
    (tmp_path / "my_pkg" / "echo.py").write_text(ECHO_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "my_pkg" / "echo.py"
    for name in [m for m in sys.modules if m.split(".")[0] == "my_pkg"]:
        del sys.modules[name]
    gymnasium.registry.pop("Echo-v0", None)


def test_a_run_after_the_users_environment_changed_reruns_and_says_why(readme_echo, tmp_path, caplog):
    """The README's Echo example, run, its reward changed, the same command again in the same run directory: the
    stage reruns (it was reused before keys saw the user's code), the log line names the change, and the stage cache
    shared with it holds an entry per version of the code."""
    import logging

    from rlhf.run.pipeline import run
    from tests.helpers import TINY

    caplog.set_level(logging.INFO, logger="rlhf")
    overrides = [*TINY, "logger=none", "stages=[sft]", "task.env_id=my_pkg.echo:Echo-v0"]
    cfg = [*overrides, f"cache_dir={tmp_path / 'cache'}"]
    first = run(compose(cfg), run_dir=tmp_path / "run")["stages"]["sft"]
    original = readme_echo.read_text()
    readme_echo.write_text(original.replace("0.5 if prompt in words", "0.25 if prompt in words"))
    caplog.clear()
    second = run(compose(cfg), run_dir=tmp_path / "run")["stages"]["sft"]
    assert second["key"] != first["key"] and not second["cached"]
    assert "reusing it" not in caplog.text and "reused from the stage cache" not in caplog.text
    line = next(m for m in caplog.messages if m.startswith("sft: its finished output no longer matches"))
    assert "(task.env_id.source my_pkg sha256:" in line and " -> my_pkg sha256:" in line, line
    assert any(m.startswith("base: ") and "task.env_id.source my_pkg" in m for m in caplog.messages)

    # the cache follows the same keys: the old code's entry is found again for the old code only
    readme_echo.write_text(original)
    again = run(compose(cfg), run_dir=tmp_path / "other")["stages"]["sft"]
    assert again["cached"] and again["key"] == first["key"] and again["cache_entry"] == first["cache_entry"]
