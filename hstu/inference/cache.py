"""Per-user key/value caches of the HSTU layers, with LRU eviction under a byte budget.

A :class:`UserCache` holds what scoring and appending need for one user: the raw events (so that a model whose
token encodings depend on the whole history can rebuild the cache exactly), the keys and values of every layer for
every token of the user's sequence, the token times (relative attention bias) and the encoder output at the last
event. :class:`KVCache` maps user ids to them.

Updates are transactional: :meth:`KVCache.commit` first checks the whole request (every sequence within
``max_tokens``, the request's caches within the budget) and only then replaces entries and evicts the least
recently used other users until the budget holds again. A request that fails leaves every cache as it was.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional

import torch

from hstu.inference.errors import CacheBudgetError, SequenceTooLongError, UnknownUserError


@dataclass
class UserCache:
    items: torch.Tensor  # (E,) int64 item ids of the user's events, oldest first
    timestamps: torch.Tensor  # (E,) int64 seconds
    actions: Optional[torch.Tensor]  # (E,) int64 action ids (ranking), else None
    contextual: Optional[torch.Tensor]  # (C,) int64 contextual feature ids, in the model's feature order
    keys: list[torch.Tensor]  # per layer (P, H, Dqk) for the P tokens of the user's sequence
    values: list[torch.Tensor]  # per layer (P, H, Dv)
    token_times: torch.Tensor  # (P,) int64 time of every token
    last_output: torch.Tensor  # (D,) encoder output at the last event's token

    @property
    def num_tokens(self) -> int:
        return int(self.token_times.numel())

    @property
    def num_events(self) -> int:
        return int(self.items.numel())

    @property
    def nbytes(self) -> int:
        tensors = [self.items, self.timestamps, self.actions, self.contextual, self.token_times, self.last_output,
                   *self.keys, *self.values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCache:
    """User id -> :class:`UserCache`, least recently used first; at most ``max_bytes`` in all (None: no limit) and
    at most ``max_tokens`` tokens per user."""

    def __init__(self, max_bytes: Optional[int], max_tokens: int):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.max_tokens = int(max_tokens)
        self._entries: "OrderedDict[Hashable, UserCache]" = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, user: Hashable) -> bool:
        return user in self._entries

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def users(self) -> list:
        """User ids, least recently used first."""
        return list(self._entries)

    def peek(self, user: Hashable) -> Optional[UserCache]:
        """The user's cache or None, without counting as a use."""
        return self._entries.get(user)

    def lookup(self, users: Iterable[Hashable]) -> list[UserCache]:
        """The caches of ``users`` (all of them known, else :class:`UnknownUserError` and no change); marks them
        as the most recently used."""
        users = list(users)
        missing = [u for u in users if u not in self._entries]
        if missing:
            raise UnknownUserError(f"user {missing[0]!r} has no cache (never appended to, or evicted under the "
                                   f"cache budget of {self.max_bytes} bytes); append its events first")
        for user in users:
            self._entries.move_to_end(user)
        return [self._entries[u] for u in users]

    def check_tokens(self, user: Hashable, num_tokens: int, what: str) -> None:
        if num_tokens > self.max_tokens:
            raise SequenceTooLongError(f"user {user!r}: {what} makes {num_tokens} tokens, more than the model's "
                                       f"maximum of {self.max_tokens}")

    def commit(self, updates: dict) -> list:
        """Replace the caches of ``updates`` ({user: UserCache}) in one step; returns the users evicted to keep the
        budget. Raises (changing nothing) when a sequence is too long or the updates alone exceed the budget."""
        for user, entry in updates.items():
            self.check_tokens(user, entry.num_tokens, "the update")
        needed = sum(entry.nbytes for entry in updates.values())
        if self.max_bytes is not None and needed > self.max_bytes:
            raise CacheBudgetError(f"the caches of users {list(updates)[:5]} take {needed} bytes, more than the whole "
                                   f"cache budget of {self.max_bytes} bytes; raise the budget or send fewer users")
        for user, entry in updates.items():
            old = self._entries.pop(user, None)
            self._bytes -= old.nbytes if old is not None else 0
            self._entries[user] = entry
            self._bytes += entry.nbytes
        evicted = []
        while self.max_bytes is not None and self._bytes > self.max_bytes:
            user = next(u for u in self._entries if u not in updates)  # exists: the updates alone fit
            self._bytes -= self._entries.pop(user).nbytes
            evicted.append(user)
        return evicted

    def evict(self, user: Hashable) -> None:
        entry = self._entries.pop(user, None)
        if entry is None:
            raise UnknownUserError(f"user {user!r} has no cache to evict")
        self._bytes -= entry.nbytes
