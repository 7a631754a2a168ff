"""Dynamic embedding tables (the NVIDIA example's DynamicEmbeddingArgs, our EmbeddingArgs.dynamic_tables): ids of any
int64 value are remapped into a fixed number of rows by TorchRec's managed-collision modules with the example's
eviction policy; the same id reads the same row; the remapping is saved and loaded with the checkpoint."""

import re

import gin
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.modules.embeddings import EmbeddingTableSpec, SparseEmbeddings
from hstu.training.config import NotSupportedYetError, parse_gin
from tests.training.test_example_benchmark import BENCHMARK, CPU_RUN

CAPACITY = 16
HUGE = 1 << 62


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _embeddings(policy="lru", seed=0):
    torch.manual_seed(seed)
    module = SparseEmbeddings([EmbeddingTableSpec("item", CAPACITY), EmbeddingTableSpec("action", 4)], 8)
    module.manage_collisions({"item": policy})
    return module


def _lookup(module, ids, actions=None):
    ids = torch.as_tensor(ids, dtype=torch.int64)
    actions = torch.zeros_like(ids) if actions is None else torch.as_tensor(actions, dtype=torch.int64)
    lengths = torch.tensor([ids.numel()])
    out = module(module.make_features({"item": (ids, lengths), "action": (actions, lengths)}))
    return out["item"], out["action"]


def _rows(module, ids):
    """The table row each id reads (eval mode: a pure lookup)."""
    module.eval()
    items, _ = _lookup(module, ids)
    module.train()
    weight = module.table_weight("item")
    return [int(torch.nonzero((weight == row).all(dim=1))[0]) for row in items]


def test_ids_far_outside_the_table_train_without_error():
    module = _embeddings()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = module.table_weight("item").detach().clone()
    for step in range(4):
        ids = torch.randint(0, HUGE, (40,), generator=torch.Generator().manual_seed(step))  # more ids than rows
        items, actions = _lookup(module, ids, ids % 4)
        assert items.shape == (40, 8) and torch.isfinite(items).all()
        (items.square().sum() + actions.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(module.table_weight("item"), before)


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, (1 << 63) - 2), min_size=1, max_size=CAPACITY - 1, unique=True),
       policy=st.sampled_from(["lru", "lfu"]))
def test_the_same_id_reads_the_same_row_and_distinct_ids_distinct_rows(ids, policy):
    module = _embeddings(policy)
    _lookup(module, ids)  # training forward: the ids are admitted
    rows = _rows(module, ids)
    assert len(set(rows)) == len(ids)
    assert _rows(module, list(reversed(ids))) == list(reversed(rows))
    _lookup(module, ids)  # seen again in training: they keep their rows
    assert _rows(module, ids) == rows
    # the static table is not remapped
    _, actions = _lookup(module, ids[:1], [3])
    torch.testing.assert_close(actions[0], module.table_weight("action")[3], rtol=0, atol=0)


@pytest.mark.parametrize("policy, kept", [("lru", "recent"), ("lfu", "frequent")])
def test_the_eviction_policy_decides_which_ids_keep_their_rows(policy, kept):
    module = _embeddings(policy)
    frequent, recent = list(range(1000, 1000 + CAPACITY // 2)), list(range(5000, 5000 + CAPACITY // 2 - 1))
    for _ in range(5):
        _lookup(module, frequent)
    _lookup(module, recent)
    newcomers = list(range(9000, 9000 + CAPACITY // 2 - 1))
    for _ in range(2):
        _lookup(module, newcomers * 3)  # the table is full: the policy evicts
    survivors = recent if kept == "recent" else frequent
    evicted = frequent if kept == "recent" else recent
    rows_before = _rows(module, survivors)
    assert len(set(rows_before)) == len(survivors)
    module.eval()
    remapped = module._remap(module.make_features({"item": (torch.tensor(evicted), torch.tensor([len(evicted)]))}))
    module.train()
    # evicted ids no longer own rows: they all read the one miss row
    assert len(set(remapped.values().tolist())) < len(evicted)


def test_the_remapping_round_trips_through_the_state_dict():
    module = _embeddings()
    ids = [HUGE - 1, 7, 123456789, 42]
    _lookup(module, ids)
    loaded = _embeddings(seed=1)
    loaded.load_state_dict(module.state_dict())
    assert _rows(loaded, ids) == _rows(module, ids)
    module.eval()
    loaded.eval()
    torch.testing.assert_close(_lookup(loaded, ids)[0], _lookup(module, ids)[0], rtol=0, atol=0)


@pytest.mark.parametrize("tables, message", [
    ({"movie": "lru"}, "'movie'"), ({"item": "fifo"}, "'fifo'")])
def test_bad_dynamic_tables_are_named_errors(tables, message):
    module = SparseEmbeddings([EmbeddingTableSpec("item", 8)], 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        module.manage_collisions(tables)


# ---- from the example's gin fields ----------------------------------------------------------------------------------
DYNAMIC = BENCHMARK.replace(
    "item_table/EmbeddingArgs.sharding_type = 'model_parallel'\n",
    "item_table/DynamicEmbeddingArgs.evict_strategy = 'lfu'\n"
    "item_table/DynamicEmbeddingArgs.item_vocab_gpu_capacity_ratio = 0.1\n").replace(
    "item_table/EmbeddingArgs", "item_table/DynamicEmbeddingArgs").replace(
    "user_table/EmbeddingArgs.sharding_type = 'data_parallel'\n", "").replace(
    "user_table/EmbeddingArgs", "user_table/DynamicEmbeddingArgs")


def test_dynamic_embedding_args_map_onto_dynamic_tables(tmp_path):
    path = tmp_path / "dynamic.gin"
    path.write_text(DYNAMIC)
    args = parse_gin([str(path)])
    assert args.embeddings.dynamic_tables == {"item": "lfu", "user_id": "lru"}
    assert args.embeddings.item_vocab_size == 500
    assert args.parallelism.embedding_sharding == {"action": "data_parallel"}
    retrieval = tmp_path / "retrieval.gin"
    retrieval.write_text(re.sub(r"RankingArgs\.\w+ = .*\n", "", DYNAMIC))
    gin.clear_config()
    with pytest.raises(NotSupportedYetError, match="DynamicEmbeddingArgs for the item table 'item'"):
        parse_gin([str(retrieval)])


def test_our_retrieval_refuses_a_dynamic_item_table():
    from hstu.training.tasks import check_task_config

    args = parse_gin([], ["EmbeddingArgs.dynamic_tables={'item': 'lru'}"])
    with pytest.raises(ValueError, match=re.escape("EmbeddingArgs.dynamic_tables['item']")):
        check_task_config("retrieval", args)


def test_a_dynamic_benchmark_trains_and_its_checkpoint_restores_the_remapping(tmp_path, monkeypatch):
    from hstu.training.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "dynamic.gin"
    path.write_text(DYNAMIC)

    def trainer(run_dir, *bindings):
        gin.clear_config()
        args = parse_gin([str(path)], CPU_RUN + [f"TrainerArgs.ckpt_save_dir={str(tmp_path / run_dir)!r}", *bindings])
        return Trainer("ranking", args)

    source = trainer("source", "TrainerArgs.ckpt_save_interval=3")
    try:
        source.train()
        trained = source.model.state_dict()
    finally:
        source.close()
    remapping = [k for k in trained if ".remapper." in k]
    assert any(k.endswith("item._mch_sorted_raw_ids") for k in remapping)
    assert any(k.endswith("user_id._mch_sorted_raw_ids") for k in remapping)
    loaded = trainer("loaded", f"TrainerArgs.ckpt_load_dir={str(tmp_path / 'source')!r}")
    try:
        state = loaded.model.state_dict()
    finally:
        loaded.close()
    for key in remapping:
        torch.testing.assert_close(state[key], trained[key], rtol=0, atol=0, msg=key)
    table = next(k for k in trained if k.endswith("embeddings.item.weight"))
    torch.testing.assert_close(state[table], trained[table], rtol=0, atol=0)
