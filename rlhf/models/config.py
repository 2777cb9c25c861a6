"""The `model` group's schema: which model every stage starts from, its precision and its LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.common.fields import one_of

DEVICES = ("auto", "cpu", "cuda")
"""`device`'s values: auto (cuda when visible, else cpu) | cpu | cuda."""


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains all weights."""
    alpha: int = 16
    """LoRA scaling numerator (`lora_alpha`)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names that get adapters."""


@dataclass
class ModelConfig:
    kind: str = one_of("tiny", "tiny", "hf")
    """tiny (built from the sizes below and the task's vocabulary) | hf (`name_or_path`, which it requires)."""
    name_or_path: str | None = None
    """Hub id or local directory of a causal LM and its tokenizer; unset builds a tiny model from config."""
    hidden_size: int = 64
    """Tiny model: width."""
    num_layers: int = 2
    """Tiny model: transformer blocks."""
    num_heads: int = 4
    """Tiny model: attention heads."""
    intermediate_size: int = 256
    """Tiny model: MLP width."""
    max_position_embeddings: int = 256
    """Tiny model: longest sequence in tokens."""
    tokenizer: str = one_of("word", "word", "bpe")
    """Tiny model: word (one token per word of the task's vocabulary) | bpe (byte-level BPE trained on the task's
    text, with BOS, pad = eos and a ChatML chat template, as real models have)."""
    dtype: str = one_of("float32", "auto", "float32", "bfloat16", "float16")
    """Training precision: auto (bfloat16 where the device multiplies it natively: a CUDA GPU with bf16, a CPU with
    AMX or AVX512-BF16; float32 elsewhere) | float32 | bfloat16 | float16 (mixed precision: master weights stay
    float32). A run directory keeps what auto chose on its first run; summary.json records it under `precision`."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Parameter-efficient fine-tuning; off when `lora.r=0`."""
