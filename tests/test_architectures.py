"""The architecture matrix: every family of `tests/architectures.py`, loaded through the project's loaders.

1. Sampling: the sampler's next-token logits equal the model's own forward over each row's real tokens alone, on a
   left-padded multi-turn batch with finished rows (holes in the cache), kept and repeated rows.
2. Scoring: the forwards that score a batch (the update's, with grad in train mode, and the no-grad ones) give every
   row the log-probabilities it has alone; reward models and the critic score a padded row as they score it alone.
3. PPO: at update 1 of one epoch and one minibatch the policy that sampled is the policy that is scored and the
   reference is the same weights, so the KL and the approximate KL are zero up to float rounding.

Everything in float32; sliding windows of 16 tokens bind (sequences are longer), and the attention implementation is
the one the loaders choose (SDPA through `rlhf.models.attention`, eager for Gemma 2). The CUDA variants run tests 1 and 2 on
a GPU.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.ppo.decoder import HFDecoder, LlamaDecoder, make_decoder
from rlhf.ppo.sampler import KVSampler
from tests.architectures import (
    ARCHITECTURES,
    WINDOW,
    WINDOWED,
    build_bert_reward_model,
    build_causal_lm,
    tiny_tokenizer,
)
from tests.helpers import ppo_config

NAMES = sorted(ARCHITECTURES)
TOLERANCE = 1e-3
"""max |padded - alone| of logits / log-probabilities (float32 rounding is ~1e-6)."""
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU variant runs here)"
        ),
    ),
]
"""The same checks on a GPU: the code path is the same there."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> save_pretrained directory of every architecture (one tokenizer for all), built once."""
    root = tmp_path_factory.mktemp("architectures")
    tokenizer = tiny_tokenizer()
    return {name: build_causal_lm(name, root / name, tokenizer=tokenizer) for name in NAMES}


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A first user turn laid out by the chat template (BOS, ChatML, the generation prompt)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def alone_logits(model, tokens: list[int]) -> torch.Tensor:
    """The model's own logits over one unpadded sequence: (len, V) float32."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens], device=device)).logits[0].float()


def stop_token_for_holes(model, tokenizer, contexts: list[list[int]], steps: int, seed: int) -> int:
    """A stop token at which the replies sampled with `seed` end at different steps (rows that finish early leave
    holes in the cache): the replies are drawn once without a stop token, and the same seed draws them again."""
    s = KVSampler(model, temperature=1.0, stop_token_ids=None, pad_token_id=tokenizer.pad_token_id)
    s.start(contexts)
    torch.manual_seed(seed)
    replies, _ = s.sample(steps)
    for token in dict.fromkeys(t for r in replies for t in r):
        firsts = [r.index(token) if token in r else steps for r in replies]
        if len(set(firsts)) > 1 and min(firsts) < steps - 2:
            return token
    raise AssertionError(f"no token ends the sampled replies at different steps: {replies}")


def check_sampler(model, tokenizer, device: str = "cpu") -> dict[str, float]:
    """Drive a KVSampler through two turns of a ragged batch, comparing with the model alone; returns the max diffs."""
    model.to(device).eval()
    texts = ["go x", "go alpha beta gamma delta x y z alpha beta", "go y z alpha"]
    contexts = [prompt_ids(tokenizer, t) for t in texts]
    assert len({len(c) for c in contexts}) == 3 and max(len(c) for c in contexts) > WINDOW
    stop = stop_token_for_holes(model, tokenizer, contexts, 8, seed=0)
    s = KVSampler(model, temperature=1.0, stop_token_ids={stop}, pad_token_id=tokenizer.pad_token_id)
    diffs = {}
    finished_early = 0

    def compare(what: str, episodes: list[list[int]]) -> None:
        expected = torch.stack([alone_logits(model, e)[-1] for e in episodes])
        diffs[what] = (s.next_logits.float() - expected).abs().max().item()

    s.start(contexts)
    compare("prefill (left padding)", contexts)
    torch.manual_seed(0)  # the draws of `stop_token_for_holes`
    episodes = [list(c) for c in contexts]
    for turn, news in enumerate(
        (["x", "more c d delta gamma c d alpha", " z y"], [" more x y z", "d", " alpha beta"])
    ):
        replies, logprobs = s.sample(8)
        finished_early += len({len(r) for r in replies}) > 1
        worst = 0.0
        for e, r, lp in zip(episodes, replies, logprobs):
            logp = torch.log_softmax(alone_logits(model, e + r)[len(e) - 1 : -1], -1)
            expected = logp.gather(1, torch.tensor(r, device=logp.device)[:, None]).squeeze(1)
            worst = max(worst, (torch.tensor(lp, device=logp.device) - expected).abs().max().item())
        diffs[f"turn {turn} reply log-probs (holes after finished rows)"] = worst
        # new tokens of 1 to ~10 per row, shorter than the window: the holes they right-align stay within it
        blocks = [tokenizer.encode(t, add_special_tokens=False) for t in news]
        s.extend(blocks)
        episodes = [e + r + b for e, r, b in zip(episodes, replies, blocks)]
        compare(f"turn {turn} next turn (right-aligned blocks)", episodes)
        if turn == 0:  # drop a row, repeat another: the rollout keeps live episodes, groups share prompts
            s.keep([2, 1, 1])
            episodes = [episodes[2], episodes[1], episodes[1]]
            compare("kept rows", episodes)
    assert finished_early, "rows must finish at different steps (holes in the cache)"
    assert max(len(e) for e in episodes) > 2 * WINDOW
    return diffs


def engines(name: str) -> list[str]:
    return ["llama", "hf"] if name == "llama" else ["hf"]


@pytest.mark.numerics  # padded against alone: other kernels on other CPUs
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "engine"), [(n, e) for n in NAMES for e in engines(n)])
def test_sampler_logits_equal_the_models_own_forward_alone(saved, monkeypatch, name, engine, device):
    model = load_causal_lm(saved[name])
    tokenizer = load_tokenizer(saved[name])
    assert type(make_decoder(model)) is (
        LlamaDecoder if name == "llama" else HFDecoder
    )  # the sampler's choice
    monkeypatch.setattr("rlhf.ppo.sampler.make_decoder", {"llama": LlamaDecoder, "hf": HFDecoder}[engine])
    diffs = check_sampler(model, tokenizer, device)
    assert max(diffs.values()) < TOLERANCE, diffs


# ---------------------------------------------------------------------------------------------------- 2. scoring


def episode_batch(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Queries (chat prompts) and responses of different lengths, each longer than the sliding window."""
    queries = [prompt_ids(tokenizer, t) for t in ("go x", "go alpha beta gamma delta x y", "go z")]
    responses = [
        tokenizer.encode(t, add_special_tokens=False)
        for t in ("a b c d alpha beta gamma delta", "x", "the quick brown fox jumps over the lazy dog")
    ]
    return queries, responses


def padded(queries, responses, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rollout's layout: queries left-padded, responses right-padded -> ids, mask (B, Q + R) and Q."""
    from rlhf.ppo.rollout import left_pad

    q_ids, q_mask = left_pad(queries, pad_id)
    width = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)], r_mask[i, : len(r)] = torch.tensor(r), 1
    ids, mask = torch.cat([q_ids, r_ids], 1).to(device), torch.cat([q_mask, r_mask], 1).to(device)
    return ids, mask, q_ids.shape[1]


def check_scoring(model, tokenizer, device: str = "cpu") -> dict[str, float]:
    """The scoring forwards of PPO over a padded batch against each row alone: max |diff| of the response tokens'
    log-probabilities, per forward."""
    from rlhf.ppo.rollout import output_head, response_logprobs, sequence_logprobs

    model.to(device)
    queries, responses = episode_batch(tokenizer)
    ids, mask, q = padded(queries, responses, tokenizer.pad_token_id, device)
    real = mask[:, q:].bool()
    model.eval()
    alone = torch.zeros(real.shape, device=device)
    for i, (qi, r) in enumerate(zip(queries, responses)):
        logp = torch.log_softmax(alone_logits(model, qi + r)[len(qi) - 1 : -1], -1)
        alone[i, : len(r)] = logp.gather(1, torch.tensor(r, device=device)[:, None]).squeeze(1)
    got = {"no_grad (reference, rollout scoring)": sequence_logprobs(model, ids, mask, q)}
    model.train()  # the update's forward: dropout modules active (at p=0), autograd on, the trained attention path
    head = output_head(model)
    with torch.enable_grad():
        for what, h in (("train, grad, chunked LM head", head), ("train, grad, full logits", None)):
            if what.endswith("head") and h is None:
                continue
            logprobs, _ = response_logprobs(model, ids, mask, q, 1.0, h)
            assert logprobs.requires_grad
            got[what] = logprobs.detach()
    model.eval()
    return {what: (lp.float() - alone).abs()[real].max().item() for what, lp in got.items()}


@pytest.mark.numerics  # padded against alone: other kernels on other CPUs
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_scoring_forwards_give_each_row_its_own_log_probabilities(saved, name, device):
    diffs = check_scoring(load_causal_lm(saved[name]), load_tokenizer(saved[name]), device)
    assert max(diffs.values()) < TOLERANCE, diffs


def conversations(tokenizer) -> list[list[int]]:
    """Whole conversations (chat template) of different lengths, as a reward model scores them."""
    texts = [("go x", "a b"), ("go alpha beta gamma delta x y z", "the quick brown fox jumps"), ("go z", "x")]
    out = []
    for user, reply in texts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], tokenize=False
        )
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


@pytest.mark.numerics  # padded against alone: other kernels on other CPUs
@pytest.mark.parametrize("name", NAMES)
def test_reward_model_and_critic_on_a_causal_backbone_score_padded_rows_as_alone(saved, name):
    """load_reward_model from a causal LM (a fresh scalar head, as the reward stage and the critic start):
    right-padded (the reward scorer's layout), left-padded with real-token positions (the critic's layout) and the
    critic's per-token values all equal the row alone."""
    from rlhf.ppo.rollout import left_pad, position_ids
    from rlhf.ppo.value_head import ValueHead
    from rlhf.rewards.reward_model import RewardScorer

    model = load_reward_model(saved[name]).eval()
    tokenizer = load_tokenizer(saved[name])
    seqs = conversations(tokenizer)
    scorer = RewardScorer(model, tokenizer, tokenizer)
    alone = torch.cat([scorer.score_ids([s]) for s in seqs])
    right = scorer.score_ids(seqs)
    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        left = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, 0]
        values = ValueHead(model)(ids, mask)
        values_alone = [
            ValueHead(model)(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs
        ]
    diffs = {
        "right-padded": (right - alone).abs().max().item(),
        "left-padded": (left - alone).abs().max().item(),
    }
    diffs["critic values"] = max(
        (values[i, ids.shape[1] - len(s) :] - values_alone[i]).abs().max().item() for i, s in enumerate(seqs)
    )
    assert max(diffs.values()) < TOLERANCE, diffs


@pytest.mark.numerics  # padded against alone: other kernels on other CPUs
def test_bert_reward_model_with_its_own_tokenizer_scores_padded_rows_as_alone(tmp_path, saved):
    """A BERT (WordPiece tokenizer of its own) scores a policy's decoded conversations: the scorer's right-padded
    batch equals each conversation alone. (BERT pools its first token, [CLS]: it is only ever right-padded.)"""
    from rlhf.rewards.reward_model import RewardScorer

    bert_dir = build_bert_reward_model(tmp_path / "bert")
    model = load_reward_model(bert_dir).eval()
    tokenizer = load_tokenizer(bert_dir)
    scorer = RewardScorer(model, tokenizer, load_tokenizer(saved["llama"]))
    assert not scorer.token_path
    messages = [
        [{"role": "user", "content": "go x"}, {"role": "assistant", "content": "a b"}],
        [
            {"role": "user", "content": "go alpha beta gamma delta x y z"},
            {"role": "assistant", "content": "the fox"},
        ],
        [{"role": "user", "content": "go z"}, {"role": "assistant", "content": ""}],
    ]
    seqs = [scorer.text_ids(m) for m in messages]
    assert len({len(s) for s in seqs}) == 3
    alone = torch.cat([scorer.score_ids([s]) for s in seqs])
    batch = scorer.score_ids(seqs)
    assert (batch - alone).abs().max().item() < TOLERANCE
    assert alone.std() > 0  # the scores depend on the text


# ------------------------------------------------------------------------------- adapters and refused models


def random_adapters(model):
    """peft initialises B to 0 (adapters start as the identity): random values make a wrong merge visible."""
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_dora_runs_peft_forward_in_the_sampler_and_is_refused_by_the_state_dict_merge(saved):
    """DoRA is not W + s * B @ A: the Llama engine does not merge it (the sampler runs peft's forward, which is
    exact), and the state-dict merge (FSDP export) refuses it instead of saving wrong weights: under FSDP the
    trainer refuses it before training."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models.lora import check_adapters, merged_state_dict

    model = random_adapters(
        get_peft_model(
            load_causal_lm(saved["llama"]),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        )
    )
    assert type(make_decoder(model)) is HFDecoder
    diffs = check_sampler(model, load_tokenizer(saved["llama"]))
    assert max(diffs.values()) < TOLERANCE, diffs
    check_adapters(model)  # trained whole, peft merges DoRA itself at export
    with pytest.raises(ValueError, match="DoRA"):
        check_adapters(model, sharded=True)  # under FSDP: refused when the trainer is built
    with pytest.raises(ValueError, match="DoRA"):
        merged_state_dict(model, model.state_dict())


def test_alora_is_refused_before_training(saved, tmp_path, float32_accelerator):
    """aLoRA adapters switch on at their invocation tokens, which peft looks for in each forward's own input ids:
    a sampler that feeds a token at a time over a KV cache would run the base model, and peft cannot merge aLoRA
    to save the policy. The trainer refuses it when built, the decoder and the state-dict merge too."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models.lora import merged_state_dict
    from rlhf.ppo.trainer import PPOTrainer
    from tests.architectures import RaggedDialogueEnv

    tokenizer = load_tokenizer(saved["llama"])
    invocation = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=invocation)
    model = random_adapters(get_peft_model(load_causal_lm(saved["llama"]), config))
    cfg = ppo_config(total_episodes=8, batch_size=8, advantage="grpo", num_generations=2)
    with pytest.raises(ValueError, match="aLoRA.*plain LoRA"):
        PPOTrainer(
            cfg, model, tokenizer, RaggedDialogueEnv, output_dir=tmp_path, accelerator=float32_accelerator
        )
    with pytest.raises(ValueError, match="aLoRA.*plain LoRA"):
        make_decoder(model)
    with pytest.raises(ValueError, match="ALoraLinearVariant"):
        merged_state_dict(model, model.state_dict())


def test_lora_on_gpt2_conv1d_merges_transposed(saved):
    """GPT-2's Conv1D stores its weight (in, out): peft marks it fan_in_fan_out and the state-dict merge transposes
    B @ A, as peft's own merge does."""
    from peft import LoraConfig, get_peft_model

    from rlhf.models.lora import merged_state_dict

    model = random_adapters(
        get_peft_model(
            load_causal_lm(saved["gpt2"]), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
        )
    )
    merged = merged_state_dict(model, model.state_dict())
    expected = model.merge_and_unload().state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, msg=key)


def test_recurrent_state_models_are_refused_before_training(tmp_path):
    """LFM2 / Mamba / Qwen3-Next keep a recurrent state the KV-cache sampler cannot hold (it crashed with an
    IndexError mid-rollout): validation refuses them before any stage runs, naming the model and what to do, and the
    decoder refuses them too (a policy passed to the trainer directly)."""
    from rlhf.cli import compose
    from rlhf.models.loading import check_sampler_support
    from rlhf.run.validation import validate

    lfm2 = build_causal_lm(
        "lfm2", tmp_path / "lfm2", full_attn_idxs=[1]
    )  # short-convolution layers beside attention
    cfg = compose(
        ["model=hf", f"model.name_or_path={lfm2}", "stages=[ppo,evaluate]", "ppo.reward_source=env"]
    )
    with pytest.raises(
        ValueError, match=rf"model.name_or_path={lfm2} \(lfm2\) has conv layers.*Llama"
    ) as info:
        validate(cfg)
    assert "\n" not in str(info.value)
    validate(compose(["model=hf", f"model.name_or_path={lfm2}", "stages=[sft]"]))  # sft alone: no sampler
    with pytest.raises(ValueError, match="conv layers"):
        make_decoder(load_causal_lm(lfm2))
    for config in (
        transformers.MambaConfig(num_hidden_layers=2),
        transformers.Qwen3NextConfig(num_hidden_layers=4),
    ):
        with pytest.raises(ValueError, match="linear_attention layers"):
            check_sampler_support(config, "the policy")


@pytest.mark.parametrize("name", WINDOWED)
def test_the_sliding_window_binds_on_these_sequences(saved, name):
    """The windowed models' tests mean something: over a 40-token sequence their logits depend on the window."""
    model = load_causal_lm(saved[name]).eval()
    tokens = list(range(40, 80))
    windowed = alone_logits(model, tokens)
    model.config.sliding_window = 4096
    assert (alone_logits(model, tokens) - windowed).abs().max() > 0.1


# -------------------------------------------------------------------------------------------------------- 3. PPO


@pytest.fixture
def float32_accelerator():
    """A fresh accelerate state without mixed precision (accelerate keeps one per process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="no")
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.numerics  # padded against alone: other kernels on other CPUs
@pytest.mark.parametrize("name", NAMES)
def test_first_ppo_update_sees_zero_kl(saved, tmp_path, float32_accelerator, name):
    """Update 1, one epoch of one minibatch: the sampler's log-probabilities are those the update's forward and the
    reference (the same weights) compute, on two-turn episodes whose prompts and messages differ in length."""
    from rlhf.ppo.trainer import PPOTrainer
    from tests.architectures import RaggedDialogueEnv

    cfg = ppo_config(total_episodes=8, batch_size=8, num_mini_batches=1, num_ppo_epochs=1, response_length=6)
    tokenizer = load_tokenizer(saved[name])
    torch.manual_seed(0)
    trainer = PPOTrainer(
        cfg,
        load_causal_lm(saved[name]),
        tokenizer,
        RaggedDialogueEnv,
        output_dir=tmp_path,
        ref_policy=load_causal_lm(saved[name]),
        critic=load_reward_model(saved[name]),
        accelerator=float32_accelerator,
    )
    metrics, ro = trainer.step()
    query_mask = ro.attention_mask[:, : ro.context_length]
    assert not query_mask.all() and (ro.num_turns == 2).any(), "left padding and second turns happened"
    assert abs(metrics["objective/kl"]) < 1e-4, metrics["objective/kl"]
    assert abs(metrics["policy/approxkl_avg"]) < 1e-5, metrics["policy/approxkl_avg"]
    trainer.close()


@pytest.mark.parametrize("name", NAMES)
def test_ppo_and_evaluate_through_the_pipeline(saved, tmp_path, name):
    """`model=hf model.name_or_path=<dir>` on the multi-turn guess task: two PPO updates and the evaluation in
    float32, rewards from the environment."""
    import json

    from rlhf.cli import compose
    from rlhf.run.pipeline import run
    from tests.helpers import TINY_PPO

    overrides = [
        "model=hf",
        f"model.name_or_path={saved[name]}",
        "model.dtype=float32",
        f"ppo.policy_path={saved[name]}",
        "stages=[ppo,evaluate]",
        "experiment=guess",  # multi-turn, rewards from the environment, the critic from the policy
        "logger=none",
        *TINY_PPO,
    ]
    summary = run(compose(overrides), run_dir=tmp_path / "run")
    assert list(summary["stages"]) == ["ppo", "evaluate"]
    assert summary["stages"]["ppo"]["metrics"]["updates"] == 2
    history = [
        json.loads(line) for line in (tmp_path / "run" / "ppo" / "history.jsonl").read_text().splitlines()
    ]
    assert abs(history[0]["objective/kl"]) < 1e-4  # sampled and scored alike before any update
    assert all(torch.isfinite(torch.tensor(row["objective/scores"])) for row in history)
    evaluation = json.loads((tmp_path / "run" / "evaluate" / "eval.json").read_text())
    assert all(
        torch.isfinite(torch.tensor(v)) for v in evaluation["metrics"].values() if isinstance(v, float)
    )


def test_an_attention_without_a_registered_mask_is_refused_by_the_sampler(saved):
    """transformers gives an attention implementation that has no mask function no mask at all (padding attended,
    the bug `rlhf.models.attention` once had): the sampler refuses it rather than sample from a model that reads padding."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("sdpa_without_mask_for_test", sdpa_attention_forward)
    model = load_causal_lm(saved["qwen2"])
    model.set_attn_implementation("sdpa_without_mask_for_test")
    with pytest.raises(ValueError, match="no mask function.*attend to padding"):
        make_decoder(model)


UNNAMED = ["olmo2", "granite", "stablelm", "gpt_neox", "starcoder2", "cohere"]
"""Families the matrix above does not build by hand: a config from their own defaults, sized down."""


@pytest.mark.numerics  # padded against alone: other kernels on other CPUs
@pytest.mark.parametrize("model_type", UNNAMED)
def test_architectures_the_matrix_does_not_name_score_and_sample_padded_rows_as_alone(tmp_path, model_type):
    """Any family through the loaders: the scoring forwards and the sampler over a left-padded batch equal each row
    alone (a new family needs no code here, only a KV cache and a registered attention mask)."""
    build_causal_lm(model_type, tmp_path)
    model, tokenizer = load_causal_lm(tmp_path), load_tokenizer(tmp_path)
    assert max(check_scoring(model, tokenizer).values()) < TOLERANCE
    assert max(check_sampler(model, tokenizer).values()) < TOLERANCE
