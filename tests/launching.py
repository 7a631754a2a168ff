"""Shared pieces of the tests that launch training processes: torchrun commands, their environment, free ports
and tiny synthetic datasets."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun_command(nproc: int, script: str, *args: str) -> list:
    """``torchrun --standalone``: the launcher binds a free rendezvous port itself, so concurrent or back-to-back
    launches cannot race for a port picked beforehand."""
    launcher = _TORCHRUN if os.path.exists(_TORCHRUN) else "torchrun"
    return [launcher, "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc), script, *args]


def launch_env(**overrides: str) -> dict:
    """Environment of a launched process: this checkout first on PYTHONPATH, the caller's entries kept (the GPU
    machine provides torchrec/megatron/gin through PYTHONPATH)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **overrides)


def training_command(nproc: int, script: str, config: str, run_dir, params, resume: bool = False) -> list:
    """torchrun command of ``training/<script>`` with ``configs/<config>``, gin overrides ``params``."""
    cmd = torchrun_command(nproc, os.path.join(ROOT, "training", script), "--gin-config-file",
                           os.path.join(ROOT, "configs", config), "--run-dir", str(run_dir))
    for p in params:
        cmd += ["--gin-param", p]
    if resume:
        cmd.append("--resume")
    return cmd


def run_training_script(nproc: int, script: str, config: str, run_dir, params, resume: bool = False,
                        timeout: int = 600, **env: str) -> str:
    """Run :func:`training_command`; returns stdout and fails the test with the output's tail when the run fails."""
    result = subprocess.run(training_command(nproc, script, config, run_dir, params, resume), cwd=ROOT,
                            env=launch_env(**env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def start_training_script(nproc: int, script: str, config: str, run_dir, params, resume: bool = False,
                          **env: str) -> subprocess.Popen:
    """Start :func:`training_command` without waiting; output goes to ``<run_dir>.out``. (torchrun starts each rank
    in a session of its own: signal the ranks by their pids, not through the launcher's process group.)"""
    out = open(f"{run_dir}.out", "w")
    try:
        return subprocess.Popen(training_command(nproc, script, config, run_dir, params, resume), cwd=ROOT,
                                env=launch_env(**env), stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def write_tiny_datasets(root, **synthetic_options):
    """Two tiny synthetic datasets under ``root``: rating actions in ``rating/``, 8-bit action masks in ``bitmask/``."""
    from hstu.data.synthetic import write_synthetic

    write_synthetic(str(root / "rating"), show_progress=False, **synthetic_options)
    write_synthetic(str(root / "bitmask"), show_progress=False, actions="bitmask", **synthetic_options)
    return root
