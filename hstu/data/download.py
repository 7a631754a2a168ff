"""Download and verify the official dataset archives.

Pinned digests: GroupLens publishes MD5 sums for the MovieLens archives (``ml-1m.zip.md5``); those are pinned. No
digest is published for the KuaiRand archives, so their download requires ``--sha256`` from a trusted copy. A
``--sha256`` given on the command line always takes precedence and is checked in addition to a pinned MD5.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from hstu.data.errors import DownloadError


@dataclass(frozen=True)
class Archive:
    url: str
    root: str  # top-level directory inside the archive holding the raw files
    md5: Optional[str] = None
    sha256: Optional[str] = None


ARCHIVES = {
    "ml-1m": Archive("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ml-1m", md5="c4d9eecfca2ab87c1945afe126590906"),
    "ml-20m": Archive("https://files.grouplens.org/datasets/movielens/ml-20m.zip", "ml-20m", md5="cd245b17a1ae2cc31bb14903e1204af3"),
    "kuairand-pure": Archive("https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz", "KuaiRand-Pure"),
    "kuairand-1k": Archive("https://zenodo.org/records/10439422/files/KuaiRand-1K.tar.gz", "KuaiRand-1K"),
    "kuairand-27k": Archive("https://zenodo.org/records/10439422/files/KuaiRand-27K.tar.gz", "KuaiRand-27K"),
}


def fetch_archive(
    dataset: str,
    dest_dir: str,
    *,
    sha256: Optional[str] = None,
    timeout: float = 30.0,
    url: Optional[str] = None,
    show_progress: bool = True,
) -> str:
    """Download, verify and extract the archive of ``dataset`` under ``dest_dir``; return the raw-files directory.

    ``url`` overrides the official address (mirrors, tests). Raises :class:`DownloadError`; a failed download leaves
    nothing behind.
    """
    archive = ARCHIVES[dataset]
    url = url or archive.url
    expected_sha256 = (sha256 or archive.sha256 or "").lower() or None
    if expected_sha256 is None and archive.md5 is None:
        raise DownloadError(
            f"{dataset}: no checksum is pinned for {url}; pass --sha256 <hex digest of a trusted copy>, "
            "or download and extract it yourself and pass --raw-dir"
        )
    raw_root = os.path.join(dest_dir, archive.root)
    os.makedirs(dest_dir, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{dataset}.", suffix=".part", dir=dest_dir)
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise DownloadError(
                    f"{dataset}: could not download {url}: {reason}. Without network access, fetch the archive "
                    f"elsewhere, extract it and pass --raw-dir"
                ) from None
            with response, tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None, desc=f"download {dataset}",
                unit="B", unit_scale=True, disable=not show_progress,
            ) as bar:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except OSError as e:
                        raise DownloadError(f"{dataset}: download of {url} interrupted: {e}") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
                    bar.update(len(chunk))
        checks = []
        if expected_sha256:
            checks.append(("sha256", expected_sha256))
        if archive.md5 and url == archive.url:
            checks.append(("md5", archive.md5))
        for name, expected in checks:
            actual = hashes[name].hexdigest()
            if actual != expected:
                raise DownloadError(f"{dataset}: {name} checksum mismatch for {url}: got {actual}, expected {expected}")
        _extract(partial, dest_dir, url)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    if not os.path.isdir(raw_root):
        raise DownloadError(f"{dataset}: archive did not contain the expected directory {archive.root}/")
    return raw_root


def _extract(path: str, dest_dir: str, url: str) -> None:
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    _check_member(name, url)
                z.extractall(dest_dir)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                t.extractall(dest_dir, filter="data")
        else:
            raise DownloadError(f"{url} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, shutil.Error) as e:
        raise DownloadError(f"could not extract {url}: {e}") from None


def _check_member(name: str, url: str) -> None:
    if name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
        raise DownloadError(f"{url}: refusing to extract unsafe path {name!r}")
