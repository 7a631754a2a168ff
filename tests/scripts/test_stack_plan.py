"""scripts/stack_plan.py (which stack bootstrap.sh installs) and bootstrap.sh's use of it on a simulated GPU machine."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("stack_plan", ROOT / "scripts" / "stack_plan.py")
stack_plan = importlib.util.module_from_spec(_spec)
sys.modules["stack_plan"] = stack_plan  # dataclasses look the module up
_spec.loader.exec_module(stack_plan)
Machine, plan, PlanError = stack_plan.Machine, stack_plan.plan, stack_plan.PlanError

CPU_BOX = Machine(gpus=0, driver_cuda=None, nvcc=None, base_torch=None, base_torch_cuda=None)
GPU_BOX = Machine(gpus=8, driver_cuda=(13, 0), nvcc=(13, 0), base_torch=None, base_torch_cuda=None)


def _flat(p) -> list[str]:
    return [arg for step in p.steps for arg in step]


def test_cpu_machine_gets_the_pinned_cpu_stack_with_the_existing_stamp():
    p = plan(CPU_BOX)
    assert p.device == "cpu" and p.stamp == ".hstu-bootstrap-v1" and not p.system_site_packages
    args = _flat(p)
    assert "torch==2.13.0" in args and "fbgemm-gpu-cpu==1.8.0" in args and "torchrec==1.8.0" in args
    assert not any(a.startswith("fbgemm-gpu==") or "download.pytorch.org" in a for a in args)


def test_gpu_machine_gets_matching_cuda_builds_from_the_drivers_variant():
    p = plan(GPU_BOX)
    assert p.device == "cuda" and p.stamp.endswith("cuda-cu130")
    torch_step, fbgemm_step = p.steps[0], p.steps[1]
    assert torch_step == ["--index-url", "https://download.pytorch.org/whl/cu130", "torch==2.13.0"]
    assert fbgemm_step[-1] == "fbgemm-gpu==1.8.0" and "https://download.pytorch.org/whl/cu130" in fbgemm_step
    assert "--no-deps" in fbgemm_step  # never replaces the torch chosen in the step before
    assert "torchrec==1.8.0" in _flat(p) and "fbgemm-gpu-cpu==1.8.0" not in _flat(p)
    # an older driver gets the newest variant it supports
    assert plan(Machine(1, (12, 9), None, None, None)).steps[0][1].endswith("/cu129")
    assert plan(Machine(1, (12, 8), None, None, None), variant_override="cu126").steps[0][1].endswith("/cu126")


def test_base_interpreter_cuda_torch_is_reused_with_its_companion_releases():
    p = plan(Machine(gpus=1, driver_cuda=(13, 0), nvcc=(13, 0), base_torch="2.11.0+cu130", base_torch_cuda="13.0"))
    assert p.system_site_packages and p.stamp.endswith("cuda-cu130")
    args = _flat(p)
    assert not any(a.startswith("torch==") for a in args)  # the image's torch stays
    assert "fbgemm-gpu==1.6.0" in args and "torchrec==1.6.1" in args
    assert any("reusing" in n for n in p.notes)


def test_missing_nvcc_is_said_not_silent():
    p = plan(Machine(1, (13, 0), None, None, None))
    assert any("nvcc" in n and "references" in n for n in p.notes)
    assert not any("nvcc" in n for n in plan(GPU_BOX).notes)


@pytest.mark.parametrize("machine, kwargs, match", [
    (CPU_BOX, dict(device="cuda"), "lists no GPU"),
    (GPU_BOX, dict(device="gpu"), "auto, cpu or cuda"),
    (Machine(1, (11, 8), None, None, None), {}, "update the driver"),
    (Machine(1, None, None, None, None), {}, "HSTU_CUDA_VARIANT"),
    (GPU_BOX, dict(variant_override="cuda13"), "look like cu130"),
    (Machine(1, (13, 0), None, "2.4.0+cu121", "12.1"), {}, "no known fbgemm-gpu"),
])
def test_impossible_plans_are_named_errors(machine, kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan(machine, **kwargs)


def _write(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_bootstrap_installs_the_cuda_plan_on_a_simulated_gpu_machine(tmp_path):
    # fake nvidia-smi / nvcc on PATH, and a prepared environment whose python records what it is asked to install
    bin_dir, venv, log = tmp_path / "bin", tmp_path / "venv", tmp_path / "pip.log"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    _write(bin_dir / "nvidia-smi", '#!/bin/sh\nif [ "$1" = -L ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: x)";'
                                   '\nelse echo "| NVIDIA-SMI 580.1   Driver Version: 580.1   CUDA Version: 13.0 |"; fi\n')
    _write(bin_dir / "nvcc", "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    _write(venv / "bin" / "python", f'#!/bin/sh\necho "$*" >> {log}\n')
    (venv / "bin" / "activate").write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HSTU_VENV=str(venv))
    env.pop("HSTU_SKIP_BOOTSTRAP", None)
    env.pop("HSTU_DEVICE", None)
    done = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/bootstrap.sh"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert any("whl/cu130" in c and "torch==2.13.0" in c for c in calls), calls
    assert any("fbgemm-gpu==1.8.0" in c for c in calls) and not any("fbgemm-gpu-cpu" in c for c in calls)
    assert calls[-1].endswith(f"-e {ROOT}")  # the package (and its kernels) last
    assert (venv / ".hstu-bootstrap-v1-cuda-cu130").is_file()
    # a second run finds the stamp and installs nothing
    log.unlink()
    subprocess.run(["bash", "-c", f"source {ROOT}/scripts/bootstrap.sh"], env=env, check=True, timeout=120,
                   capture_output=True)
    assert not log.exists()


def test_bootstrap_stops_with_the_plans_error(tmp_path):
    env = dict(os.environ, HSTU_VENV=str(tmp_path / "venv"), HSTU_DEVICE="tpu", PATH="/usr/bin:/bin")
    env.pop("HSTU_SKIP_BOOTSTRAP", None)
    done = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/bootstrap.sh"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "auto, cpu or cuda" in done.stderr
    assert not (tmp_path / "venv").exists()
