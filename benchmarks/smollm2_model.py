"""SmolLM2-135M-Instruct as the real-model benchmarks load it: its directory, the LoRA of conf/model/smollm2.yaml,
the policy in float32 (with or without LoRA), and chat-template prompts of the review task."""

from __future__ import annotations

from pathlib import Path

from measure import ROOT

ENV_ID = "rlhf/Review-v1"


def default_model() -> Path:
    """models/SmolLM2-135M-Instruct (`make smollm2`, rlhf/models/pretrained.py)."""
    from rlhf.models.pretrained import RECIPES

    return ROOT / RECIPES["smollm2"].default_out


def smollm2_lora():
    """The LoRA settings of conf/model/smollm2.yaml as `rlhf.models.config.LoraConfig` (read, so they stay in sync)."""
    from omegaconf import OmegaConf

    from rlhf.models.config import LoraConfig

    lora = OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml").model.lora
    return LoraConfig(r=lora.r, alpha=lora.alpha, target_modules=list(lora.target_modules))


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_policy(path: Path, lora: bool):
    """The model in `path` in float32, with conf/model/smollm2.yaml's LoRA adapters when `lora`."""
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.lora import apply_lora

    model = load_causal_lm(path, "float32")
    return apply_lora(model, smollm2_lora()) if lora else model


def review_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat-template prompts (user turn + generation prompt) of the review task, as the rollout builds them."""
    import envs
    from rlhf.models.chat_format import ChatFormat

    env = envs.make(ENV_ID)
    fmt = ChatFormat(tokenizer)
    return [fmt.prompt_ids(env.reset(seed=10_000 + i)[0]) for i in range(n)]
