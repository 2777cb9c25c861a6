"""Check text environments: `python -m envs.check [ENV_ID ...] [-k KEY=VALUE ...]`.

No ids: the built-in ids, the adapters whose library is installed and that need no data (the others print
`SKIP`) and any other registered `rlhf/*` id. `-k KEY=VALUE` (repeatable; the value is read as YAML) passes keyword arguments to
`gymnasium.make`, e.g. `python -m envs.check rlhf/ReasoningGym-v0 -k dataset=basic_arithmetic`.

Any `gymnasium.Env[str, str]` can pass. What breaks training fails the check: spaces that are not
`spaces.Text`; the same seed giving another episode (twice on one instance and once on a fresh one, for a
random-character policy, a random-vocabulary-word policy and the scripted reference policy when there is one);
a reward that is not a finite number; observations that are not str, step results of the wrong shape or types;
an exception from reset or step on a valid action; an episode that does not end within `max_turns`; a TextEnv
whose vocabulary does not cover its observations and offline data, or whose data differ for one seed.
What the trainer copes with is a warning (`WARN <id>: ...`): an environment that accepts an over-long action or
one with a character outside its charset (the trainer fits replies into the action space itself), a refusal that
is not a ValueError naming the id, min_length > 0, a charset without " ", an observation outside the
observation space, a multi-turn episode without `max_turns`, a warning of Gymnasium's `check_env`.

Prints the warnings of each id, then `PASS <id>` or `FAIL <id>: <reason>`; exits 1 if any id failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import numbers
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
import yaml
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env, data_equivalence

import envs
from envs.base import TextEnv, id_of

__all__ = ["CheckFailure", "check", "main"]

Policy = Callable[[gymnasium.Env, np.random.Generator], str]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOT_IN_MOST_CHARSETS = "#~^`\\|\x00\u20ac\n\t"


class CheckFailure(Exception):
    """A broken constraint, with the message printed after `FAIL <id>:`."""


class Warnings(list):
    """What an environment does not validate or declare, but training copes with; each message once."""

    def add(self, message: str) -> None:
        if message not in self:
            self.append(message)


def check(env_id: str, warn: Warnings | None = None, **kwargs: Any) -> Warnings:
    """Raise CheckFailure (or the environment's own exception) unless `env_id` passes every check.

    `kwargs` go to `gymnasium.make`. Returns the warnings (also collected into `warn` as they come).
    """
    warn = Warnings() if warn is None else warn
    env = _make(env_id, kwargs)
    try:
        _check_spaces(env, warn)
        _check_episodes(env_id, env, kwargs, warn)
        _check_gymnasium(env, warn)
        _check_refusals(env, warn)
        if isinstance(env, TextEnv):
            _check_offline_data(env, warn)
    finally:
        env.close()
    return warn


NEEDS_DATA = {"rlhf/SkyRL-v0": "needs its rows: -k data=<.jsonl file of SkyRL rows> -k env=<skyrl-gym id>"}
"""Adapters that cannot be made without keyword arguments: checked only when named."""


def default_ids() -> tuple[list[str], dict[str, str]]:
    """(ids to check, {adapter id: why it is skipped} for adapters whose library is missing or that need data)."""
    skipped = {
        i: f'pip install -c constraints.txt -e ".[{extra}]"'
        for i, extra in envs.ADAPTER_IDS.items()
        if importlib.util.find_spec(extra.replace("-", "_")) is None
    }
    skipped = {**NEEDS_DATA, **skipped}
    registered = (i for i in gymnasium.registry if i.startswith("rlhf/"))
    return sorted({*envs.BUILTIN_IDS, *envs.ADAPTER_IDS, *registered} - set(skipped)), skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m envs.check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "env_ids", nargs="*", help="ids to check, e.g. rlhf/Review-v0 or my_pkg.module:MyEnv-v0"
    )
    parser.add_argument(
        "-k",
        "--kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of gymnasium.make for every id (repeatable; VALUE is read as YAML)",
    )
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.kwarg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"-k {item!r}: expected KEY=VALUE")
        kwargs[key] = yaml.safe_load(value)
    ids, skipped = (args.env_ids, {}) if args.env_ids else default_ids()
    for env_id, why in skipped.items():
        print(f"SKIP {env_id}: {why}", flush=True)
    failed = 0
    for env_id in ids:
        warn = Warnings()
        try:
            check(env_id, warn, **kwargs)
        except Exception as e:  # every failure becomes one verdict line
            failed += 1
            reason = str(e) if isinstance(e, CheckFailure) else f"{type(e).__name__}: {e}"
            verdict = f"FAIL {env_id}: {_one_line(reason)}"
        else:
            verdict = f"PASS {env_id}"
        for message in warn:
            print(f"WARN {env_id}: {_one_line(message)}", flush=True)
        print(verdict, flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------- the checks
def _make(env_id: str, kwargs: dict[str, Any]) -> gymnasium.Env:
    try:
        return gymnasium.make(env_id, disable_env_checker=True, **kwargs).unwrapped
    except Exception as e:
        raise CheckFailure(f"cannot make the environment: {type(e).__name__}: {e}") from e


def _check_spaces(env: gymnasium.Env, warn: Warnings) -> None:
    for name in ("observation_space", "action_space"):
        space = getattr(env, name, None)
        if not isinstance(space, spaces.Text):
            raise CheckFailure(f"{name} is {space!r}, expected gymnasium.spaces.Text")
        if space.min_length != 0:
            warn.add(
                f"{name} has min_length={space.min_length}: an empty text (a reply that ends at once) is outside "
                "it; pass min_length=0"
            )
        if " " not in space.character_set:
            warn.add(f"{name} charset lacks ' ': the trainer drops the spaces between the policy's words")


def _check_episodes(env_id: str, env: gymnasium.Env, kwargs: dict[str, Any], warn: Warnings) -> None:
    fresh = _make(env_id, kwargs)
    try:
        for name, policy in _policies(env).items():
            for seed in (0, 1, 2):
                first = _rollout(env, seed, policy, name, warn)
                again = _rollout(env, seed, policy, name, warn)
                other = _rollout(fresh, seed, policy, name, warn)
                for label, trace in (("a second time", again), ("on a fresh instance", other)):
                    diff = _first_difference(first, trace)
                    if diff:
                        raise CheckFailure(
                            f"not deterministic: reset(seed={seed}) with the {name} policy gave a different "
                            f"episode {label}: {diff}"
                        )
    finally:
        fresh.close()


def _check_gymnasium(env: gymnasium.Env, warn: Warnings) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_env(env, skip_render_check=True)
        except Exception as e:
            raise CheckFailure(f"gymnasium check_env: {type(e).__name__}: {e}") from e
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            continue
        warn.add(f"gymnasium check_env warned: {_ANSI.sub('', str(w.message))}")


def _check_refusals(env: gymnasium.Env, warn: Warnings) -> None:
    """Bad actions (over-long, outside the charset) should be refused with a ValueError naming the id; the trainer
    never sends them (it fits replies into the action space), so an environment that accepts them only warns."""
    space: spaces.Text = env.action_space  # type: ignore[assignment]
    env_id = id_of(env)
    outside = next((c for c in _NOT_IN_MOST_CHARSETS if c not in space.character_set), None)
    filler = next(c for c in space.characters if c != " ") if len(space.characters) > 1 else " "
    bad_actions = {"over-long": filler * (space.max_length + 1)}
    if outside is not None:
        bad_actions["outside-charset"] = filler + outside
    for kind, action in bad_actions.items():
        env.reset(seed=0)
        try:
            env.step(action)
        except ValueError as e:
            if env_id not in str(e):
                warn.add(f"the {kind} action was refused, but the error does not name {env_id!r}: {e}")
        except Exception as e:
            warn.add(f"the {kind} action raised {type(e).__name__} ({e}), expected a ValueError")
        else:
            warn.add(
                f"an {kind} action ({len(action)} characters: {action[:20]!r}...) was accepted; the trainer "
                "fits its replies into the action space, other callers get no error"
            )
            continue
        # a refused reply must leave the episode usable
        _step_checked(env, space.sample()[: space.max_length], "after a refused action", warn)


def _check_offline_data(env: TextEnv, warn: Warnings) -> None:
    cls = type(env)
    try:
        vocabulary = set(cls.vocabulary())
    except NotImplementedError:
        return
    if not vocabulary:
        raise CheckFailure("vocabulary() is empty")
    outside = sorted(w for w in vocabulary if not env._charset_set.issuperset(w) or not w or " " in w)
    if outside:
        raise CheckFailure(
            f"vocabulary words that are empty, hold a space or leave the charset: {outside[:5]}"
        )
    seen: set[str] = set()
    for seed in (0, 1, 2):
        trace = _rollout(env, seed, _policies(env)["random-word"], "random-word", warn)
        seen.update(w for step in trace for w in step[1].split())
    missing = sorted(seen - vocabulary)
    if missing:
        raise CheckFailure(f"observations use words missing from vocabulary(): {missing[:5]}")
    for name in ("demonstrations", "preferences"):
        try:
            data = getattr(cls, name)(8, 0)
        except NotImplementedError:
            continue
        if data != getattr(cls, name)(8, 0):
            raise CheckFailure(f"{name}(8, seed=0) differs between two calls; draw from a seeded generator")
        missing = sorted({w for row in data for text in _texts(row) for w in text.split()} - vocabulary)
        if missing:
            raise CheckFailure(f"{name} use words missing from vocabulary(): {missing[:5]}")


# ---------------------------------------------------------------------- helpers
def _policies(env: gymnasium.Env) -> dict[str, Policy]:
    space: spaces.Text = env.action_space  # type: ignore[assignment]

    def random_characters(env: gymnasium.Env, rng: np.random.Generator) -> str:
        length = int(rng.integers(0, min(space.max_length, 40) + 1))
        return "".join(rng.choice(list(space.characters), size=length))

    policies: dict[str, Policy] = {"random-character": random_characters}
    unwrapped = env.unwrapped
    if isinstance(unwrapped, TextEnv):
        try:
            vocabulary = [w for w in type(unwrapped).vocabulary() if unwrapped._charset_set.issuperset(w)]
        except NotImplementedError:
            vocabulary = []
        if vocabulary:

            def random_words(env: gymnasium.Env, rng: np.random.Generator) -> str:
                picked = rng.choice(vocabulary, size=int(rng.integers(1, 4)))
                return " ".join(picked)[: space.max_length]

            policies["random-word"] = random_words
        if type(unwrapped).reference_action is not TextEnv.reference_action:
            policies["reference"] = lambda env, rng: env.unwrapped.reference_action()
    return policies


def _rollout(
    env: gymnasium.Env, seed: int, policy: Policy, name: str, warn: Warnings
) -> list[tuple[Any, ...]]:
    """One episode: [(None, obs, info), (action, obs, reward, terminated, truncated, info), ...]."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    _check_observation(env, obs, f"reset(seed={seed})", warn)
    trace: list[tuple[Any, ...]] = [(None, obs, info)]
    declared = getattr(env.unwrapped, "max_turns", None)
    limit = declared or 100
    for turn in range(1, limit + 1):
        action = policy(env, rng)
        obs, reward, terminated, truncated, info = _step_checked(
            env, action, f"turn {turn} after reset(seed={seed}) with the {name} policy", warn
        )
        trace.append((action, obs, reward, terminated, truncated, info))
        if terminated or truncated:
            return trace
        if declared is None:
            warn.add(
                "an episode went on after the first reply, but the environment has no `max_turns` attribute: "
                "the trainer ends every episode after one reply; set max_turns to the most replies per episode"
            )
    raise CheckFailure(f"episode (seed={seed}, {name} policy) did not end within {limit} steps (max_turns)")


def _step_checked(env: gymnasium.Env, action: str, where: str, warn: Warnings) -> tuple[Any, ...]:
    result = env.step(action)
    if not (isinstance(result, tuple) and len(result) == 5):
        raise CheckFailure(
            f"step() must return (obs, reward, terminated, truncated, info); got {result!r} at {where}"
        )
    obs, reward, terminated, truncated, info = result
    _check_observation(env, obs, where, warn)
    if not isinstance(reward, numbers.Real) or isinstance(reward, bool) or not math.isfinite(reward):
        raise CheckFailure(f"reward {reward!r} ({type(reward).__name__}) at {where} is not a finite float")
    if not (isinstance(terminated, bool) and isinstance(truncated, bool)):
        raise CheckFailure(
            f"terminated/truncated must be bools, got {terminated!r}, {truncated!r} at {where}"
        )
    if terminated and truncated:
        raise CheckFailure(f"terminated and truncated are both True at {where}; an episode ends one way")
    if not isinstance(info, dict):
        raise CheckFailure(f"info must be a dict, got {type(info).__name__} at {where}")
    return result


def _check_observation(env: gymnasium.Env, obs: Any, where: str, warn: Warnings) -> None:
    if not isinstance(obs, str):
        raise CheckFailure(f"observation {obs!r} at {where} is a {type(obs).__name__}, expected str")
    if obs not in env.observation_space:
        warn.add(
            f"observation {obs[:40]!r} at {where} is not in the observation space {env.observation_space}"
        )


def _first_difference(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> str:
    """'' when the episodes are equal, else where they first differ."""
    names = ("action", "observation", "reward", "terminated", "truncated", "info")
    for step, (x, y) in enumerate(zip(a, b)):
        fields = names if len(x) == 6 else ("action", "observation", "info")
        for field, u, v in zip(fields, x, y):
            if not data_equivalence(u, v, exact=True):
                return f"step {step} {field} {u!r} vs {v!r}"
    if len(a) != len(b):
        return f"{len(a) - 1} vs {len(b) - 1} steps"
    return ""


def _texts(row: dict[str, Any]) -> list[str]:
    """Every text of a TRL-format row (strings or lists of {"role", "content"} messages)."""
    out = []
    for value in row.values():
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(m["content"] for m in value if isinstance(m, dict) and "content" in m)
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
