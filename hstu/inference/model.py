"""Cached incremental inference of a trained HSTU model (M-FALCON scoring).

The keys and values of every HSTU layer for every token of a user's sequence live in a
:class:`~hstu.inference.paged_cache.PagedKVCache` (per-layer page pools on the model's device, a page table per user,
LRU under a byte budget of pool pages); a :class:`UserCache` per user keeps the rest (the events, token times, the
encoder output at the last event). The layers read the cache in place through ``lookup()``'s page table. The model,
the pools and every tensor a request computes with are on the model's device; the events' bookkeeping stays on the
host, so a request reads nothing back from the device except its results. ``dtype`` is the compute dtype (autocast,
as the trainer's mixed precision) and the pools' dtype. Two entry points use the cache:

* :meth:`InferenceModel.append`: new events of users go through the layers as new rows attending to their cache
  (``hstu.ops.cached_hstu_attention``); their keys / values extend the cache. A model whose token encodings or
  masks depend on the whole history (reverse positions, input time buckets, contextual tokens with the contextual
  mask, which see every history token) cannot extend a cache exactly: for those, an append rebuilds the user's cache
  from the stored events in one pass of the training encoder (still exact; it costs a history forward).
* :meth:`InferenceModel.rank` (ranking: task probabilities of candidates) and :meth:`InferenceModel.retrieve`
  (retrieval: top-K of the catalogue with the user's seen items filtered out). Ranking candidates are target rows
  that see the history and their own group of ``target_group_size`` (1: themselves, not each other), exactly as
  in training, so any number of candidates is scored in one pass over the cached history.

``rank_full`` / ``retrieve_full`` compute the same scores with the training model's full forward over the stored
events (the reference of the tests and the baseline of the benchmark).

Eval mode only: no dropout, no gradients. Bad requests raise the errors of :mod:`hstu.inference.errors` before any
cache changes.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import SEQUENCE_KEYS, JaggedBatch
from hstu.inference.errors import InvalidRequestError, SequenceTooLongError, UnsupportedModelError
from hstu.inference.paged_cache import PagedKVCache
from hstu.modules.encoder import EncoderInputs, l2_normalize
from hstu.modules.hstu_layer import layer_attention
from hstu.modules.positional import log_time_buckets
from hstu.modules.token_layout import sequence_tokens
from hstu.ops import lengths_to_offsets
from hstu.ops.cached_attention import cached_hstu_attention


DEFAULT_PAGE_SIZE = 32
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class UserCache:
    """What scoring and appending need of one user besides the keys / values (those are in the PagedKVCache): the
    raw events (so that a model whose token encodings depend on the whole history can rebuild the cache exactly)
    and the token times (relative attention bias) on the host, the encoder output at the last event on the device."""

    items: torch.Tensor  # (E,) int64 item ids of the user's events, oldest first
    timestamps: torch.Tensor  # (E,) int64 seconds
    actions: Optional[torch.Tensor]  # (E,) int64 action ids (ranking), else None
    contextual: Optional[torch.Tensor]  # (C,) int64 contextual feature ids, in the model's feature order
    token_times: torch.Tensor  # (P,) int64 time of every token
    last_output: torch.Tensor  # (D,) encoder output at the last event's token

    @property
    def num_tokens(self) -> int:
        return int(self.token_times.numel())

    @property
    def num_events(self) -> int:
        return int(self.items.numel())


@dataclasses.dataclass
class UserEvents:
    """New events of one user, oldest first. ``actions``: ranking only. ``contextual``: the user's contextual
    feature ids in the model's ``contextual_keys`` order, given with the user's first events (fixed after that)."""

    user: Hashable
    items: torch.Tensor
    timestamps: torch.Tensor
    actions: Optional[torch.Tensor] = None
    contextual: Optional[torch.Tensor] = None


@dataclasses.dataclass
class _Delta:
    """New rows of one pass for one user: token embeddings (n, D), token times, shared positions (candidates share
    the position after the history), the history end (tokens) of the whole sequence and the targets among them."""

    tokens: torch.Tensor
    times: torch.Tensor
    positions: torch.Tensor
    history_end: int
    num_targets: int


def _ids(name: str, value, user) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvalidRequestError(f"user {user!r}: {name} must be a 1-D integer tensor ({err})") from None
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise InvalidRequestError(f"user {user!r}: {name} must hold integers, got {value.dtype}")
    if value.dim() != 1:
        raise InvalidRequestError(f"user {user!r}: {name} must be 1-D, got shape {tuple(value.shape)}")
    return value.to(torch.int64).cpu()


def _check_range(name: str, ids: torch.Tensor, size: int, user) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        bad = ids[(ids < 0) | (ids >= size)][0]
        raise InvalidRequestError(f"user {user!r}: {name} id {int(bad)} is outside the embedding table "
                                  f"(ids 0..{size - 1})")


def _table_sizes(embeddings: nn.Module) -> dict[str, int]:
    sizes = {}
    for collection in [embeddings.collection, *embeddings.extra_collections.values()]:
        for config in collection.embedding_configs():
            sizes[config.name] = int(config.num_embeddings)
    return sizes


def _checked_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype) if dtype in ("float32", "bfloat16", "float16") else dtype
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16 (or their names), got "
                         f"{dtype!r}")
    return dtype


_KEEP = object()


class InferenceModel:
    """Cached inference of ``model`` (a trained RetrievalModel / RankingModel on its device, ``task`` its kind).
    ``cache_bytes``: the byte budget of the key / value page pools (None: unbounded, the pools grow); ``page_size``:
    cached rows per page (16, 32 or 64); ``dtype``: the compute dtype (float32 runs the model as it is, bfloat16 /
    float16 under autocast as the trainer's mixed precision) and the dtype of the cached keys and values."""

    def __init__(self, model: nn.Module, task: str, cache_bytes: Optional[int] = None, *,
                 page_size: int = DEFAULT_PAGE_SIZE, dtype: torch.dtype | str = torch.float32):
        if task not in ("retrieval", "ranking"):
            raise ValueError(f"task must be 'retrieval' or 'ranking', got {task!r}")
        self.model, self.task = model.eval(), task
        self.encoder = model.encoder
        self.dtype = _checked_dtype(dtype)
        self.device = next(model.parameters()).device
        c = self.encoder.config
        if not c.causal:
            raise UnsupportedModelError("NetworkArgs.causal=False (full attention): every token sees later tokens, "
                                        "so a history's keys and values change with every appended event")
        if c.relative_attention_bias and c.rab_use_time and c.rab_time_reference == "next":
            raise UnsupportedModelError("NetworkArgs.rab_time_reference='next': a row's bias depends on the next "
                                        "event's time, which a cached row does not know; cached inference needs "
                                        "'query'")
        self.num_contextual = len(model.contextual_keys)
        self.ranking = task == "ranking"
        self.group = c.target_group_size
        # Whether an append extends the cache exactly (no token encoding or mask depends on later events).
        self.incremental = (c.position_encoding != "reverse" and c.num_time_buckets == 0
                            and not (self.num_contextual > 0 and c.contextual_mask))
        self.contexts_masked = self.num_contextual > 0 and c.contextual_mask
        self.page_size = page_size
        self.clear(cache_bytes)
        self.table_sizes = _table_sizes(model.embeddings)
        self._catalogue: Optional[torch.Tensor] = None

    def clear(self, cache_bytes=_KEEP) -> None:
        """Drop every user's cache; ``cache_bytes`` (default: the current budget) is the budget of the new pools."""
        c = self.encoder.config
        if cache_bytes is _KEEP:
            cache_bytes = self.cache.max_bytes
        room = self.group if self.ranking else 0  # ranking keeps room for one candidate group
        self.cache = PagedKVCache(c.num_layers, c.num_heads, c.qk_dim, c.v_dim, page_size=self.page_size,
                                  max_bytes=cache_bytes, max_tokens=c.max_tokens - room, dtype=self.dtype,
                                  device=self.device)
        self.states: dict[Hashable, UserCache] = {}

    def peek(self, user: Hashable) -> Optional[UserCache]:
        """The user's :class:`UserCache` or None, without counting as a use."""
        return self.states.get(user)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ---- embeddings ----------------------------------------------------------------------------------------------
    def _embed(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        values = self.model.embeddings.lookup(feature, ids.to(self.device, non_blocking=True))
        projection = None
        if self.ranking:
            projection = (self.model.item_projection if feature in ("item", "action")
                          else self.model.contextual_projection)
        return projection(values) if projection is not None else values

    def _contextual_embeddings(self, contextual: torch.Tensor) -> torch.Tensor:
        """(C, D) token embeddings of one user's contextual ids."""
        return torch.cat([self._embed(key, contextual[i:i + 1]) for i, key in enumerate(self.model.contextual_keys)])

    def _token_times(self, timestamps: torch.Tensor, first_time: torch.Tensor, with_contexts: bool) -> torch.Tensor:
        """Times of a user's tokens for events at ``timestamps`` (action tokens take their event's time, contextual
        tokens, when ``with_contexts``, the user's first event time)."""
        times = timestamps.repeat_interleave(2) if self.ranking else timestamps
        if with_contexts:
            times = torch.cat([first_time.reshape(1).expand(self.num_contextual), times])
        return times

    def _history_tokens(self, items: torch.Tensor, actions: Optional[torch.Tensor]) -> torch.Tensor:
        """(tokens, D) embeddings of events, interleaved [item, action] for ranking."""
        item_values = self._embed("item", items)
        if not self.ranking:
            return item_values
        action_values = self._embed("action", actions)
        return torch.stack([item_values, action_values], dim=1).reshape(-1, item_values.shape[-1])

    # ---- the layers over new rows ----------------------------------------------------------------------------------
    def _encode_inputs(self, deltas: list[_Delta], caches: list[Optional[UserCache]]) -> torch.Tensor:
        """Scale, position (+ time-bucket) encodings of the new rows, as the encoder's preprocessing gives them."""
        c = self.encoder.config
        tokens = torch.cat([d.tokens for d in deltas])
        positions = torch.cat([d.positions for d in deltas])
        if c.position_encoding == "reverse":
            ends = torch.cat([torch.full_like(d.positions, d.history_end) for d in deltas])
            positions = ends - positions.clamp(max=ends)
        times = torch.cat([d.times for d in deltas])
        query_times = None
        if c.num_time_buckets > 0:
            # The time of the sequence's last history token.
            last = []
            for d, cache in zip(deltas, caches):
                fresh_history = d.times.numel() - d.num_targets
                source = d.times[fresh_history - 1] if fresh_history > 0 else cache.token_times[-1]
                last.append(source.reshape(1).expand(d.times.numel()))
            query_times = torch.cat(last)
        device = self.device
        return self.encoder.input_encoder(tokens, positions.to(device), times.to(device),
                                          None if query_times is None else query_times.to(device))

    def _rab_inputs(self, deltas: list[_Delta], caches: list[Optional[UserCache]], n_q: int, n_k: int):
        """(time buckets, relative positions), each (B, n_q, n_k) or None, of the new rows against every key."""
        c = self.encoder.config
        if not c.relative_attention_bias:
            return None, None
        batch = len(deltas)
        query_times = torch.zeros(batch, n_q, dtype=torch.int64)
        key_times = torch.zeros(batch, n_k, dtype=torch.int64)
        query_pos = torch.zeros(batch, n_q, dtype=torch.int64)
        key_pos = torch.zeros(batch, n_k, dtype=torch.int64)
        for b, (d, cache) in enumerate(zip(deltas, caches)):
            cached = 0 if cache is None else cache.num_tokens
            n = d.times.numel()
            query_times[b, :n] = d.times
            query_pos[b, :n] = d.positions
            if cached:
                key_times[b, :cached] = cache.token_times
                key_pos[b, :cached] = torch.arange(cached)
            key_times[b, cached:cached + n] = d.times
            key_pos[b, cached:cached + n] = d.positions
        buckets = None
        query_times, key_times = query_times.to(self.device), key_times.to(self.device)
        query_pos, key_pos = query_pos.to(self.device), key_pos.to(self.device)
        if c.rab_use_time:
            buckets = log_time_buckets(query_times.unsqueeze(2) - key_times.unsqueeze(1), c.rab_num_time_buckets)
        relative = query_pos.unsqueeze(2) - key_pos.unsqueeze(1) if c.rab_use_position else None
        return buckets, relative

    def _layer_rab(self, layer: nn.Module, buckets: Optional[torch.Tensor], relative: Optional[torch.Tensor]):
        """(B, 1, n_q, n_k) relative attention bias of ``layer`` (RelativeAttentionBias's sum of the time and the
        position weights)."""
        module = layer.relative_attention_bias
        if module is None:
            return None
        bias = None
        if module.time_weights is not None:
            bias = module.time_weights[buckets]
        if module.position_weights is not None:
            limit = module.max_seqlen - 1
            position_bias = module.position_weights[relative.clamp(-limit, limit) + limit]
            bias = position_bias if bias is None else bias + position_bias
        if bias is None:
            shape = (buckets if buckets is not None else relative).shape
            bias = torch.zeros(shape, device=self.device)
        return bias.unsqueeze(1)

    def _run_delta(self, deltas: list[_Delta], users: list[Hashable], caches: list[Optional[UserCache]]):
        """The layers over the new rows of every user against their cached rows (read in place from the page
        pools): (outputs (T_new, D), per-layer new keys, per-layer new values, the new rows' offsets as a list)."""
        lengths = [d.tokens.shape[0] for d in deltas]
        cached = [0 if cache is None else cache.num_tokens for cache in caches]
        offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
        delta_offsets = offsets.to(self.device, non_blocking=True)
        page_table, cache_offsets = self.cache.lookup(users, touch=False, unknown_empty=True)
        n_q, n_k = max(lengths), max(a + b for a, b in zip(lengths, cached))
        buckets, relative = self._rab_inputs(deltas, caches, n_q, n_k)
        num_targets = torch.tensor([d.num_targets for d in deltas], dtype=torch.int64).to(self.device)
        num_contexts = None
        if self.contexts_masked:
            num_contexts = torch.full((len(deltas),), self.num_contextual, dtype=torch.int64, device=self.device)
        x = self._encode_inputs(deltas, caches)
        new_keys, new_values = [], []
        for index, layer in enumerate(self.encoder.layers.layers):
            u, v, q, k = layer.project(x)
            q, k, v = (t.to(self.dtype) for t in (q, k, v))
            attn = cached_hstu_attention(
                q, k, v, delta_offsets, self.cache.keys[index], self.cache.values[index], cache_offsets,
                alpha=layer.alpha, scaling_seqlen=layer.scaling_seqlen, num_contexts=num_contexts,
                num_targets=num_targets, target_group_size=layer.target_group_size,
                rab=self._layer_rab(layer, buckets, relative), page_table=page_table,
                page_size=self.cache.page_size,
            )  # fmt: skip
            x = layer.combine(x, attn, u)
            new_keys.append(k)
            new_values.append(v)
        return x, new_keys, new_values, offsets.tolist()

    def _outputs(self, x: torch.Tensor) -> torch.Tensor:
        c = self.encoder.config
        return l2_normalize(x, c.l2_norm_eps) if c.l2_normalize_output else x

    # ---- appending events ----------------------------------------------------------------------------------------
    def _checked_events(self, events: Sequence[UserEvents]) -> list[UserEvents]:
        if isinstance(events, UserEvents):
            events = [events]
        users = [e.user for e in events]
        if len(set(users)) != len(users):
            raise InvalidRequestError(f"an append names a user more than once ({users}); send one UserEvents per user")
        checked = []
        for e in events:
            items, times = _ids("items", e.items, e.user), _ids("timestamps", e.timestamps, e.user)
            if items.numel() == 0:
                raise InvalidRequestError(f"user {e.user!r}: an append needs at least one event")
            if times.numel() != items.numel():
                raise InvalidRequestError(f"user {e.user!r}: {items.numel()} items but {times.numel()} timestamps")
            _check_range("item", items, self.table_sizes["item"], e.user)
            actions = None
            if self.ranking:
                if e.actions is None:
                    raise InvalidRequestError(f"user {e.user!r}: the ranking model needs the events' actions")
                actions = _ids("actions", e.actions, e.user)
                if actions.numel() != items.numel():
                    raise InvalidRequestError(f"user {e.user!r}: {items.numel()} items but {actions.numel()} actions")
                _check_range("action", actions, self.table_sizes["action"], e.user)
            elif e.actions is not None:
                raise InvalidRequestError(f"user {e.user!r}: actions given, but the retrieval model has no action "
                                          "tokens")
            known = self.states.get(e.user)
            contextual = self._checked_contextual(e, known)
            before = known.num_tokens if known is not None else self.num_contextual
            added = sequence_tokens(items.numel(), 0, 0, self.ranking)
            if before + added > self.cache.max_tokens:
                raise SequenceTooLongError(f"user {e.user!r}: appending {items.numel()} events makes "
                                           f"{before + added} tokens, more than the model's maximum of "
                                           f"{self.cache.max_tokens}")
            checked.append(UserEvents(e.user, items, times, actions, contextual))
        return checked

    def _checked_contextual(self, e: UserEvents, known: Optional[UserCache]) -> Optional[torch.Tensor]:
        if self.num_contextual == 0:
            if e.contextual is not None and _ids("contextual", e.contextual, e.user).numel():
                raise InvalidRequestError(f"user {e.user!r}: contextual ids given, but the model has no contextual "
                                          "features")
            return None
        if e.contextual is None:
            if known is None:
                raise InvalidRequestError(f"user {e.user!r}: a new user needs its contextual ids "
                                          f"{self.model.contextual_keys}")
            return known.contextual
        contextual = _ids("contextual", e.contextual, e.user)
        if contextual.numel() != self.num_contextual:
            raise InvalidRequestError(f"user {e.user!r}: {contextual.numel()} contextual ids, the model has "
                                      f"{self.num_contextual} features {self.model.contextual_keys}")
        for key, value in zip(self.model.contextual_keys, contextual):
            _check_range(f"contextual {key!r}", value.reshape(1), self.table_sizes[key], e.user)
        if known is not None and not torch.equal(contextual, known.contextual):
            raise InvalidRequestError(f"user {e.user!r}: contextual ids {contextual.tolist()} differ from the "
                                      f"cached {known.contextual.tolist()} (they are fixed at the first append)")
        return contextual

    @torch.no_grad()
    def append(self, events: Sequence[UserEvents]) -> list:
        """Append the new events of users (one :class:`UserEvents` each; a user without a cache starts one).
        Returns the users evicted to stay within the cache budget. Nothing changes when the request is bad."""
        events = self._checked_events(events)
        known = [self.states.get(e.user) for e in events]
        with self._autocast():
            states, rows, replace = (self._extend if self.incremental else self._rebuild)(events, known)
        evicted = self.cache.append(rows, replace=replace)  # raises, changing nothing, over the budget
        for user in evicted:
            del self.states[user]
        self.states.update(states)
        return evicted

    def _extend(self, events: list[UserEvents], known: list[Optional[UserCache]]):
        """(states, new K/V rows, users to replace) of appends that extend the users' caches."""
        deltas = []
        for e, cache in zip(events, known):
            tokens = self._history_tokens(e.items, e.actions)
            new_user = cache is None
            times = self._token_times(e.timestamps, e.timestamps[0], new_user and self.num_contextual > 0)
            if new_user and self.num_contextual:
                tokens = torch.cat([self._contextual_embeddings(e.contextual), tokens])
            start = 0 if new_user else cache.num_tokens
            positions = torch.arange(start, start + tokens.shape[0])
            deltas.append(_Delta(tokens, times, positions, start + tokens.shape[0], 0))
        x, keys, values, offsets = self._run_delta(deltas, [e.user for e in events], known)
        x = self._outputs(x)
        states, rows = {}, {}
        for b, (e, cache, d) in enumerate(zip(events, known, deltas)):
            span = slice(offsets[b], offsets[b + 1])
            rows[e.user] = ([k[span] for k in keys], [v[span] for v in values])
            states[e.user] = UserCache(
                items=e.items if cache is None else torch.cat([cache.items, e.items]),
                timestamps=e.timestamps if cache is None else torch.cat([cache.timestamps, e.timestamps]),
                actions=None if e.actions is None else (e.actions if cache is None else torch.cat([cache.actions,
                                                                                                   e.actions])),
                contextual=e.contextual,
                token_times=d.times if cache is None else torch.cat([cache.token_times, d.times]),
                last_output=x[span.stop - (2 if self.ranking else 1)].clone(),
            )  # fmt: skip
        return states, rows, ()

    def _rebuild(self, events: list[UserEvents], known: list[Optional[UserCache]]):
        """(states, K/V rows, users to replace) of caches rebuilt from every stored event plus the new ones, with
        the training encoder's preprocessing and layers (for models whose token encodings or masks depend on the
        whole history)."""
        merged = []
        for e, cache in zip(events, known):
            if cache is not None:
                e = UserEvents(e.user, torch.cat([cache.items, e.items]), torch.cat([cache.timestamps, e.timestamps]),
                               None if e.actions is None else torch.cat([cache.actions, e.actions]), e.contextual)
            merged.append(e)
        lengths = torch.tensor([e.items.numel() for e in merged], dtype=torch.int64)
        items = torch.cat([e.items for e in merged])
        contextual = None
        if self.num_contextual:
            contextual = torch.cat([self._contextual_embeddings(e.contextual) for e in merged])
        device = self.device
        inputs = EncoderInputs(
            item_embeddings=self._embed("item", items), seq_lengths=lengths.to(device),
            timestamps=torch.cat([e.timestamps for e in merged]).to(device),
            num_candidates=torch.zeros_like(lengths, device=device) if self.ranking else None,
            action_embeddings=self._embed("action", torch.cat([e.actions for e in merged])) if self.ranking else None,
            contextual_embeddings=contextual, num_contextual=self.num_contextual, host_seq_lengths=lengths,
        )  # fmt: skip
        tokens = self.encoder.preprocess(inputs)
        x, keys, values = tokens.x, [], []
        for layer in self.encoder.layers.layers:
            u, v, q, k = layer.project(x)
            x = layer.combine(x, layer_attention(layer, q, k, v, tokens.attention_inputs), u)
            keys.append(k)
            values.append(v)
        x = self._outputs(x)
        counts = [sequence_tokens(e.items.numel(), 0, self.num_contextual, self.ranking) for e in merged]
        offsets = lengths_to_offsets(torch.tensor(counts, dtype=torch.int64)).tolist()
        states, rows = {}, {}
        for b, e in enumerate(merged):
            span = slice(offsets[b], offsets[b + 1])
            rows[e.user] = ([k[span] for k in keys], [v[span] for v in values])
            states[e.user] = UserCache(
                items=e.items, timestamps=e.timestamps, actions=e.actions, contextual=e.contextual,
                token_times=self._token_times(e.timestamps, e.timestamps[0], self.num_contextual > 0),
                last_output=x[span.stop - (2 if self.ranking else 1)].clone(),
            )  # fmt: skip
        return states, rows, [e.user for e, cache in zip(events, known) if cache is not None]

    # ---- scoring -------------------------------------------------------------------------------------------------
    def _checked_users(self, users: Sequence[Hashable]) -> list[UserCache]:
        users = list(users)
        if len(set(users)) != len(users):
            raise InvalidRequestError(f"a request names a user more than once ({users})")
        self.cache.touch(users)  # unknown users: UnknownUserError, nothing changes
        return [self.states[u] for u in users]

    def _checked_candidates(self, users, candidates, timestamps) -> tuple[list, list]:
        if self.task != "ranking":
            raise InvalidRequestError("rank() scores candidates of a ranking model; this is a retrieval model: use "
                                      "retrieve()")
        if len(candidates) != len(users):
            raise InvalidRequestError(f"{len(candidates)} candidate lists for {len(users)} users")
        if timestamps is not None and len(timestamps) != len(users):
            raise InvalidRequestError(f"{len(timestamps)} candidate timestamp lists for {len(users)} users")
        items, times = [], []
        for b, user in enumerate(users):
            ids = _ids("candidates", candidates[b], user)
            _check_range("candidate item", ids, self.table_sizes["item"], user)
            items.append(ids)
            if timestamps is not None:
                t = _ids("candidate timestamps", timestamps[b], user)
                if t.numel() != ids.numel():
                    raise InvalidRequestError(f"user {user!r}: {ids.numel()} candidates but {t.numel()} timestamps")
                times.append(t)
            else:
                times.append(None)
        return items, times

    def _candidate_request(self, users, candidates, timestamps):
        """(candidate ids, their times, the users' caches) of a checked ranking request; candidates without times
        take their user's last event time."""
        items, times = self._checked_candidates(users, candidates, timestamps)
        caches = self._checked_users(users)
        times = [t if t is not None else cache.timestamps[-1].expand(ids.numel()).clone()
                 for t, ids, cache in zip(times, items, caches)]
        return items, times, caches

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.model.loss.task_type == "bitmask":
            return torch.sigmoid(logits.float())
        return F.softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def rank(self, users: Sequence[Hashable], candidates: Sequence, timestamps: Optional[Sequence] = None
             ) -> list[torch.Tensor]:
        """Task probabilities (N_b, tasks) of every user's candidates (bitmask tasks: sigmoid of each task;
        rating: the class distribution), scored against the cached histories in one pass. ``timestamps``: the
        candidates' times (default: each user's last event time)."""
        users = list(users)
        items, times, caches = self._candidate_request(users, candidates, timestamps)
        keep = [b for b, ids in enumerate(items) if ids.numel() > 0]
        results = [torch.zeros(0, self.model.loss.num_outputs, device=self.device) for _ in users]
        if not keep:
            return results
        with self._autocast():
            deltas = []
            for b in keep:
                history = caches[b].num_tokens
                n = items[b].numel()
                deltas.append(_Delta(self._embed("item", items[b]), times[b], torch.full((n,), history), history, n))
            x, _, _, offsets = self._run_delta(deltas, [users[b] for b in keep], [caches[b] for b in keep])
            logits = self.model.head(self._outputs(x))
        probabilities = self._probabilities(logits)
        for position, b in enumerate(keep):
            results[b] = probabilities[offsets[position]:offsets[position + 1]]
        return results

    def catalogue(self) -> torch.Tensor:
        """L2-normalised embeddings of the catalogue (item ids from ``item_id_low``), computed once."""
        if self._catalogue is None:
            with torch.no_grad(), self._autocast():
                self._catalogue = self.model.catalogue_embeddings()
        return self._catalogue

    def _top_k(self, user_outputs: torch.Tensor, caches: list[UserCache], k: int, filter_seen: bool):
        low = self.model.item_id_low
        catalogue = self.catalogue().float()
        users = l2_normalize(user_outputs.float(), self.model.l2_norm_eps)
        scores = users @ catalogue.T
        if filter_seen:
            seen = torch.zeros(scores.shape, dtype=torch.bool)
            for b, cache in enumerate(caches):
                columns = cache.items[(cache.items >= low) & (cache.items < low + catalogue.shape[0])] - low
                seen[b, columns] = True
            seen = seen.to(self.device, non_blocking=True)
            scores = torch.where(seen, torch.full_like(scores, float("-inf")), scores)
        top_scores, columns = scores.topk(k, dim=1)
        ids = torch.where(torch.isinf(top_scores), torch.full_like(columns, -1), columns + low)
        return top_scores, ids

    def _checked_k(self, k) -> int:
        if self.task != "retrieval":
            raise InvalidRequestError("retrieve() ranks the catalogue for a retrieval model; this is a ranking "
                                      "model: use rank()")
        size = self.catalogue().shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
            raise InvalidRequestError(f"k must be an int in 1..{size} (the catalogue), got {k!r}")
        return k

    @torch.no_grad()
    def retrieve(self, users: Sequence[Hashable], k: int = 10, filter_seen: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, item ids), each (B, k): the top-k catalogue items for every user's cached history, best first.
        With ``filter_seen`` the user's history items are left out; slots past the unseen items get score -inf
        and id -1."""
        k = self._checked_k(k)
        caches = self._checked_users(users)
        return self._top_k(torch.stack([cache.last_output for cache in caches]), caches, k, filter_seen)

    # ---- full recompute (the training model's forward) ---------------------------------------------------------
    def _batch(self, caches: list[UserCache], candidates: list[torch.Tensor], times: list[torch.Tensor]) -> JaggedBatch:
        items, actions, stamps, lengths = [], [], [], []
        for cache, ids, t in zip(caches, candidates, times):
            items += [cache.items, ids]
            actions += [cache.actions if cache.actions is not None else torch.zeros_like(cache.items),
                        torch.zeros_like(ids)]
            stamps += [cache.timestamps, t]
            lengths.append(cache.num_events + ids.numel())
        lengths = torch.tensor(lengths, dtype=torch.int64)
        values = torch.cat([torch.cat(items), torch.cat(actions), torch.cat(stamps)])
        sequence = KeyedJaggedTensor(keys=list(SEQUENCE_KEYS), values=values, lengths=lengths.repeat(3))
        contextual = None
        if self.num_contextual:
            feature_major = torch.stack([cache.contextual for cache in caches], dim=1).reshape(-1)
            contextual = KeyedJaggedTensor(keys=list(self.model.contextual_keys), values=feature_major,
                                           lengths=torch.ones(feature_major.numel(), dtype=torch.int64))
        batch = JaggedBatch(sequence=sequence, num_candidates=torch.tensor([c.numel() for c in candidates]),
                            is_padding=torch.zeros(len(caches), dtype=torch.bool), max_seqlen=int(lengths.max()),
                            contextual=contextual, host_seq_lengths=lengths)
        return batch.to(self.device, non_blocking=True)

    @torch.no_grad()
    def rank_full(self, users: Sequence[Hashable], candidates: Sequence, timestamps: Optional[Sequence] = None
                  ) -> list[torch.Tensor]:
        """What :meth:`rank` returns, from the training model's full forward over the stored events plus the
        candidates (in rounds of as many candidates as the model's maximum token count leaves room for)."""
        items, times, caches = self._candidate_request(users, candidates, timestamps)
        max_tokens = self.encoder.config.max_tokens
        room = [(max_tokens - cache.num_tokens) // self.group * self.group for cache in caches]
        parts: list[list[torch.Tensor]] = [[] for _ in users]
        start = 0
        while any(start * r < ids.numel() for r, ids in zip(room, items)):
            chosen = [b for b, ids in enumerate(items) if start * room[b] < ids.numel()]
            pieces = [slice(start * room[b], (start + 1) * room[b]) for b in chosen]
            chosen_items = [items[b][s] for b, s in zip(chosen, pieces)]
            batch = self._batch([caches[b] for b in chosen], chosen_items, [times[b][s] for b, s in zip(chosen, pieces)])
            with self._autocast():
                logits, outputs = self.model.predict(batch)
            probabilities = self._probabilities(logits)
            counts = [ids.numel() for ids in chosen_items]
            for b, chunk in zip(chosen, probabilities.split(counts)):
                parts[b].append(chunk)
            start += 1
        return [torch.cat(p) if p else torch.zeros(0, self.model.loss.num_outputs, device=self.device) for p in parts]

    @torch.no_grad()
    def retrieve_full(self, users: Sequence[Hashable], k: int = 10, filter_seen: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`retrieve` returns, from the training model's full forward over the stored events."""
        k = self._checked_k(k)
        caches = self._checked_users(users)
        empty = [torch.zeros(0, dtype=torch.int64)] * len(caches)
        batch = self._batch(caches, empty, empty)
        with self._autocast():
            _, outputs = self.model.encode(batch)
            last = outputs.item_outputs[outputs.layout.last_rows()]
        return self._top_k(last, caches, k, filter_seen)


def load_inference_model(run_dir: str, checkpoint: Optional[str] = None, cache_bytes: Optional[int] = None, *,
                         device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype | str] = None,
                         page_size: int = DEFAULT_PAGE_SIZE) -> InferenceModel:
    """:class:`InferenceModel` of the newest verified checkpoint of training run ``run_dir`` (or ``checkpoint``) on
    ``device`` (None / "cpu": the CPU; "cuda", "cuda:N" or a torch.device; "auto": CUDA when available).
    ``dtype`` (None: the run's training precision on that device, see
    :func:`hstu.inference.loading.training_dtype`); ``page_size``: rows per page of the key / value cache."""
    from hstu.inference.loading import load_run, resolve_device, training_dtype

    device = resolve_device(device)
    if dtype is not None:
        dtype = _checked_dtype(dtype)
    run = load_run(run_dir, checkpoint)
    if dtype is None:
        dtype = training_dtype(run.args, device)
    return InferenceModel(run.model.to(device), run.task, cache_bytes=cache_bytes, page_size=page_size, dtype=dtype)
