"""Cached inference: scores from the per-user caches equal the training model's full recompute (retrieval and
ranking, incremental appends and cache rebuilds), and bad requests are named errors that change no cache."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.inference import (
    CacheBudgetError,
    InvalidRequestError,
    SequenceTooLongError,
    UnknownUserError,
    UnsupportedModelError,
    UserEvents,
)
from tests.inference.conftest import build_inference_model

# (config, overrides): the retrieval config (relative bias, absolute positions: appends extend the cache), the
# ranking config (reverse positions, input time buckets, a masked contextual token: appends rebuild the cache) and
# a ranking variant whose appends extend the cache (relative bias with shared candidate positions, candidate groups).
MODELS = {
    "retrieval": ("synthetic_retrieval.gin", ["RetrievalArgs.l2_normalize=True"]),
    "ranking": ("synthetic_ranking.gin", ["DatasetArgs.num_candidates=3"]),
    "ranking_incremental": ("synthetic_ranking.gin", [
        "DatasetArgs.num_candidates=4", "NetworkArgs.position_encoding='absolute'", "NetworkArgs.num_time_buckets=0",
        "NetworkArgs.relative_attention_bias=True", "NetworkArgs.contextual_mask=False",
        "NetworkArgs.target_group_size=2", "NetworkArgs.num_layers=2"]),
}


@pytest.fixture(scope="module")
def models(tiny_data):
    built = {}
    for name, (config, overrides) in MODELS.items():
        data = tiny_data / ("rating" if "retrieval" in config else "bitmask")
        built[name] = build_inference_model(config, data, overrides)
    return built


def _events(model, user, draw_ints, count, start_time):
    items = torch.tensor(draw_ints(count, 1, 80))
    times = start_time + torch.tensor(sorted(draw_ints(count, 0, 200_000)))
    actions = torch.tensor(draw_ints(count, 0, 255)) if model.ranking else None
    contextual = torch.tensor([hash(user) % 4]) if model.num_contextual and model.peek(user) is None else None
    return UserEvents(user, items, times, actions, contextual)


def _fresh(model, cache_bytes=None):
    model.clear(cache_bytes)
    return model


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), data=st.data())
def test_cached_scores_equal_full_recompute(models, name, data):
    model = _fresh(models[name])
    users = ["u0", "u1", "u2"][: data.draw(st.integers(1, 3))]

    def draw_ints(n, low, high):
        return data.draw(st.lists(st.integers(low, high - 1), min_size=n, max_size=n))

    rounds = data.draw(st.integers(1, 3))
    room = model.cache.max_tokens - model.num_contextual
    budget = room // 2 if model.ranking else room  # events that fit
    for step in range(rounds):
        batch = []
        for user in users:
            cache = model.peek(user)
            used = cache.num_events if cache else 0
            left = budget - used - (rounds - step - 1)
            if left < 1:
                continue
            count = data.draw(st.integers(1, min(left, 4)))
            batch.append(_events(model, user, draw_ints, count, 300_000 * (step + 1)))
        model.append(batch)
    if model.ranking:
        counts = [data.draw(st.integers(0, 9)) for _ in users]
        candidates = [torch.tensor(draw_ints(n, 0, 80), dtype=torch.int64) for n in counts]
        times = [1_000_000 + torch.arange(n) for n in counts]
        cached, full = model.rank(users, candidates, times), model.rank_full(users, candidates, times)
        for user, n, a, b in zip(users, counts, cached, full):
            assert a.shape == b.shape == (n, model.model.loss.num_outputs)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} user {user}")
    else:
        k = data.draw(st.integers(1, 20))
        filter_seen = data.draw(st.booleans())
        scores, ids = model.retrieve(users, k, filter_seen)
        full_scores, full_ids = model.retrieve_full(users, k, filter_seen)
        torch.testing.assert_close(scores, full_scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids == -1, full_ids == -1)
        if filter_seen:
            for b, user in enumerate(users):
                assert not set(ids[b].tolist()) & set(model.peek(user).items.tolist())


def test_candidates_do_not_see_each_other(models):
    """M-FALCON: with group size 1 a candidate's probability does not depend on the other candidates; with group
    size 2 the second of a group sees the first (causally), no other candidate."""
    for name, partner_matters in (("ranking", False), ("ranking_incremental", True)):
        model = _fresh(models[name])
        model.append([UserEvents("u", torch.tensor([5, 6, 7]), torch.tensor([10, 20, 30]), torch.tensor([1, 2, 3]),
                                 torch.tensor([1]))])
        times = [torch.tensor([40, 40, 40, 40])]
        first = model.rank(["u"], [torch.tensor([11, 12, 13, 14])], times)[0]
        second = model.rank(["u"], [torch.tensor([40, 12, 50, 14])], times)[0]  # the first of each group changed
        assert not torch.equal(first[0], second[0]) and not torch.equal(first[2], second[2])
        assert torch.equal(first[1], second[1]) != partner_matters
        assert torch.equal(first[3], second[3]) != partner_matters


def _snapshot(model):
    """Every cached user's events, keys / values of every layer and last output."""
    snapshot = {}
    for user in model.cache.users():
        entry = model.peek(user)
        rows = [t for layer in range(model.cache.num_layers) for t in model.cache.gather(user, layer)]
        snapshot[user] = [t.clone() for t in (entry.items, *rows, entry.last_output)]
    return snapshot


def _same(a, b):
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[u], b[u])) for u in a)


def test_bad_requests_are_named_and_change_no_cache(models):
    model = _fresh(models["ranking_incremental"])
    model.append([UserEvents("a", torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1])),
                  UserEvents("b", torch.tensor([3]), torch.tensor([5]), torch.tensor([2]), torch.tensor([2]))])
    before, order = _snapshot(model), model.cache.users()
    good = UserEvents("a", torch.tensor([4]), torch.tensor([9]), torch.tensor([1]))
    too_long = model.cache.max_tokens  # events: two tokens each, so this is about twice the maximum
    bad_appends = [
        (UnknownUserError, lambda: model.rank(["a", "nobody"], [torch.tensor([1]), torch.tensor([2])])),
        (InvalidRequestError, lambda: model.rank(["a"], [torch.tensor([model.table_sizes["item"]])])),
        (InvalidRequestError, lambda: model.rank(["a"], [torch.tensor([-1])])),
        (InvalidRequestError, lambda: model.append([good, UserEvents("b", torch.tensor([1000]), torch.tensor([9]),
                                                                     torch.tensor([1]))])),
        (SequenceTooLongError, lambda: model.append([good, UserEvents("b", torch.ones(too_long, dtype=torch.int64),
                                                                      torch.arange(too_long),
                                                                      torch.zeros(too_long, dtype=torch.int64))])),
        (InvalidRequestError, lambda: model.append([good, UserEvents("c", torch.tensor([1]), torch.tensor([1]),
                                                                     torch.tensor([1]))])),  # no contextual ids
        (InvalidRequestError, lambda: model.append([good, good])),
        (InvalidRequestError, lambda: model.append([UserEvents("a", torch.tensor([1.5]), torch.tensor([1]),
                                                               torch.tensor([1]))])),
        (InvalidRequestError, lambda: model.retrieve(["a"], k=3)),
    ]
    for error, request in bad_appends:
        with pytest.raises(error, match="user|candidates|retrieve|more than once"):
            request()
        assert _same(_snapshot(model), before) and model.cache.users() == order


def test_lru_eviction_under_the_byte_budget(models):
    model = _fresh(models["retrieval"])
    one = UserEvents("x", torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3]))
    model.append([one])
    size = model.cache.total_bytes  # one page
    model = _fresh(model, cache_bytes=2 * size + size // 2)  # room for two such users
    model.append([one])
    model.append([UserEvents("y", one.items, one.timestamps)])
    model.retrieve(["x"], k=2)  # x is now the most recently used
    evicted = model.append([UserEvents("z", one.items, one.timestamps)])
    assert evicted == ["y"] and model.cache.users() == ["x", "z"] and model.cache.total_bytes <= model.cache.max_bytes
    with pytest.raises(UnknownUserError, match="'y'"):
        model.retrieve(["y"], k=2)
    before = _snapshot(model)
    many = [UserEvents(f"n{i}", one.items, one.timestamps) for i in range(3)]
    with pytest.raises(CacheBudgetError, match="budget"):
        model.append(many)
    assert _same(_snapshot(model), before)


def test_unsupported_models_are_refused(tiny_data):
    with pytest.raises(UnsupportedModelError, match="rab_time_reference"):
        build_inference_model("synthetic_retrieval.gin", tiny_data / "rating", ["NetworkArgs.rab_time_reference='next'"])
