"""--download: the network error path, checksum verification and extraction, all offline."""

import hashlib
import os
import zipfile

import pytest

from hstu.data import DownloadError, ProcessedData
from hstu.data.download import fetch_archive
from hstu.data.prepare import prepare

from .conftest import QUIET, raw_dir
from .test_prepare import run_cli


@pytest.fixture
def ml1m_zip(tmp_path):
    path = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(path, "w") as z:
        for name in ("ratings.dat", "users.dat", "movies.dat"):
            z.write(os.path.join(raw_dir("ml-1m"), name), f"ml-1m/{name}")
    return path


def test_unreachable_server_fails_cleanly(tmp_path):
    # Port 9 (discard) on localhost refuses the connection at once.
    with pytest.raises(DownloadError, match="could not download"):
        fetch_archive("ml-1m", str(tmp_path / "raw"), url="http://127.0.0.1:9/ml-1m.zip", timeout=2, show_progress=False)
    assert os.listdir(tmp_path / "raw") == []


def test_cli_download_without_network_exits_nonzero(tmp_path):
    out = tmp_path / "out"
    result = run_cli("prepare", "ml-1m", "--download", "--download-timeout", "3", "--raw-dir", str(tmp_path / "raw"),
                     "--out-dir", str(out), "--no-progress", timeout=90)
    if result.returncode == 0:
        pytest.skip("this machine has network access")
    assert "could not download https://files.grouplens.org/datasets/movielens/ml-1m.zip" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_kuairand_requires_a_checksum(tmp_path):
    with pytest.raises(DownloadError, match="--sha256"):
        fetch_archive("kuairand-pure", str(tmp_path), timeout=1, show_progress=False)


def test_checksum_mismatch_is_rejected(tmp_path, ml1m_zip):
    with pytest.raises(DownloadError, match="sha256 checksum mismatch"):
        fetch_archive("ml-1m", str(tmp_path / "raw"), url=ml1m_zip.as_uri(), sha256="0" * 64, show_progress=False)
    assert os.listdir(tmp_path / "raw") == []


def test_verified_archive_is_extracted_and_prepared(tmp_path, ml1m_zip):
    digest = hashlib.sha256(ml1m_zip.read_bytes()).hexdigest()
    raw = fetch_archive("ml-1m", str(tmp_path / "raw"), url=ml1m_zip.as_uri(), sha256=digest, show_progress=False)
    assert sorted(os.listdir(raw)) == ["movies.dat", "ratings.dat", "users.dat"]
    prepare("ml-1m", raw, str(tmp_path / "out"), QUIET)
    assert ProcessedData.open(tmp_path / "out").metadata["num_interactions"] == 13
