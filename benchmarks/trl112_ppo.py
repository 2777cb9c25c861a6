"""The peer side of benchmarks/ppo_vs_trl.py: trl 1.12.0's PPOTrainer on the same tiny setup as ours.

Runs in benchmarks/.venv-trl112 (made by benchmarks/setup_peer.sh), so it imports nothing from rlhf/ or envs/ (only
benchmarks/measure.py, which needs nothing but the standard library): the word-level tokenizer is rebuilt here with the recipe of rlhf/models/tokenizer.py (ids 0-2 = <pad>, <unk>, </s>, then
the words; left padding), and every model is built from the LlamaConfig json that ppo_vs_trl.py writes. Policy and
reference are LlamaForCausalLM, value and reward model LlamaForSequenceClassification (num_labels=1), all fresh
from torch's RNG: throughput does not depend on the weights. Prints one JSON line (the last line of stdout).

    benchmarks/.venv-trl112/bin/python benchmarks/trl112_ppo.py --vocab V.json --model-config C.json \
        --prompts P.jsonl --updates 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import measure

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>")


def build_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """The same tokenizer as rlhf.models.tokenizer.build_tokenizer (chat template aside, unused by single-turn PPO)."""
    words = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary:
        words.setdefault(word, len(words))
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", padding_side="left"
    )


class UpdateClock(TrainerCallback):
    """Wall-clock and process CPU time at the end of every PPO update (PPOTrainer calls on_step_end once per update)."""

    def __init__(self) -> None:
        self.watch = measure.Stopwatch()
        self.times: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append((self.watch.wall_s, self.watch.cpu_s))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", required=True, help="json list of words")
    p.add_argument("--model-config", required=True, help="LlamaConfig json (LlamaConfig.to_json_file)")
    p.add_argument("--prompts", required=True, help='jsonl of {"prompt": str}')
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.updates < 2:
        p.error("--updates must be >= 2: the first update is warm-up and is not timed")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    with open(a.vocab) as f:
        tokenizer = build_tokenizer(json.load(f))
    config = LlamaConfig.from_json_file(a.model_config)
    policy, ref = LlamaForCausalLM(config), LlamaForCausalLM(config)
    head_config = LlamaConfig.from_json_file(a.model_config)
    head_config.num_labels = 1  # pad_token_id is in the config: the score is read at the last real token
    value, reward = (AutoModelForSequenceClassification.from_config(head_config) for _ in range(2))

    with open(a.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    dataset = Dataset.from_dict({"prompt": prompts}).map(
        lambda row: {"input_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]},
        remove_columns=["prompt"],
    )

    output_dir = tempfile.TemporaryDirectory(prefix="trl112_ppo_")  # removed at exit; save_strategy="no"
    args = PPOConfig(
        output_dir=output_dir.name,
        use_cpu=True,
        bf16=False,  # float32 like ours (PPOConfig defaults bf16 on)
        gradient_checkpointing=False,  # PPOConfig defaults it on: slower for a tiny model
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=a.seed,
        # One update = batch_size episodes; 4 epochs x mini_batches minibatches of batch_size/mini_batches.
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=a.mini_batches,
        num_ppo_epochs=4,
        total_episodes=a.updates * a.batch_size,
        local_rollout_forward_batch_size=a.batch_size,
        response_length=a.response_length,
        # The defaults of our PPOConfig (rlhf/config.py) where trl's differ:
        stop_token="eos",
        temperature=1.0,
        learning_rate=1e-4,
        num_sample_generations=0,  # no extra sample generations between updates
    )
    clock = UpdateClock()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        callbacks=[clock],
    )
    total = measure.timed(trainer.train)[0].wall_s
    # Steady state: from the end of the first update (warm-up) to the end of the last.
    (wall0, cpu0), (wall1, cpu1) = clock.times[0], clock.times[-1]
    s_per_update, cpu_s_per_update = (wall1 - wall0) / (a.updates - 1), (cpu1 - cpu0) / (a.updates - 1)
    print(
        json.dumps(
            {
                "side": "trl 1.12.0 PPOTrainer",
                "updates": len(clock.times),
                "batch_size": a.batch_size,
                "episodes_per_s": a.batch_size / s_per_update,
                "s_per_update": s_per_update,
                "cpu_s_per_update": cpu_s_per_update,
                "total_s": total,
                "peak_rss_mb": measure.peak_rss_mib(),
                "threads": torch.get_num_threads(),
                "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
            }
        )
    )


if __name__ == "__main__":
    main()
