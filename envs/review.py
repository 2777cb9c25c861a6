"""`rlhf/Review-v0`: continue a movie review, positively (the classic RLHF sentiment task, in miniature).

Prompt: "review : the <subject> <verb>", e.g. "review : the film was" (10 subjects x 4 verbs).
Reply: a short continuation, ideally 4-10 words of the review language, e.g.
"very good and lovely , but the music was dull".

Gold reward (the environment's reward), a transparent sentiment score in [0, 1]:

    p = positive words, n = negative words, u = words outside the vocabulary (junk)
    gold = p / (p + n + u)      the share of the sentiment-bearing words that are positive
    gold = 0.5                  when every word is neutral ("the", "very", "plot", "long", ...)
    gold = 0                    for an empty reply

So a review made only of positive words scores 1, "good but dull" 0.5, only negative words 0.
Junk (words not in the vocabulary, e.g. random characters) counts like a negative word, and an
empty reply scores 0: the policy must write a review. Length does not matter.

Offline data:
- demonstrations: mixed-sentiment reviews from a small grammar (3-9 words: "adjp and adjp [ending]"
  or "adjp , but the <subject> was adjp"); each review has a mood q ~ Uniform(0, 0.85) and each
  adjective is positive with probability 0.8 q, negative 0.8 (1 - q), neutral otherwise. Mean gold
  DEMO_MEAN_GOLD ~= 0.43, so a policy that learns to pick only positive adjectives gains ~0.55.
- preferences: two reviews of the same prompt with moods q ~ Uniform(0, 1) (all-positive reviews
  occur, so a reward model sees the region PPO moves into); pairs with equal gold are redrawn; the
  label follows Bradley-Terry noise with temperature 0.25: P(chosen = higher gold) = sigmoid(|gap| / 0.25).
  Gaps are 0.5 or 1, so the Bayes ceiling of label accuracy is PREFERENCE_LABEL_ACCURACY ~= 0.92
  (no reward model agrees with the labels more often in expectation; measured over 20,000 pairs).

`info` keys after a step: "turn", "gold" (= reward), "positive" (p), "negative" (n), "unknown" (u).
"""

from __future__ import annotations

import string
from typing import Any, ClassVar

import numpy as np

from envs.base import TextEnv, preference_pair, words

SUBJECTS = ("film", "movie", "plot", "acting", "story", "ending", "cast", "music", "script", "dialogue")
VERBS = ("was", "is", "felt", "seemed")
POSITIVE = (
    "great", "good", "wonderful", "brilliant", "superb", "lovely",
    "charming", "beautiful", "excellent", "delightful", "moving", "fun",
)  # fmt: skip
NEGATIVE = (
    "bad", "boring", "awful", "dull", "terrible", "weak",
    "poor", "bland", "messy", "tedious", "clumsy", "silly",
)  # fmt: skip
NEUTRAL_ADJECTIVES = ("long", "short", "simple", "quiet", "strange", "familiar")
ADVERBS = ("very", "quite", "really", "rather", "so", "too", "fairly")
CONJUNCTIONS = ("but", "and", "though")
ENDINGS = ("overall", "at times", "in parts", "for me")
FUNCTION_WORDS = ("review", ":", ",", "the", "and", "at", "times", "in", "parts", "for", "me", "overall")

PREFERENCE_TEMPERATURE = 0.25
DEMO_MEAN_GOLD = 0.43
PREFERENCE_LABEL_ACCURACY = 0.92
"""Bayes ceiling of the preference labels' agreement with gold (see `label_accuracy_ceiling`)."""

_POSITIVE = frozenset(POSITIVE)
_NEGATIVE = frozenset(NEGATIVE)


def sentiment_counts(completion: str, vocabulary: frozenset[str]) -> tuple[int, int, int]:
    """(positive, negative, unknown) word counts of a reply."""
    p = n = u = 0
    for w in words(completion):
        if w in _POSITIVE:
            p += 1
        elif w in _NEGATIVE:
            n += 1
        elif w not in vocabulary:
            u += 1
    return p, n, u


def sentiment_score(p: int, n: int, u: int, empty: bool) -> float:
    """The gold formula of the module docstring."""
    if empty:
        return 0.0
    if p + n + u == 0:
        return 0.5
    return p / (p + n + u)


class ReviewEnv(TextEnv):
    """Single-turn: write a positive continuation of a movie review. See the module docstring."""

    charset: ClassVar[str] = string.ascii_lowercase + " :,"
    max_action_length: ClassVar[int] = 512
    max_observation_length: ClassVar[int] = 64
    max_turns: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self._prompt = ""

    # ------------------------------------------------------------------ episodes
    def _reset(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if "prompt" in options:
            prompt = options["prompt"]
            if not isinstance(prompt, str) or len(prompt) > self.max_observation_length:
                raise ValueError(
                    f"{self.env_id}: options['prompt'] must be a str of <= {self.max_observation_length} characters"
                )
            self._prompt = prompt
        else:
            self._prompt = _draw_prompt(self.np_random)
        return self._prompt, {}

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        p, n, u = sentiment_counts(action, _VOCABULARY_SET)
        gold = sentiment_score(p, n, u, empty=not action.strip())
        return "", gold, True, {"gold": gold, "positive": p, "negative": n, "unknown": u}

    def reference_action(self) -> str:
        """A scripted glowing review (gold 1)."""
        i = sum(map(ord, self._prompt)) % len(POSITIVE)  # varies with the prompt, uses no randomness
        picks = [POSITIVE[(i + k) % len(POSITIVE)] for k in range(4)]
        return f"really {picks[0]} and {picks[1]} , {picks[2]} and {picks[3]}"

    # ------------------------------------------------------------------ offline data
    @classmethod
    def vocabulary(cls) -> list[str]:
        groups = (
            FUNCTION_WORDS,
            SUBJECTS,
            VERBS,
            POSITIVE,
            NEGATIVE,
            NEUTRAL_ADJECTIVES,
            ADVERBS,
            CONJUNCTIONS,
        )
        return list(dict.fromkeys(w for group in groups for w in group))

    @classmethod
    def gold_reward(cls, prompt: str, completion: str) -> float:
        p, n, u = sentiment_counts(completion, _VOCABULARY_SET)
        return sentiment_score(p, n, u, empty=not completion.strip())

    @classmethod
    def demonstrations(cls, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            prompt = _draw_prompt(rng)
            out.append(
                {"prompt": prompt, "completion": _draw_review(rng, mood=float(rng.uniform(0.0, 0.85)))}
            )
        return out

    @classmethod
    def preferences(cls, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        return [_preference(rng, cls) for _ in range(n)]


_VOCABULARY_SET = frozenset(ReviewEnv.vocabulary())

POSITIVE_V1 = _POSITIVE | {
    "amazing", "fantastic", "enjoyable", "masterpiece", "perfect", "best", "love", "loved", "stunning",
    "captivating", "engaging", "impressive", "entertaining", "memorable", "gripping", "outstanding", "incredible",
    "enjoyed", "funny", "powerful", "compelling", "touching", "heartwarming", "nice", "solid", "beautifully",
    "wonderfully", "magnificent", "terrific", "fascinating", "remarkable", "splendid", "marvelous", "superbly",
}  # fmt: skip
NEGATIVE_V1 = _NEGATIVE | {
    "worst", "disappointing", "disappointed", "waste", "mediocre", "predictable", "forgettable", "annoying",
    "hate", "hated", "horrible", "unfunny", "confusing", "lackluster", "painful", "pointless", "stupid",
    "uninspired", "lame", "dreadful", "mess", "boring", "awkward", "flawed", "shallow", "unwatchable",
}  # fmt: skip


def sentiment_words(text: str) -> list[str]:
    """Lower-cased words with surrounding punctuation stripped: "Great!" -> "great"."""
    out = []
    for w in text.lower().split():
        w = w.strip(string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026")
        if w:
            out.append(w)
    return out


class ReviewEnvV1(ReviewEnv):
    """`rlhf/Review-v1`: the review task with a gold reward that is meaningful for free English too.

    v0 counts every word outside the task's small vocabulary against the reply, so a real model's fluent English
    scores near 0 whatever its sentiment. v1 reads sentiment only:

        p, n = positive and negative words (a larger lexicon, case and punctuation ignored)
        gold = p / (p + n)    when the reply holds sentiment words
        gold = 0.5            when it holds none (neutral, or words the lexicon does not know)
        gold = 0              for an empty reply

    Any printable character is a valid action. On the task's own vocabulary (the tiny models) v1 equals v0, since
    such replies hold no unknown words. Offline data is v0's.
    """

    charset: ClassVar[str] = (
        string.printable.replace("\x0b", "").replace("\x0c", "")
        + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026"
    )
    max_observation_length: ClassVar[int] = 256

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        p, n = sentiment_counts_v1(action)
        gold = sentiment_score(p, n, 0, empty=not action.strip())
        return "", gold, True, {"gold": gold, "positive": p, "negative": n}

    @classmethod
    def gold_reward(cls, prompt: str, completion: str) -> float:
        p, n = sentiment_counts_v1(completion)
        return sentiment_score(p, n, 0, empty=not completion.strip())


def sentiment_counts_v1(completion: str) -> tuple[int, int]:
    """(positive, negative) word counts of a reply under v1's lexicon."""
    ws = sentiment_words(completion)
    return sum(w in POSITIVE_V1 for w in ws), sum(w in NEGATIVE_V1 for w in ws)


def _draw_prompt(rng: np.random.Generator) -> str:
    subject, verb = divmod(int(rng.integers(len(SUBJECTS) * len(VERBS))), len(VERBS))  # one scalar draw: fast
    return f"review : the {SUBJECTS[subject]} {VERBS[verb]}"


def _preference(rng: np.random.Generator, cls: type[ReviewEnv]) -> dict[str, Any]:
    """Two reviews of one prompt with moods ~ Uniform(0, 1) and different gold."""
    prompt = _draw_prompt(rng)
    return preference_pair(
        rng,
        prompt,
        draw=lambda: _draw_review(rng, mood=float(rng.uniform())),
        reward=lambda review: cls.gold_reward(prompt, review),
        temperature=PREFERENCE_TEMPERATURE,
    )


def _draw_adjective_phrase(rng: np.random.Generator, mood: float) -> list[str]:
    """[adverb] adjective, the adjective positive with probability 0.8 mood, negative 0.8 (1 - mood)."""
    u = rng.random()
    if u < 0.8 * mood:
        adjective = POSITIVE[rng.integers(len(POSITIVE))]
    elif u < 0.8:
        adjective = NEGATIVE[rng.integers(len(NEGATIVE))]
    else:
        adjective = NEUTRAL_ADJECTIVES[rng.integers(len(NEUTRAL_ADJECTIVES))]
    if rng.random() < 0.3:
        return [ADVERBS[rng.integers(len(ADVERBS))], adjective]
    return [adjective]


def _draw_review(rng: np.random.Generator, mood: float) -> str:
    """Either "adjp and adjp [ending]" (3-8 words) or "adjp , conj the subject was adjp" (7-9 words)."""
    out = _draw_adjective_phrase(rng, mood)
    if rng.random() < 0.5:
        conjunction = CONJUNCTIONS[rng.integers(len(CONJUNCTIONS))]
        subject = SUBJECTS[rng.integers(len(SUBJECTS))]
        out += [",", conjunction, "the", subject, "was", *_draw_adjective_phrase(rng, mood)]
    else:
        out += ["and", *_draw_adjective_phrase(rng, mood)]
        if rng.random() < 0.6:
            out += ENDINGS[rng.integers(len(ENDINGS))].split()
    return " ".join(out)
