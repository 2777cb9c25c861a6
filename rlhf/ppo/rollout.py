"""Rollouts: batched generation against many text environments at once, single- or multi-turn.

Token-in/token-out: the policy's sampled token ids are kept exactly as generated; only the environment's messages
are tokenized, laid out by `rlhf.models.chat_format.ChatFormat` (with a chat template: the prompt is the user turn plus the
generation prompt, each later message a user turn after the reply's end-of-turn token). Re-tokenizing decoded
history would give PPO log-probabilities of tokens the policy never sampled. The resulting ids equal the chat
template's tokenization of the conversation (`ChatFormat.check_consistency`).

Layout of one batch of episodes (B episodes, Q query tokens, R response tokens)::

    query_ids     (B, Q)  the first observation, left-padded
    response_ids  (B, R)  everything after it: reply 1 [+ stop], env message 1, reply 2 [+ stop], ..., right-padded
    action_mask   (B, R)  True on the policy's own tokens (replies and their stop token), False on env messages/padding

Generation is `rlhf.ppo.sampler.KVSampler`: one KV cache for the whole batch of episodes, kept across turns, a
group's shared prompt prefilled once. The log-probabilities are the sampler's own (no second forward pass): the
positions and masks are those the PPO update uses, so they equal the update's first forward pass up to float
rounding (the first ratio is 1 to ~1e-6 in float32). Under mixed precision the trainer calls `rollout` inside its
autocast, so the sampler computes in the update's precision.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import gymnasium
import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from envs.base import id_of
from rlhf.models.chat_format import ChatFormat
from rlhf.ppo.ops import entropy_from_logits, fused_logprobs_entropy, logprobs_from_logits
from rlhf.ppo.sampler import KVSampler


class EnvFailure(RuntimeError):
    """An environment raised during reset or step; the message names the env id, the episode seed and the turn."""


@dataclass
class Rollout:
    """A batch of finished episodes as tensors (on the policy's device) plus their texts."""

    query_ids: torch.Tensor
    """(B, Q) long: the first observation of each episode, left-padded."""
    response_ids: torch.Tensor
    """(B, R) long: policy replies and environment messages after the first observation, right-padded."""
    attention_mask: torch.Tensor
    """(B, Q + R) long: 1 on real tokens (query, replies, env messages), 0 on padding."""
    action_mask: torch.Tensor
    """(B, R) bool: True on tokens the policy sampled (the only ones that get policy/value losses)."""
    logprobs: torch.Tensor
    """(B, R) float32: log-probability of each response token under the rollout policy; 0 off `action_mask`."""
    env_rewards: torch.Tensor
    """(B,) float32: the episode's return (sum of the environment's rewards)."""
    turn_rewards: torch.Tensor
    """(B, R) float32: each environment step's reward at the last policy token of the turn that earned it."""
    turn_ends: torch.Tensor
    """(B, R) bool: True at the last policy token of each turn."""
    turn_eos: torch.Tensor
    """(B, R) bool: True at turn ends whose last token is a stop token (the turn ended by itself)."""
    ended_with_eos: torch.Tensor
    """(B, max_turns) bool: whether turn k ended with a stop token (False for turns not taken)."""
    num_turns: torch.Tensor
    """(B,) long: policy turns taken."""
    seeds: list[int] = field(default_factory=list)
    """Episode seeds passed to `env.reset`."""
    queries: list[str] = field(default_factory=list)
    """The first observation of each episode."""
    replies: list[list[str]] = field(default_factory=list)
    """The text of each policy reply, as given to `env.step`."""
    transcripts: list[str] = field(default_factory=list)
    """Everything after the first observation, decoded with special tokens kept (padding dropped)."""
    infos: list[dict[str, Any]] = field(default_factory=list)
    """The last `info` dict of each episode."""
    messages: list[list[dict[str, str]]] = field(default_factory=list)
    """Each episode as a conversation: environment messages as user turns, decoded replies (no special tokens)
    as assistant turns; what a reward model with another tokenizer scores."""

    @property
    def context_length(self) -> int:
        """Q: where the response starts in `query_responses`."""
        return self.query_ids.shape[1]

    @property
    def query_responses(self) -> torch.Tensor:
        """(B, Q + R) long: the whole episode as one token sequence."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) long: policy tokens per episode."""
        return self.action_mask.sum(1)

    def __len__(self) -> int:
        return self.query_ids.shape[0]


def left_pad(
    seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ids (B, L) and attention mask (B, L)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
):
    """The model's forward over whole left-padded sequences (B, L): positions from the mask (`position_ids`), no KV
    cache; `kwargs` go to the model. The policy's, the reference's and the critic's passes all run through it."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        **kwargs,
    )


def response_logits(
    model: torch.nn.Module, query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int
) -> torch.Tensor:
    """Logits that predicted each response token: (B, Q + R) ids -> (B, R, V).

    logits[:, t] is the model's output at position Q + t - 1. Position ids come from the attention mask.
    """
    return padded_forward(model, query_responses, attention_mask).logits[:, context_length - 1 : -1]


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when its logits are exactly head(last hidden state), else None.

    Models that scale or soft-cap their logits after the head (Gemma 2, Cohere, Granite), whose head is not a
    plain Linear (an adapted or quantized one) or is sharded (FSDP), return None and are scored from their full logits.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1.0):
            return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or isinstance(head.weight, DTensor):
        return None  # a DTensor: FSDP's shard of the weight, whole only inside the model's own forward
    return head


def response_logprobs(
    model: torch.nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
    head: torch.nn.Linear | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies of the response tokens: (B, Q + R) ids -> (B, R), (B, R) float32.

    With `head` (`output_head` of the model), the model returns its last hidden states and the head is applied by
    `ops.fused_logprobs_entropy` a chunk of tokens at a time, in the forward and in the backward: the (B, R, V)
    logits never exist whole, whatever the vocabulary. Without, from the model's full logits. `model` may be the
    DDP-wrapped policy (its forward is what synchronises gradients).
    """
    targets = query_responses[:, context_length:]
    if head is None:
        logits = response_logits(model, query_responses, attention_mask, context_length)  # (B, R, V)
        return logprobs_from_logits(logits, targets, temperature), entropy_from_logits(logits, temperature)
    out = padded_forward(
        model,
        query_responses,
        attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,  # only the last position's logits: the head runs chunked below
    )
    hidden = out.hidden_states[-1][:, context_length - 1 : -1]  # (B, R, H) final-norm states
    return fused_logprobs_entropy(hidden, head.weight, targets, temperature, bias=head.bias)


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Log-probabilities of the response tokens, (B, Q + R) -> (B, R) float32, computed in chunks of `batch_size`
    (and, where the model allows, without materialising the logits: `response_logprobs`)."""
    head = output_head(model)
    parts = []
    with torch.inference_mode():  # cheaper per op than no_grad; the concatenation below leaves it
        for i in range(0, query_responses.shape[0], batch_size):
            qr, mask = query_responses[i : i + batch_size], attention_mask[i : i + batch_size]
            parts.append(response_logprobs(model, qr, mask, context_length, temperature, head)[0].float())
    return torch.cat(parts)  # a normal tensor (outside inference mode): the update may use it with autograd


@dataclass
class _Episode:
    env: gymnasium.Env
    seed: int
    query: list[int]
    query_text: str
    tokens: list[int] = field(default_factory=list)  # response part: replies and env messages
    # the sampler's log-probability of each token of `tokens` (0 on env tokens)
    logprobs: list[float] = field(default_factory=list)
    is_action: list[bool] = field(default_factory=list)
    turn_end_positions: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turn_eos: list[bool] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)  # decoded replies before fit_action
    observations: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    unseen: list[int] = field(default_factory=list)  # env tokens the sampler's cache has not read yet


def _check_reward(reward: Any, env: gymnasium.Env, seed: int, turn: int) -> float:
    try:
        value = float(reward)
    except (TypeError, ValueError):
        raise ValueError(
            f"environment {id_of(env)} returned a non-numeric reward {reward!r} in episode seed={seed}, turn {turn}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(
            f"environment {id_of(env)} returned reward {value} in episode seed={seed}, turn {turn}: "
            "rewards must be finite; fix the environment (training stopped instead of learning from it)"
        )
    return value


def _reset(env: gymnasium.Env, seed: int) -> tuple[str, dict]:
    try:
        obs, info = env.reset(seed=seed)
    except Exception as e:
        raise EnvFailure(
            f"environment {id_of(env)} raised in reset of episode seed={seed}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obs, str):
        raise EnvFailure(
            f"environment {id_of(env)} returned a {type(obs).__name__} observation (seed={seed}); expected str"
        )
    return obs, info


def _step(env: gymnasium.Env, reply: str, seed: int, turn: int):
    try:
        return env.step(reply)
    except Exception as e:
        raise EnvFailure(
            f"environment {id_of(env)} raised in step of episode seed={seed}, turn {turn} "
            f"(reply {reply!r}): {type(e).__name__}: {e}"
        ) from e


def fit_action(text: str, action_space: gymnasium.Space | None) -> str:
    """A decoded reply made valid for a `spaces.Text` action space (the tokens stay as sampled).

    Characters outside the space's charset are dropped and a reply longer than `max_length` is cut at a word
    boundary: a policy that writes an en dash or rambles gets the reward of what remains instead of crashing
    training, and an environment that does not validate its actions is still fed valid ones.
    """
    if not isinstance(action_space, gymnasium.spaces.Text):
        return text
    allowed = action_space.character_set
    if not allowed.issuperset(text):
        text = "".join(c for c in text if c in allowed)
    limit = action_space.max_length
    if len(text) <= limit:
        return text
    cut = text[: limit + 1]
    return cut[: cut.rfind(" ")] if " " in cut else text[:limit]


def rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    envs: list[gymnasium.Env],
    seeds: list[int],
    *,
    response_length: int,
    temperature: float = 1.0,
    stop_token_ids: Collection[int] | None = None,
    max_turns: int | None = None,
) -> Rollout:
    """Play one episode in each env (`env.reset(seed=seeds[i])`), all envs' turns generated as one batch.

    model: the policy (unwrapped from DDP; a peft model works). Each turn generates at most `response_length`
    tokens and stops at any of `stop_token_ids` (`rlhf.models.tokenizer.stop_token_ids`; None or empty: only the length
    limit). A reply that does not end with the template's end-of-turn token (cut, or stopped on another stop id) is
    closed with it before the next user turn (`ChatFormat.env_turn_ids`). An episode ends when the env says
    terminated or truncated, or after `max_turns` replies (default: the env's `max_turns`, else 1).
    Raises EnvFailure (env id, seed, turn) when an env raises, ValueError for a NaN/inf/non-numeric reward.
    """
    if len(envs) != len(seeds):
        raise ValueError(f"got {len(envs)} environments but {len(seeds)} seeds")
    if response_length < 1:
        raise ValueError(f"response_length must be >= 1, got {response_length}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    if max_turns is None:
        max_turns = max(int(getattr(env.unwrapped, "max_turns", 1)) for env in envs)

    fmt = ChatFormat(tokenizer)
    episodes, prompts = [], {}  # a group's samples share their prompt: tokenized once
    for env, seed in zip(envs, seeds):
        obs, _ = _reset(env, seed)
        if obs not in prompts:
            prompts[obs] = fmt.prompt_ids(obs)
        episodes.append(_Episode(env=env, seed=seed, query=list(prompts[obs]), query_text=obs))
        episodes[-1].observations.append(obs)
    if any(not ep.query for ep in episodes):
        raise ValueError("an environment's first observation tokenized to nothing; the policy needs a prompt")

    was_training = model.training
    model.eval()
    stops = frozenset(stop_token_ids or ())
    sampler = KVSampler(model, temperature=temperature, stop_token_ids=stops, pad_token_id=pad_id)
    sampler.start([ep.query for ep in episodes])  # a group's shared prompt is prefilled once
    active = list(episodes)  # the sampler's rows, in order
    for turn in range(max_turns):
        # 1. sample this turn's replies for every unfinished episode at once
        replies, logprobs = sampler.sample(response_length)
        # 2. step each env with the decoded reply; append the reply's tokens and the env's answer
        for ep, reply, reply_logprobs in zip(active, replies, logprobs):
            said = tokenizer.decode(reply, skip_special_tokens=True)
            text = fit_action(said, ep.env.action_space)
            obs, reward, terminated, truncated, info = _step(ep.env, text, ep.seed, turn)
            ended = reply[-1] in stops  # stopped by itself (for the metrics and the missing-EOS penalty)
            ep.tokens += reply
            ep.logprobs += reply_logprobs
            ep.is_action += [True] * len(reply)
            ep.turn_end_positions.append(len(ep.tokens) - 1)
            ep.turn_rewards.append(_check_reward(reward, ep.env, ep.seed, turn))
            ep.turn_eos.append(ended)
            ep.replies.append(text)
            ep.said.append(said)
            ep.info = info
            ep.done = bool(terminated or truncated) or turn + 1 == max_turns
            if not ep.done:
                if not isinstance(obs, str):
                    raise EnvFailure(
                        f"environment {id_of(ep.env)} returned a {type(obs).__name__} observation "
                        f"(seed={ep.seed}, turn {turn}); expected str"
                    )
                ep.unseen = fmt.env_turn_ids(obs, reply_ended=reply[-1] == fmt.end_of_turn_id)
                ep.tokens += ep.unseen
                ep.logprobs += [0.0] * len(ep.unseen)
                ep.is_action += [False] * len(ep.unseen)
                ep.observations.append(obs)
        # 3. the cache keeps the unfinished episodes and reads only what it has not seen (no re-read of history)
        still = [i for i, ep in enumerate(active) if not ep.done]
        if not still:
            break
        if len(still) < len(active):
            sampler.keep(still)
            active = [active[i] for i in still]
        sampler.extend([ep.unseen for ep in active])
    model.train(was_training)
    return _collate(tokenizer, episodes, max_turns, device)


def _collate(
    tokenizer: PreTrainedTokenizerBase,
    episodes: list[_Episode],
    max_turns: int,
    device: torch.device,
) -> Rollout:
    """Episodes -> padded tensors (the log-probabilities are the sampler's)."""
    pad_id = tokenizer.pad_token_id
    fmt = ChatFormat(tokenizer)
    B = len(episodes)
    query_ids, query_mask = left_pad([ep.query for ep in episodes], pad_id)  # (B, Q)
    R = max(len(ep.tokens) for ep in episodes)

    def padded(
        rows: list[list], fill, dtype: torch.dtype
    ) -> torch.Tensor:  # (B, R): one tensor from Python lists
        return torch.tensor([row + [fill] * (R - len(row)) for row in rows], dtype=dtype)

    response_ids = padded([ep.tokens for ep in episodes], pad_id, torch.long)
    response_mask = padded([[1] * len(ep.tokens) for ep in episodes], 0, torch.long)
    action_mask = padded([ep.is_action for ep in episodes], False, torch.bool)
    logprobs = padded([ep.logprobs for ep in episodes], 0.0, torch.float32)
    turn_rewards = torch.zeros((B, R), dtype=torch.float32)
    turn_ends = torch.zeros((B, R), dtype=torch.bool)
    turn_eos = torch.zeros((B, R), dtype=torch.bool)
    ended_with_eos = torch.zeros((B, max_turns), dtype=torch.bool)
    # turn ends: a few per episode, written in one indexed assignment per tensor
    rows = [i for i, ep in enumerate(episodes) for _ in ep.turn_end_positions]
    cols = [pos for ep in episodes for pos in ep.turn_end_positions]
    turns = [k for ep in episodes for k in range(len(ep.turn_end_positions))]
    if rows:
        rewards = torch.tensor([r for ep in episodes for r in ep.turn_rewards], dtype=torch.float32)
        eos = torch.tensor([e for ep in episodes for e in ep.turn_eos], dtype=torch.bool)
        turn_rewards[rows, cols] = rewards
        turn_ends[rows, cols] = True
        turn_eos[rows, cols] = eos
        ended_with_eos[rows, turns] = eos
    attention_mask = torch.cat([query_mask, response_mask], dim=1).to(device)
    query_ids, response_ids = query_ids.to(device), response_ids.to(device)
    action_mask = action_mask.to(device)
    logprobs = logprobs.to(device).masked_fill(~action_mask, 0.0)
    transcripts = []
    for ep in episodes:
        transcripts.append(tokenizer.decode(ep.tokens, skip_special_tokens=False))  # unpadded: eos kept
    return Rollout(
        query_ids=query_ids,
        response_ids=response_ids,
        attention_mask=attention_mask,
        action_mask=action_mask,
        logprobs=logprobs,
        env_rewards=torch.tensor(
            [sum(ep.turn_rewards) for ep in episodes], dtype=torch.float32, device=device
        ),
        turn_rewards=turn_rewards.to(device),
        turn_ends=turn_ends.to(device),
        turn_eos=turn_eos.to(device),
        ended_with_eos=ended_with_eos.to(device),
        num_turns=torch.tensor([len(ep.replies) for ep in episodes], dtype=torch.long, device=device),
        seeds=[ep.seed for ep in episodes],
        queries=[ep.query_text for ep in episodes],
        replies=[ep.replies for ep in episodes],
        transcripts=transcripts,
        infos=[ep.info for ep in episodes],
        messages=[fmt.conversation(ep.observations, ep.said) for ep in episodes],
    )
