"""Paged key/value caches of the HSTU layers: one pool of fixed-size pages per layer, a page table per user.

Every layer has a key pool (pages * page_size, H, Dqk) and a value pool (pages * page_size, H, Dv) on one device and
in one dtype; page i holds pool rows [i * page_size, (i + 1) * page_size). A user owns a list of pages (its page
table, the same page numbers in every layer): cached row r of the user is pool row
``pages[r // page_size] * page_size + r % page_size``, the layout ``cached_hstu_attention(page_table=...,
page_size=...)`` reads. Appending writes the new rows into the user's last page and into freshly taken pages;
evicting returns the user's pages to the free list. No call copies or moves another user's rows.

The byte budget counts pages held (every layer's keys and values of a page: :attr:`PagedKVCache.page_bytes`); with a
budget the pools are allocated once at their full size (``max_bytes // page_bytes`` pages), without one they grow by
doubling (the only copy of cached rows, amortised over the appends). Updates are transactional: :meth:`append` checks
the whole request first (every user within ``max_tokens``, the request's pages within the budget) and only then
evicts the least recently used other users until the pages fit, and writes. A request that fails changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable, Optional, Sequence

import torch

from hstu.inference.errors import CacheBudgetError, InvalidRequestError, SequenceTooLongError, UnknownUserError

PAGE_SIZES = (16, 32, 64)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class PagedKVCache:
    """Per-layer page pools and per-user page tables; users least recently used first.

    num_layers, heads, dim_qk, dim_v: the shapes of the layers' keys / values; page_size: rows per page (16, 32 or
    64); max_bytes: the budget of the pages held (None: unbounded); max_tokens: the most rows one user may hold."""

    def __init__(self, num_layers: int, heads: int, dim_qk: int, dim_v: int, *, page_size: int = 32,
                 max_bytes: Optional[int] = None, max_tokens: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", initial_pages: int = 8):
        self.num_layers = _positive_int("num_layers", num_layers)
        self.heads, self.dim_qk, self.dim_v = (_positive_int(n, v) for n, v in
                                               (("heads", heads), ("dim_qk", dim_qk), ("dim_v", dim_v)))
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.page_size, self.dtype, self.device = page_size, dtype, torch.device(device)
        self.max_tokens = _positive_int("max_tokens", max_tokens)
        element = torch.empty(0, dtype=dtype).element_size()
        self.page_bytes = page_size * self.num_layers * self.heads * (self.dim_qk + self.dim_v) * element
        if max_bytes is not None:
            _positive_int("max_bytes", max_bytes)
            if max_bytes < self.page_bytes:
                raise ValueError(f"max_bytes={max_bytes} is less than one page ({self.page_bytes} bytes: "
                                 f"{page_size} rows of {self.num_layers} layers' keys and values)")
        self.max_bytes = max_bytes
        self.max_pages = None if max_bytes is None else max_bytes // self.page_bytes
        capacity = self.max_pages if self.max_pages is not None else _positive_int("initial_pages", initial_pages)
        self.keys = [self._pool(capacity, self.dim_qk) for _ in range(self.num_layers)]
        self.values = [self._pool(capacity, self.dim_v) for _ in range(self.num_layers)]
        self._free = list(range(capacity - 1, -1, -1))  # pop() takes the lowest free page
        self._pages: "OrderedDict[Hashable, list[int]]" = OrderedDict()
        self._lengths: dict[Hashable, int] = {}

    def _pool(self, pages: int, dim: int) -> torch.Tensor:
        return torch.zeros(pages * self.page_size, self.heads, dim, dtype=self.dtype, device=self.device)

    # ---- queries -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, user: Hashable) -> bool:
        return user in self._pages

    @property
    def capacity(self) -> int:
        """Pages of every pool."""
        return self.keys[0].shape[0] // self.page_size

    @property
    def pages_in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def total_bytes(self) -> int:
        return self.pages_in_use * self.page_bytes

    def users(self) -> list:
        """User ids, least recently used first."""
        return list(self._pages)

    def length(self, user: Hashable) -> int:
        self._require([user])
        return self._lengths[user]

    def pages(self, user: Hashable) -> list[int]:
        self._require([user])
        return list(self._pages[user])

    def _require(self, users: Sequence[Hashable]) -> None:
        missing = [u for u in users if u not in self._pages]
        if missing:
            raise UnknownUserError(f"user {missing[0]!r} has no cache (never appended to, or evicted under the "
                                   f"cache budget of {self.max_bytes} bytes); append its events first")

    def touch(self, users: Iterable[Hashable]) -> None:
        """Marks ``users`` as the most recently used; unknown users raise :class:`UnknownUserError` and change
        nothing."""
        users = list(users)
        self._require(users)
        for user in users:
            self._pages.move_to_end(user)

    def lookup(self, users: Iterable[Hashable], *, touch: bool = True,
               unknown_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(page_table (B, max pages) int32, cache_offsets (B + 1) int32) of ``users`` on the pools' device, as
        ``cached_hstu_attention`` takes them (unused slots -1); with ``touch`` marks the users as the most recently
        used. Unknown users raise :class:`UnknownUserError` and change nothing, or with ``unknown_empty`` read as
        users with no cached rows."""
        users = list(users)
        if touch:
            self.touch(users)
        elif not unknown_empty:
            self._require(users)
        pages = [self._pages.get(u, []) for u in users]
        width = max([len(p) for p in pages], default=0)
        table = torch.full((len(users), width), -1, dtype=torch.int32)
        for b, owned in enumerate(pages):
            table[b, :len(owned)] = torch.tensor(owned, dtype=torch.int32)
        lengths = torch.tensor([0] + [self._lengths.get(u, 0) for u in users], dtype=torch.int64)
        offsets = lengths.cumsum(0).to(torch.int32)
        return table.to(self.device, non_blocking=True), offsets.to(self.device, non_blocking=True)

    def rows(self, user: Hashable) -> torch.Tensor:
        """(length,) int64 pool rows of the user's cached rows, oldest first (on the pools' device)."""
        self._require([user])
        pages = torch.tensor(self._pages[user], dtype=torch.int64).repeat_interleave(self.page_size)
        within = torch.arange(pages.numel()) % self.page_size
        return (pages * self.page_size + within)[:self._lengths[user]].to(self.device)

    def gather(self, user: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer for the user's cached rows, as contiguous copies."""
        rows = self.rows(user)
        return self.keys[layer][rows], self.values[layer][rows]

    # ---- updates -------------------------------------------------------------------------------------------------
    def _pages_for(self, length: int) -> int:
        return (length + self.page_size - 1) // self.page_size

    def _check_rows(self, user: Hashable, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> int:
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise InvalidRequestError(f"user {user!r}: keys and values of {self.num_layers} layers expected, got "
                                      f"{len(keys)} and {len(values)}")
        rows = None
        for name, tensors, dim in (("keys", keys, self.dim_qk), ("values", values, self.dim_v)):
            for layer, t in enumerate(tensors):
                if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != (self.heads, dim):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise InvalidRequestError(f"user {user!r}: {name}[{layer}] must be (n, {self.heads}, {dim}), "
                                              f"got {shape}")
                rows = t.shape[0] if rows is None else rows
                if t.shape[0] != rows:
                    raise InvalidRequestError(f"user {user!r}: {name}[{layer}] has {t.shape[0]} rows, the other "
                                              f"layers {rows}")
        return int(rows)

    def append(self, updates: dict, replace: Iterable[Hashable] = ()) -> list:
        """Append rows to users' caches in one step: ``updates`` maps a user to (keys, values), per layer (n, H, D);
        a user without a cache (or one in ``replace``: its old rows are dropped first) starts one. Returns the users
        evicted (least recently used first) to free pages. Raises, changing nothing, when a user would pass
        ``max_tokens`` or the request's pages alone exceed the budget."""
        replace = set(replace)
        unknown = [u for u in replace if u not in updates]
        if unknown:
            raise InvalidRequestError(f"replace names user {unknown[0]!r}, which the update does not include")
        plan = {}  # user -> (old length, new rows)
        for user, (keys, values) in updates.items():
            old = 0 if user in replace else self._lengths.get(user, 0)
            n = self._check_rows(user, keys, values)
            if old + n > self.max_tokens:
                raise SequenceTooLongError(f"user {user!r}: the update makes {old + n} tokens, more than the "
                                           f"maximum of {self.max_tokens}")
            plan[user] = (old, n)
        needed = sum(self._pages_for(old + n) for old, n in plan.values())
        if self.max_pages is not None and needed > self.max_pages:
            raise CacheBudgetError(f"the caches of users {list(updates)[:5]} take {needed * self.page_bytes} bytes "
                                   f"({needed} pages), more than the whole cache budget of {self.max_bytes} bytes; "
                                   "raise the budget or send fewer users")
        for user in replace:
            if user in self._pages:
                self._release(user)
        fresh = sum(self._pages_for(old + n) - len(self._pages.get(user, [])) for user, (old, n) in plan.items())
        evicted = []
        while self.max_pages is not None and fresh > len(self._free):
            user = next(u for u in self._pages if u not in updates)  # exists: the request alone fits
            self._release(user)
            evicted.append(user)
        if fresh > len(self._free):
            self._grow(self.pages_in_use + fresh)
        for user, (old, n) in plan.items():
            pages = self._pages.setdefault(user, [])
            self._pages.move_to_end(user)
            while len(pages) < self._pages_for(old + n):
                pages.append(self._free.pop())
            self._lengths[user] = old + n
            if n == 0:
                continue
            rows = self.rows(user)[old:]
            keys, values = updates[user]
            for layer in range(self.num_layers):
                self.keys[layer][rows] = keys[layer].to(device=self.device, dtype=self.dtype)
                self.values[layer][rows] = values[layer].to(device=self.device, dtype=self.dtype)
        return evicted

    def _release(self, user: Hashable) -> None:
        self._free.extend(reversed(self._pages.pop(user)))
        del self._lengths[user]

    def _grow(self, pages: int) -> None:
        old = self.capacity
        new = max(pages, 2 * old)
        for pools, dim in ((self.keys, self.dim_qk), (self.values, self.dim_v)):
            for layer, pool in enumerate(pools):
                grown = self._pool(new, dim)
                grown[:pool.shape[0]] = pool
                pools[layer] = grown
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def evict(self, user: Hashable) -> None:
        if user not in self._pages:
            raise UnknownUserError(f"user {user!r} has no cache to evict")
        self._release(user)
