import os
import shutil

import pytest

from hstu.data.prepare import PrepareOptions, prepare
from hstu.data.synthetic import write_synthetic

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
RAW_DIRS = {
    "ml-1m": "ml-1m",
    "ml-20m": "ml-20m",
    "kuairand-pure": "KuaiRand-Pure",
    "kuairand-1k": "KuaiRand-1K",
    "kuairand-27k": "KuaiRand-27K",
}
QUIET = PrepareOptions(show_progress=False)


def raw_dir(dataset: str) -> str:
    return os.path.join(FIXTURES, RAW_DIRS[dataset])


def copy_raw(dataset: str, dest) -> str:
    target = os.path.join(str(dest), RAW_DIRS[dataset])
    shutil.copytree(raw_dir(dataset), target)
    return target


@pytest.fixture(scope="session")
def processed(tmp_path_factory):
    """Processed fixture datasets, built once: ``processed("ml-1m")`` → directory."""
    root = tmp_path_factory.mktemp("processed")
    cache = {}

    def get(dataset: str) -> str:
        if dataset not in cache:
            out = os.path.join(str(root), dataset)
            prepare(dataset, raw_dir(dataset), out, QUIET)
            cache[dataset] = out
        return cache[dataset]

    return get


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("synthetic")), "synthetic")
    write_synthetic(out, num_users=400, num_items=600, num_topics=12, mean_length=60, min_length=5, max_length=400,
                    seed=7, show_progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_bitmask_dir(tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("synthetic_bitmask")), "synthetic")
    write_synthetic(out, num_users=200, num_items=400, num_topics=8, mean_length=40, min_length=5, max_length=200,
                    actions="bitmask", seed=3, show_progress=False)
    return out
