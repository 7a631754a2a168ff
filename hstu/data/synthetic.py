"""The embedded synthetic dataset: learnable, deterministic, no download.

Generative story (every user independently, one event at a time):

* Items belong to ``num_topics`` latent topics; inside a topic, popularity is Zipf-like (weight 1/rank^a).
* Every item has three fixed "successor" items in its topic (a random cycle per topic).
* A user has a sparse topic preference (Dirichlet); the current topic drifts: at each event, with probability
  ``topic_drift``, it is redrawn from the preference.
* Next item: with probability ``transition_prob`` a successor of the previous item (70/20/10 over the three
  successors), otherwise a popularity draw from the current topic. A sequential model can therefore predict about
  half of the next items from the last one, while a popularity model cannot.
* Timestamps: sessions of quick consecutive events (gaps ~ 1 + Exp(90 s)) separated by long breaks (log-normal,
  median ~12 h); users start at random over ``time_span_days`` from 2000-04-25.
* Labels follow the user's affinity to the item's topic (plus a bonus for successor steps): a rating 1..5 (stored as
  class 0..4), or with ``actions="bitmask"`` KuaiRand-like 8-task action masks.
* Contextual features: ``user_id`` and the user's activity quintile, or with ``contextual_vocab`` one feature per
  given name whose ids are uniform over ``0..vocab_size - 1`` (the layout of a random benchmark; a ``user_id`` among
  them then is the user id column, so users may share an id).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

from hstu.data.processed import (
    ID_LIMIT, ContextualFeature, atomic_output_dir, bitmask_action_spec, rating_action_spec, write_in_memory,
)

LENGTH_DISTRIBUTIONS = ("lognormal", "pareto", "uniform", "fixed", "zipf", "normal")
SUCCESSOR_PROBS = (0.7, 0.2, 0.1)
NUM_ACTIVITY_LEVELS = 5
MAX_SYNTHETIC_LENGTH = 1 << 24  # longest sequence the generator accepts (16M events)


@dataclass
class SyntheticConfig:
    num_users: int = 6040
    num_items: int = 3700
    num_topics: int = 24
    mean_length: float = 165.0
    min_length: int = 20
    max_length: int = 2000
    length_distribution: str = "lognormal"
    length_sigma: float = 1.0  # lognormal shape
    length_std: float = 1.0  # normal: standard deviation in events (mean: mean_length)
    length_alpha: float = 1.5  # zipf: exponent (> 1) of min_length - 1 + Zipf(length_alpha)
    transition_prob: float = 0.5
    topic_drift: float = 0.05
    zipf_exponent: float = 1.0
    actions: str = "rating"  # or "bitmask"
    seed: int = 0
    start_time: int = 956_703_932  # 2000-04-25, MovieLens-1M era
    time_span_days: float = 3 * 365.0
    # None: the contextual features user_id and activity_level; {name: vocab_size}: exactly these features, ids
    # uniform over 0..vocab_size - 1 per user
    contextual_vocab: Optional[dict] = None

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field (and its ``--option``) for any invalid value."""
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {getattr(self, name)!r}")

        for name in ("num_users", "num_items", "num_topics", "min_length", "max_length", "seed", "start_time"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} (--{name.replace('_', '-')}) must be an integer, got {value!r}")
        for name in ("mean_length", "length_sigma", "length_std", "length_alpha", "transition_prob", "topic_drift",
                     "zipf_exponent", "time_span_days"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} (--{name.replace('_', '-')}) must be a number, got {value!r}")
            if not math.isfinite(value):
                raise bad(name, "finite")
        if self.length_distribution not in LENGTH_DISTRIBUTIONS:
            raise bad("length_distribution", f"one of {LENGTH_DISTRIBUTIONS}")
        if self.actions not in ("rating", "bitmask"):
            raise bad("actions", "'rating' or 'bitmask'")
        # User and item ids are 1..N, and the user_id / item vocabularies are N + 1 (see ID_LIMIT).
        for name in ("num_users", "num_items"):
            if not 1 <= getattr(self, name) < ID_LIMIT:
                raise bad(name, f"in 1..{ID_LIMIT - 1}")
        if not 1 <= self.num_topics <= self.num_items // 4:
            raise bad("num_topics", f"in 1..num_items // 4 = {self.num_items // 4} (at least 4 items per topic)")
        if not 1 <= self.min_length <= MAX_SYNTHETIC_LENGTH:
            raise bad("min_length", f"in 1..{MAX_SYNTHETIC_LENGTH}")
        if not self.min_length <= self.max_length <= MAX_SYNTHETIC_LENGTH:
            raise bad("max_length", f"in min_length = {self.min_length}..{MAX_SYNTHETIC_LENGTH}")
        if not 0 < self.mean_length <= MAX_SYNTHETIC_LENGTH:
            raise bad("mean_length", f"> 0 and <= {MAX_SYNTHETIC_LENGTH}")
        if not self.length_sigma > 0:
            raise bad("length_sigma", "> 0")
        if not self.length_std > 0:
            raise bad("length_std", "> 0")
        if not self.length_alpha > 1:
            raise bad("length_alpha", "> 1")
        if self.contextual_vocab is not None:
            self._validate_contextual_vocab()
        for name in ("transition_prob", "topic_drift"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "a probability in [0, 1]")
        if not self.zipf_exponent >= 0:
            raise bad("zipf_exponent", ">= 0")
        if self.seed < 0:
            raise bad("seed", ">= 0")
        if self.start_time < 0:
            raise bad("start_time", ">= 0 (unix seconds)")
        if not 1 <= self.time_span_days * 86400 <= 100 * 365 * 86400:
            raise bad("time_span_days", "between one second and 100 years")

    def _validate_contextual_vocab(self) -> None:
        vocab = self.contextual_vocab
        if not isinstance(vocab, dict):
            raise TypeError(f"contextual_vocab must be a dict of feature name -> vocabulary size, got {vocab!r}")
        for name, size in vocab.items():
            if not isinstance(name, str) or not name or name in ("item", "action"):
                raise ValueError(f"contextual_vocab: feature name {name!r} must be a non-empty string other than "
                                 "'item' and 'action'")
            if not isinstance(size, (int, np.integer)) or isinstance(size, (bool, np.bool_)) \
                    or not 1 <= size <= ID_LIMIT:
                raise ValueError(f"contextual_vocab[{name!r}] must be an integer vocabulary size in 1..{ID_LIMIT}, "
                                 f"got {size!r}")


@dataclass
class SyntheticData:
    config: SyntheticConfig
    offsets: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    action: np.ndarray
    user_id: np.ndarray
    contextual: list[ContextualFeature]
    action_spec: dict
    # Ground truth, for tests and diagnostics (not written to disk).
    item_topic: np.ndarray  # indexed by item id
    successors: np.ndarray  # (num_items + 1, 3), indexed by item id
    from_transition: np.ndarray  # (N,) bool: the event was a successor step

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1


def sample_lengths(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    n, lo, hi, mean = config.num_users, config.min_length, config.max_length, config.mean_length
    if config.length_distribution == "lognormal":
        mu = np.log(max(mean, 1.0)) - config.length_sigma**2 / 2
        raw = rng.lognormal(mu, config.length_sigma, n)
    elif config.length_distribution == "pareto":
        # lo * (1 + Lomax(a)) has mean lo * a / (a - 1); solve for the requested mean.
        shape = 1 + lo / max(mean - lo, 1e-6)
        raw = lo * (1 + rng.pareto(shape, n))
    elif config.length_distribution == "uniform":
        raw = rng.uniform(lo, hi + 1, n)
    elif config.length_distribution == "zipf":
        raw = (lo - 1) + rng.zipf(config.length_alpha, n).astype(np.float64)
    elif config.length_distribution == "normal":
        raw = np.rint(rng.normal(mean, config.length_std, n))
    else:
        raw = np.full(n, mean)
    return np.clip(np.floor(raw), lo, hi).astype(np.int64)


def _topic_tables(config: SyntheticConfig, rng: np.random.Generator):
    T, I = config.num_topics, config.num_items
    item_topic = np.zeros(I + 1, dtype=np.int64)
    item_topic[1:] = rng.permutation(np.arange(I) % T)
    # Popularity order inside each topic, concatenated topic after topic.
    by_topic = [np.flatnonzero(item_topic[1:] == t) + 1 for t in range(T)]
    popularity_order = [rng.permutation(items) for items in by_topic]
    items_by_popularity = np.concatenate(popularity_order)
    cdf_parts = []
    for t, items in enumerate(popularity_order):
        weights = 1.0 / np.arange(1, len(items) + 1) ** config.zipf_exponent
        cdf = np.cumsum(weights) / weights.sum()
        cdf[-1] = 1.0
        cdf_parts.append(t + cdf)
    topic_cdf = np.concatenate(cdf_parts)
    topic_end = np.cumsum([len(items) for items in by_topic])
    successors = np.zeros((I + 1, len(SUCCESSOR_PROBS)), dtype=np.int64)
    for items in by_topic:
        cycle = rng.permutation(items)
        for j in range(len(SUCCESSOR_PROBS)):
            successors[cycle, j] = np.roll(cycle, -(j + 1))
    return item_topic, items_by_popularity, topic_cdf, topic_end, successors


def generate(config: Optional[SyntheticConfig] = None, show_progress: bool = False, **overrides) -> SyntheticData:
    """Generate the synthetic dataset in memory (``generate(num_users=1000, max_length=32768, ...)``)."""
    config = dataclasses.replace(config or SyntheticConfig(), **overrides)
    config.validate()
    rng = np.random.default_rng(config.seed)
    U, T = config.num_users, config.num_topics
    item_topic, items_by_popularity, topic_cdf, topic_end, successors = _topic_tables(config, rng)

    lengths = sample_lengths(config, rng)
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])

    topic_weight = 1.0 / np.arange(1, T + 1) ** 0.7
    preference = rng.dirichlet(3.0 * topic_weight / topic_weight.sum(), size=U)
    preference = np.maximum(preference, 1e-12)
    preference /= preference.sum(axis=1, keepdims=True)

    # Simulate all users in lockstep, longest first, so that step t touches a prefix of the users.
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    active_at = np.searchsorted(-sorted_lengths, -np.arange(int(sorted_lengths[0]) if U else 0), side="left")
    pref_cdf = np.cumsum(preference[order], axis=1)
    pref_cdf[:, -1] = 1.0
    pref_cdf_flat = (pref_cdf + np.arange(U)[:, None]).ravel()
    row_start = offsets[:-1][order]

    def draw_topic(rows: np.ndarray) -> np.ndarray:
        hit = np.searchsorted(pref_cdf_flat, rows + rng.random(len(rows)), side="right")
        return np.minimum(hit - rows * T, T - 1)

    def draw_popular(topics: np.ndarray) -> np.ndarray:
        hit = np.searchsorted(topic_cdf, topics + rng.random(len(topics)), side="right")
        return items_by_popularity[np.minimum(hit, topic_end[topics] - 1)]

    item = np.zeros(total, dtype=np.int64)
    from_transition = np.zeros(total, dtype=bool)
    current_topic = draw_topic(np.arange(U))
    previous = np.zeros(U, dtype=np.int64)
    succ_cdf = np.cumsum(SUCCESSOR_PROBS)
    for t in tqdm(range(len(active_at)), desc="synthetic events", unit="step", disable=not show_progress):
        k = int(active_at[t])
        drift = np.flatnonzero(rng.random(k) < config.topic_drift)
        current_topic[drift] = draw_topic(drift)
        chosen = draw_popular(current_topic[:k])
        if t > 0:
            step = rng.random(k) < config.transition_prob
            which = np.minimum(np.searchsorted(succ_cdf, rng.random(k), side="right"), len(SUCCESSOR_PROBS) - 1)
            chosen = np.where(step, successors[previous[:k], which], chosen)
            from_transition[row_start[:k] + t] = step
        item[row_start[:k] + t] = chosen
        previous[:k] = chosen

    user_of_event = np.repeat(np.arange(U), lengths)
    affinity = preference[user_of_event, item_topic[item]] * T
    liking = np.tanh(np.log(affinity + 0.05) / 2) + 0.3 * from_transition
    noise = rng.normal(0.0, 0.8, total)
    if config.actions == "rating":
        rating = np.clip(np.rint(3.3 + 1.2 * liking + noise), 1, 5).astype(np.int64)
        action = rating - 1
        action_spec = rating_action_spec(5, "rating - 1 (synthetic ratings 1..5, correlated with topic affinity)")
    else:
        action = _bitmask_actions(liking + 0.5 * noise, rng)
        action_spec = bitmask_action_spec()

    timestamp = _timestamps(config, lengths, offsets, rng)
    user_id = np.arange(1, U + 1, dtype=np.int64)
    activity = np.searchsorted(np.quantile(lengths, np.linspace(0, 1, NUM_ACTIVITY_LEVELS + 1)[1:-1]), lengths, side="right")
    if config.contextual_vocab is None:
        contextual = [
            ContextualFeature("user_id", user_id, U + 1),
            ContextualFeature("activity_level", activity.astype(np.int64), NUM_ACTIVITY_LEVELS,
                              [f"sequence-length quintile {q}" for q in range(NUM_ACTIVITY_LEVELS)]),
        ]
    else:
        contextual = [ContextualFeature(name, rng.integers(0, int(size), U, dtype=np.int64), int(size))
                      for name, size in config.contextual_vocab.items()]
        # A contextual user_id is the user id column itself (processed.write_user_columns).
        user_id = next((f.values for f in contextual if f.name == "user_id"), user_id)
    return SyntheticData(config, offsets, item, timestamp, action, user_id, contextual, action_spec,
                         item_topic, successors, from_transition)


def _bitmask_actions(score: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    def bernoulli(logit):
        return rng.random(len(score)) < 1.0 / (1.0 + np.exp(-logit))

    click = bernoulli(2.0 * score)
    like = click & bernoulli(2.0 * score - 2.5)
    follow = click & bernoulli(1.5 * score - 4.0)
    comment = click & bernoulli(1.5 * score - 3.5)
    forward = click & bernoulli(1.5 * score - 4.0)
    hate = bernoulli(-2.5 * score - 4.0)
    long_view = bernoulli(2.5 * score - 0.5)
    profile_enter = click & bernoulli(score - 3.0)
    flags = (click, like, follow, comment, forward, hate, long_view, profile_enter)
    return sum(flag.astype(np.int64) << bit for bit, flag in enumerate(flags))


def _timestamps(config: SyntheticConfig, lengths: np.ndarray, offsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    total = int(offsets[-1])
    new_session = rng.random(total) < 0.12
    gaps = np.where(
        new_session,
        rng.lognormal(np.log(12 * 3600.0), 1.2, total),
        1.0 + rng.exponential(90.0, total),
    ).astype(np.int64)
    gaps[offsets[:-1][lengths > 0]] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[offsets[:-1]], lengths)
    start = config.start_time + rng.integers(0, int(config.time_span_days * 86400), len(lengths))
    return np.repeat(start, lengths) + elapsed


def write_synthetic(out_dir: str, config: Optional[SyntheticConfig] = None, overwrite: bool = False,
                    show_progress: bool = True, **overrides) -> dict:
    """Generate and write the synthetic dataset in the processed format; returns the metadata."""
    started = time.perf_counter()
    data = generate(config, show_progress=show_progress, **overrides)
    generated_s = time.perf_counter() - started
    extra = {"item_ids": "1..num_items (0 unused)", "synthetic": _config_record(data.config),
             "generation_seconds": round(generated_s, 3)}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        return write_in_memory(
            tmp, dataset="synthetic", offsets=data.offsets, item=data.item, timestamp=data.timestamp,
            action=data.action, user_id=data.user_id, contextual=data.contextual, action_spec=data.action_spec,
            extra=extra,
        )


# Options that shape the data only when set (their length distribution, or contextual_vocab): at their defaults they
# are left out of the record in metadata.json.
_OPTIONAL_FIELDS = ("length_std", "length_alpha", "contextual_vocab")


def _config_record(config: SyntheticConfig) -> dict:
    record = dataclasses.asdict(config)
    defaults = SyntheticConfig()
    for name in _OPTIONAL_FIELDS:
        if record[name] == getattr(defaults, name):
            del record[name]
    return record
