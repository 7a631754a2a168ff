"""The paged KV cache manager (hstu.inference.paged_cache) against a plain dict-of-tensors model: sequences of
appends, replacements, evictions and lookups under a byte budget keep every user's rows, the LRU order, the evicted
users and the byte count of the model; bad requests change nothing; the page tables read through
cached_hstu_attention's paged layout give the contiguous result."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.inference.errors import CacheBudgetError, InvalidRequestError, SequenceTooLongError, UnknownUserError
from hstu.inference.paged_cache import PagedKVCache
from hstu.ops.cached_attention import cached_hstu_attention, gather_pages

LAYERS, HEADS, DQK, DV = 2, 2, 4, 3


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, HEADS, DQK, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(n, HEADS, DV, generator=g) for _ in range(LAYERS)]
    return keys, values


class _Model:
    """Users' rows as whole tensors, LRU order, and the budget in pages."""

    def __init__(self, page_size, max_pages, max_tokens):
        self.page_size, self.max_pages, self.max_tokens = page_size, max_pages, max_tokens
        self.rows: "OrderedDict[int, tuple[list, list]]" = OrderedDict()

    def pages(self, n):
        return -(-n // self.page_size)

    def append(self, updates, replace):
        lengths = {u: (0 if u in replace else self.rows[u][0][0].shape[0] if u in self.rows else 0) + k[0].shape[0]
                   for u, (k, _) in updates.items()}
        if any(n > self.max_tokens for n in lengths.values()):
            raise SequenceTooLongError
        if self.max_pages is not None and sum(map(self.pages, lengths.values())) > self.max_pages:
            raise CacheBudgetError
        for u in replace:
            self.rows.pop(u, None)
        used = sum(self.pages(k[0].shape[0]) for u, (k, _) in self.rows.items() if u not in updates)
        evicted = []
        while self.max_pages is not None and used + sum(map(self.pages, lengths.values())) > self.max_pages:
            u = next(u for u in self.rows if u not in updates)
            used -= self.pages(self.rows.pop(u)[0][0].shape[0])
            evicted.append(u)
        for u, (k, v) in updates.items():
            old = self.rows.pop(u, None)
            if old is not None:
                k = [torch.cat([a, b]) for a, b in zip(old[0], k)]
                v = [torch.cat([a, b]) for a, b in zip(old[1], v)]
            self.rows[u] = (k, v)
        return evicted

    def total_pages(self):
        return sum(self.pages(k[0].shape[0]) for k, _ in self.rows.values())


_operations = st.lists(st.one_of(
    st.tuples(st.just("append"), st.dictionaries(st.integers(0, 5), st.integers(0, 40), min_size=1, max_size=3),
              st.sets(st.integers(0, 5), max_size=1)),
    st.tuples(st.just("evict"), st.integers(0, 5)),
    st.tuples(st.just("lookup"), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(page_size=st.sampled_from([16, 32, 64]), budget_pages=st.sampled_from([None, 1, 3, 6]), ops=_operations,
       seed=st.integers(0, 2**16))
def test_paged_cache_matches_a_dict_model(page_size, budget_pages, ops, seed):
    cache = PagedKVCache(LAYERS, HEADS, DQK, DV, page_size=page_size, max_tokens=90, initial_pages=1,
                         max_bytes=None if budget_pages is None else budget_pages * page_size * LAYERS * HEADS *
                         (DQK + DV) * 4)  # fmt: skip
    model = _Model(page_size, budget_pages, 90)
    for step, op in enumerate(ops):
        if op[0] == "append":
            _, sizes, replace = op
            replace = {u for u in replace if u in sizes}
            updates = {u: _rows(n, seed + 97 * step + u) for u, n in sizes.items()}
            try:
                expected = model.append(updates, replace)
            except (SequenceTooLongError, CacheBudgetError) as err:
                before = (cache.users(), cache.total_bytes, {u: cache.gather(u, 1) for u in cache.users()})
                with pytest.raises(type(err)):
                    cache.append(updates, replace=replace)
                after = (cache.users(), cache.total_bytes, {u: cache.gather(u, 1) for u in cache.users()})
                assert before[:2] == after[:2]
                assert all(torch.equal(a, b) for u in before[2] for a, b in zip(before[2][u], after[2][u]))
                continue
            assert cache.append(updates, replace=replace) == expected
        elif op[0] == "evict":
            if op[1] in model.rows:
                model.rows.pop(op[1])
                cache.evict(op[1])
            else:
                with pytest.raises(UnknownUserError):
                    cache.evict(op[1])
        else:
            users = op[1]
            if all(u in model.rows for u in users):
                for u in users:
                    model.rows.move_to_end(u)
                table, offsets = cache.lookup(users)
                for layer in range(LAYERS):
                    got = gather_pages(cache.keys[layer], table, offsets, page_size)
                    assert torch.equal(got, torch.cat([model.rows[u][0][layer] for u in users]))
            else:
                before = cache.users()
                with pytest.raises(UnknownUserError):
                    cache.lookup(users)
                assert cache.users() == before
        assert cache.users() == list(model.rows)
        assert cache.total_bytes == model.total_pages() * cache.page_bytes
        if budget_pages is not None:
            assert cache.total_bytes <= cache.max_bytes
        for u, (keys, values) in model.rows.items():
            assert cache.length(u) == keys[0].shape[0]
            for layer in range(LAYERS):
                k, v = cache.gather(u, layer)
                assert torch.equal(k, keys[layer]) and torch.equal(v, values[layer])
        assert len({p for u in cache.users() for p in cache.pages(u)}) == cache.pages_in_use  # no page shared


def test_paged_attention_equals_contiguous_attention():
    """cached_hstu_attention over the cache's page tables equals the call over the users' concatenated rows."""
    cache = PagedKVCache(1, HEADS, DQK, DQK, page_size=16, max_tokens=200)
    lengths = {7: 40, 3: 0, 9: 17}
    g = torch.Generator().manual_seed(0)
    for u, n in lengths.items():  # interleaved appends: the users' pages alternate in the pool
        for part in (n // 2, n - n // 2):
            keys, values = [torch.randn(part, HEADS, DQK, generator=g)], [torch.randn(part, HEADS, DQK, generator=g)]
            cache.append({u: (keys, values)})
    users = [9, 3, 7]
    table, offsets = cache.lookup(users)
    q, k, v = (torch.randn(6, HEADS, DQK, generator=g) for _ in range(3))
    delta = torch.tensor([0, 2, 3, 6])
    kwargs = dict(alpha=0.5, scaling_seqlen=50, num_targets=torch.tensor([2, 1, 3]))
    paged = cached_hstu_attention(q, k, v, delta, cache.keys[0], cache.values[0], offsets, page_table=table,
                                  page_size=16, **kwargs)
    ck = torch.cat([cache.gather(u, 0)[0] for u in users])
    cv = torch.cat([cache.gather(u, 0)[1] for u in users])
    assert torch.equal(paged, cached_hstu_attention(q, k, v, delta, ck, cv, offsets, **kwargs))


@pytest.mark.parametrize("change, error, message", [
    (dict(page_table=torch.tensor([[5]], dtype=torch.int32)), ValueError, "page_table\\[0, 0\\]=5"),
    (dict(page_table=torch.tensor([[0]], dtype=torch.int32), page_size=8), ValueError, "page_table has 1 pages"),
    (dict(page_size=24), ValueError, "power of two"),
    (dict(page_table=torch.tensor([0]), page_size=16), ValueError, "page_table must be"),
    (dict(page_table=torch.tensor([[0.0]])), TypeError, "page_table must be int32"),
    (dict(page_table=None, cache_offsets=torch.tensor([0, 32])), ValueError, "page_size=16 is given without"),
])
def test_bad_page_tables_are_named(change, error, message):
    args = dict(q=torch.zeros(1, 1, 4), k=torch.zeros(1, 1, 4), v=torch.zeros(1, 1, 4), delta_offsets=torch.tensor([0, 1]),
                cached_k=torch.zeros(32, 1, 4), cached_v=torch.zeros(32, 1, 4), cache_offsets=torch.tensor([0, 10]),
                alpha=1.0, scaling_seqlen=5, page_table=torch.tensor([[1]], dtype=torch.int32), page_size=16)
    args.update(change)
    with pytest.raises(error, match=message):
        cached_hstu_attention(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=24), "page_size"), (dict(max_bytes=10), "less than one page"), (dict(dtype=torch.int32), "dtype"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_construction_is_named(kwargs, message):
    args = dict(page_size=16, max_tokens=10)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        PagedKVCache(LAYERS, HEADS, DQK, DV, **args)


def test_bad_rows_change_nothing():
    cache = PagedKVCache(LAYERS, HEADS, DQK, DV, page_size=16, max_tokens=50)
    cache.append({1: _rows(5, 0)})
    keys, values = _rows(3, 1)
    with pytest.raises(InvalidRequestError, match="values\\[1\\]"):
        cache.append({2: _rows(4, 2), 1: (keys, [values[0], values[1][:, :1]])})
    assert cache.users() == [1] and cache.length(1) == 5 and cache.pages_in_use == 1
