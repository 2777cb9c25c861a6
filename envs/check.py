"""Check text environments: `python -m envs.check [ENV_ID ...]` (no ids: every registered `rlhf/*` id).

For each id: Gymnasium's `check_env` on the unwrapped environment (its warnings count as failures),
then text checks: Text spaces with min_length=0 and " " in the charset; the same seed gives the
same episode (twice on one instance and once on a fresh one, for a random-character policy, a
random-vocabulary-word policy and the scripted reference policy when there is one); rewards are
finite floats and episodes end within `max_turns`; an action with a character outside the charset
and an over-long action are refused with a ValueError naming the id; a TextEnv's vocabulary covers
its observations and offline data, which are deterministic for a seed.

Prints one line per id, `PASS <id>` or `FAIL <id>: <reason>`, and exits 1 if any id failed.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env, data_equivalence

import envs
from envs.base import TextEnv

__all__ = ["CheckFailure", "check", "main"]

Policy = Callable[[gymnasium.Env, np.random.Generator], str]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOT_IN_MOST_CHARSETS = "#~^`\\|\x00\u20ac\n\t"


class CheckFailure(Exception):
    """A broken constraint, with the message printed after `FAIL <id>:`."""


def check(env_id: str) -> None:
    """Raise CheckFailure (or the environment's own exception) unless `env_id` passes every check."""
    env = _make(env_id)
    try:
        _check_spaces(env)
        _check_episodes(env_id, env)
        _check_gymnasium(env)
        _check_refusals(env)
        if isinstance(env, TextEnv):
            _check_offline_data(env)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m envs.check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "env_ids", nargs="*", help="ids to check, e.g. rlhf/Review-v0 or my_pkg.module:MyEnv-v0"
    )
    args = parser.parse_args(argv)
    ids = args.env_ids or sorted(
        {*envs.BUILTIN_IDS, *(i for i in gymnasium.registry if i.startswith("rlhf/"))}
    )
    failed = 0
    for env_id in ids:
        try:
            check(env_id)
        except Exception as e:  # every failure becomes one verdict line
            failed += 1
            reason = str(e) if isinstance(e, CheckFailure) else f"{type(e).__name__}: {e}"
            print(f"FAIL {env_id}: {_one_line(reason)}", flush=True)
        else:
            print(f"PASS {env_id}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------- the checks
def _make(env_id: str) -> gymnasium.Env:
    try:
        return gymnasium.make(env_id, disable_env_checker=True).unwrapped
    except Exception as e:
        raise CheckFailure(f"cannot make the environment: {type(e).__name__}: {e}") from e


def _check_spaces(env: gymnasium.Env) -> None:
    for name in ("observation_space", "action_space"):
        space = getattr(env, name, None)
        if not isinstance(space, spaces.Text):
            raise CheckFailure(f"{name} is {space!r}, expected gymnasium.spaces.Text")
        if space.min_length != 0:
            raise CheckFailure(f"{name} has min_length={space.min_length}; text spaces need min_length=0")
        if " " not in space.character_set:
            raise CheckFailure(f"{name} charset lacks ' '; replies are words separated by spaces")


def _check_episodes(env_id: str, env: gymnasium.Env) -> None:
    fresh = _make(env_id)
    try:
        for name, policy in _policies(env).items():
            for seed in (0, 1, 2):
                first = _rollout(env, seed, policy, name)
                again = _rollout(env, seed, policy, name)
                other = _rollout(fresh, seed, policy, name)
                for label, trace in (("a second time", again), ("on a fresh instance", other)):
                    diff = _first_difference(first, trace)
                    if diff:
                        raise CheckFailure(
                            f"not deterministic: reset(seed={seed}) with the {name} policy gave a different "
                            f"episode {label}: {diff}"
                        )
    finally:
        fresh.close()


def _check_gymnasium(env: gymnasium.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check_env(env, skip_render_check=True)
        except Exception as e:
            raise CheckFailure(f"gymnasium check_env: {type(e).__name__}: {e}") from e
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            continue
        raise CheckFailure(f"gymnasium check_env warned: {_ANSI.sub('', str(w.message))}")


def _check_refusals(env: gymnasium.Env) -> None:
    space: spaces.Text = env.action_space  # type: ignore[assignment]
    env_id = env.spec.id if env.spec is not None else type(env).__name__
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
                raise CheckFailure(
                    f"the {kind} action was refused, but the error does not name {env_id!r}: {e}"
                ) from e
        except Exception as e:
            raise CheckFailure(
                f"the {kind} action raised {type(e).__name__} ({e}), expected a ValueError"
            ) from e
        else:
            raise CheckFailure(
                f"an {kind} action ({len(action)} characters: {action[:20]!r}...) was accepted"
            )
        # a refused reply must leave the episode usable
        _step_checked(env, space.sample()[: space.max_length], "after a refused action")


def _check_offline_data(env: TextEnv) -> None:
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
        trace = _rollout(env, seed, _policies(env)["random-word"], "random-word")
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


def _rollout(env: gymnasium.Env, seed: int, policy: Policy, name: str) -> list[tuple[Any, ...]]:
    """One episode: [(None, obs, info), (action, obs, reward, terminated, truncated, info), ...]."""
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    _check_observation(env, obs, f"reset(seed={seed})")
    trace: list[tuple[Any, ...]] = [(None, obs, info)]
    limit = getattr(env.unwrapped, "max_turns", 100)
    for turn in range(1, limit + 1):
        action = policy(env, rng)
        obs, reward, terminated, truncated, info = _step_checked(
            env, action, f"turn {turn} after reset(seed={seed}) with the {name} policy"
        )
        trace.append((action, obs, reward, terminated, truncated, info))
        if terminated or truncated:
            return trace
    raise CheckFailure(f"episode (seed={seed}, {name} policy) did not end within {limit} steps (max_turns)")


def _step_checked(env: gymnasium.Env, action: str, where: str) -> tuple[Any, ...]:
    result = env.step(action)
    if not (isinstance(result, tuple) and len(result) == 5):
        raise CheckFailure(
            f"step() must return (obs, reward, terminated, truncated, info); got {result!r} at {where}"
        )
    obs, reward, terminated, truncated, info = result
    _check_observation(env, obs, where)
    if not isinstance(reward, float) or not math.isfinite(reward):
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


def _check_observation(env: gymnasium.Env, obs: Any, where: str) -> None:
    if not isinstance(obs, str) or obs not in env.observation_space:
        raise CheckFailure(
            f"observation {obs!r} at {where} is not in the observation space {env.observation_space}"
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
