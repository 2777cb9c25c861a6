"""Fixtures of the rollout and trainer tests: the toy vocabulary's tokenizer and a fresh accelerate state."""

from __future__ import annotations

import pytest

from rlhf.models.tokenizer import build_tokenizer
from tests.helpers import WORDS


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: reset it around a test that picks its own mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
