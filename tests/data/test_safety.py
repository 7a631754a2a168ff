"""What `prepare` may replace, and that an interrupted or failing `prepare` leaves the previous output as it was."""

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from hstu.data import DataFormatError, ProcessedData
from hstu.data.prepare import prepare
from hstu.data.processed import NpyAppender
from hstu.data.synthetic import write_synthetic

from .conftest import QUIET, copy_raw
from .test_prepare import ROOT

TINY = dict(num_users=6, num_items=40, num_topics=2, mean_length=6, min_length=2, max_length=12, show_progress=False)


def snapshot(directory) -> dict:
    """Relative path -> bytes of every file below ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def leftovers(parent) -> list:
    return [name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name]


def module_command(args, prelude=""):
    """Command line of ``python -m hstu.data ARGS`` that first runs ``prelude`` (a test hook) in the process."""
    code = f"import runpy, sys\n{prelude}\nsys.argv = ['hstu.data', *{list(map(str, args))!r}]\n" \
           "runpy.run_module('hstu.data', run_name='__main__', alter_sys=True)\n"
    return [sys.executable, "-c", code]


SUBPROCESS_ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_module(args, cwd, timeout=120, prelude=""):
    return subprocess.run(module_command(args, prelude), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=SUBPROCESS_ENV)


# ---- --overwrite replaces only a processed dataset or an empty directory -------------------------------------------


def test_overwrite_refuses_the_working_directory_and_its_parents(tmp_path, monkeypatch):
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", str(work), str(tmp_path / "project")):
        with pytest.raises(DataFormatError, match="--out-dir.*working directory"):
            write_synthetic(target, overwrite=True, **TINY)
    assert (work / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "project") == []


def test_overwrite_refuses_the_raw_directory_and_its_parents(tmp_path):
    raw = copy_raw("ml-1m", tmp_path / "data")
    before = snapshot(tmp_path / "data")
    for target in (raw, str(tmp_path / "data")):
        with pytest.raises(DataFormatError, match="--out-dir.*raw input"):
            prepare("ml-1m", raw, target, QUIET, overwrite=True)
    assert snapshot(tmp_path / "data") == before


def test_cli_raw_dir_with_out_dir_dot_keeps_everything(tmp_path):
    # The command from issue 20: replacing '.' would delete raw/ along with the working directory.
    copy_raw("ml-1m", tmp_path)
    os.rename(tmp_path / "ml-1m", tmp_path / "raw")
    before = snapshot(tmp_path)
    result = run_module(["prepare", "ml-1m", "--raw-dir", "raw", "--out-dir", ".", "--overwrite", "--no-progress"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "--out-dir" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["foreign-file", "foreign-metadata", "processed-plus-foreign",
                                  "processed-plus-own-array", "symlink", "regular-file"])
def test_overwrite_refuses_anything_but_a_processed_dataset(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "foreign-file":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "foreign-metadata":
        out.mkdir()
        (out / "metadata.json").write_text(json.dumps({"name": "someone else's"}))
        (out / "weights.npy").write_bytes(b"not ours")
    elif kind == "processed-plus-foreign":
        write_synthetic(str(out), **TINY)
        (out / "README").write_text("notes kept next to the data")
    elif kind == "processed-plus-own-array":
        write_synthetic(str(out), **TINY)
        np.save(out / "item_embeddings.npy", np.ones(3))  # a user's array beside the columns prepare writes
    elif kind == "symlink":
        write_synthetic(str(tmp_path / "real"), **TINY)
        os.symlink(tmp_path / "real", out)
    else:
        out.write_text("a file")
    before = snapshot(tmp_path)
    with pytest.raises(DataFormatError, match="refusing to replace --out-dir") as info:
        write_synthetic(str(out), overwrite=True, **TINY)
    assert str(out) in str(info.value)
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_overwrite_accepts_an_empty_directory_and_a_processed_dataset(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_synthetic(str(out), overwrite=True, seed=1, **TINY)
    first = snapshot(out)
    write_synthetic(str(out), overwrite=True, seed=2, **TINY)
    assert snapshot(out) != first and ProcessedData.open(out).metadata["synthetic"]["seed"] == 2
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("layout", ["derived", "raw-dir-is-parent"])
def test_download_directory_cannot_be_the_output(tmp_path, layout):
    if layout == "derived":  # --raw-dir defaults to <parent of out-dir>/raw
        args = ["--out-dir", str(tmp_path / "raw")]
    else:  # the archive's ml-1m/ folder would land exactly on --out-dir
        args = ["--raw-dir", str(tmp_path), "--out-dir", str(tmp_path / "ml-1m")]
    result = run_module(["prepare", "ml-1m", "--download", "--download-timeout", "2", "--no-progress", *args], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--out-dir overlaps the download directory" in result.stderr
    assert os.listdir(tmp_path) == []


# ---- interrupts and failing writes leave the previous output intact -------------------------------------------------

# Pauses the run once item.npy has been written into the temp directory, so the test can interrupt it there.
# SIGINT gets Python's default handler first: a suite started in the background by a shell without job control runs
# with SIGINT ignored, which the child would inherit (a user's Ctrl-C reaches a foreground process).
PAUSE_AFTER_ITEM = """
import os, signal, time
import numpy as np
signal.signal(signal.SIGINT, signal.default_int_handler)
_save = np.save
def _paused_save(file, arr, *args, **kwargs):
    _save(file, arr, *args, **kwargs)
    if os.path.basename(str(file)) == "item.npy":
        print("paused", flush=True)
        time.sleep(120)
np.save = _paused_save
"""


def test_sigint_during_prepare_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    write_synthetic(str(out), seed=1, **TINY)
    before = snapshot(out)
    args = ["prepare", "synthetic", "--out-dir", out, "--overwrite", "--seed", "2", "--num-users", "30", "--no-progress"]
    proc = subprocess.Popen(module_command(args, PAUSE_AFTER_ITEM), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert proc.stdout.readline().strip() == "paused"
        temp_dirs = [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
        assert len(temp_dirs) == 1 and "item.npy" in os.listdir(tmp_path / temp_dirs[0])  # really mid-write
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_synthetic_write_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_synthetic(str(out), seed=1, **TINY)
    before = snapshot(out)
    saved = []
    real_save = np.save

    def save_then_fail(file, arr, *args, **kwargs):
        if saved:
            _no_space()
        saved.append(file)
        real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_synthetic(str(out), overwrite=True, seed=2, **TINY)
    assert len(saved) == 1  # one column had been written when the disk filled up
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_full_disk_during_raw_prepare_keeps_the_previous_output(tmp_path, monkeypatch):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    out = tmp_path / "out"
    prepare("ml-1m", raw, str(out), QUIET)
    before = snapshot(out)
    monkeypatch.setattr(NpyAppender, "append", _no_space)
    with pytest.raises(OSError, match="No space left"):
        prepare("ml-1m", raw, str(out), QUIET, overwrite=True)
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["out", "raw"]


def test_cli_reports_a_full_disk_without_traceback(tmp_path):
    hook = "import numpy as np, errno\n" \
           "def _full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\nnp.save = _full\n"
    result = run_module(["prepare", "synthetic", "--out-dir", "out", "--num-users", "5", "--no-progress"], tmp_path,
                        prelude=hook)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "No space left on device" in result.stderr
    assert os.listdir(tmp_path) == []
