"""Decides which Python stack scripts/bootstrap.sh installs: the pinned CPU stack, or the CUDA builds of torch,
fbgemm-gpu and torchrec that match each other and the machine.

    python3 scripts/stack_plan.py [--device auto|cpu|cuda] [--format shell|text]

Standard library only (it runs before the virtual environment exists). The decision is a pure function of what
`probe()` finds, so tests can feed it any machine:
- device: `auto` takes CUDA when `nvidia-smi -L` lists a GPU, else CPU.
- CUDA with a CUDA build of torch already in the base interpreter (e.g. a vendor image): the environment reuses it
  (a venv with the system site-packages) and installs the fbgemm-gpu / torchrec releases built against that torch.
- CUDA without one: torch, fbgemm-gpu and torchrec at the pinned versions from PyTorch's wheel index for the CUDA
  version the driver supports (HSTU_CUDA_VARIANT, e.g. cu128, overrides it).
- Any CUDA plan builds the fused kernels when `nvcc` is on PATH, and says how to get them when it is not.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

PINNED_TORCH = "2.13.0"
# torch minor version -> (fbgemm-gpu, torchrec) releases built against it
COMPANIONS = {
    (2, 11): ("1.6.0", "1.6.1"),
    (2, 12): ("1.7.0", "1.7.0"),
    (2, 13): ("1.8.0", "1.8.0"),
}
# CUDA variants PyTorch publishes wheels for, newest first (the driver must support the variant's CUDA version)
CUDA_VARIANTS = ((13, 0), (12, 9), (12, 8), (12, 6))
WHEEL_INDEX = "https://download.pytorch.org/whl/{variant}"
COMMON = ["tensordict==0.15.3", "torchmetrics==1.0.3", "tqdm", "pyre-extensions", "iopath", "megatron-core==0.16.1",
          "gin-config==0.5.0", "numpy", "pytest", "hypothesis", "matplotlib", "tensorboard", "ninja"]


class PlanError(ValueError):
    """The machine cannot get a consistent stack; the message says what to change."""


@dataclass(frozen=True)
class Machine:
    gpus: int  # GPUs `nvidia-smi -L` lists
    driver_cuda: Optional[tuple[int, int]]  # the highest CUDA version the driver supports ("CUDA Version" of nvidia-smi)
    nvcc: Optional[tuple[int, int]]  # the CUDA toolkit on PATH
    base_torch: Optional[str]  # torch.__version__ in the base interpreter
    base_torch_cuda: Optional[str]  # torch.version.cuda there (None: a CPU build)


@dataclass
class Plan:
    device: str  # "cpu" or "cuda"
    stamp: str  # the bootstrap stamp file name: a different plan rebuilds the environment
    system_site_packages: bool
    steps: list[list[str]] = field(default_factory=list)  # pip argument lists, in order
    notes: list[str] = field(default_factory=list)  # said to the user before installing

    def as_dict(self) -> dict:
        return {"device": self.device, "stamp": self.stamp, "system_site_packages": self.system_site_packages,
                "steps": self.steps, "notes": self.notes}


def _version(text: str) -> Optional[tuple[int, int]]:
    m = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _variant(cuda: tuple[int, int]) -> str:
    return f"cu{cuda[0]}{cuda[1]}"


def plan(machine: Machine, device: str = "auto", variant_override: Optional[str] = None) -> Plan:
    if device not in ("auto", "cpu", "cuda"):
        raise PlanError(f"--device / HSTU_DEVICE must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if machine.gpus > 0 else "cpu"
    if device == "cpu":
        return Plan("cpu", ".hstu-bootstrap-v1", False, steps=[
            [f"torch=={PINNED_TORCH}"],
            ["fbgemm-gpu-cpu==1.8.0", *COMMON],
            ["--no-deps", "torchrec==1.8.0", "nvidia-cutlass==4.2.0.0"],
        ])
    if machine.gpus == 0:
        raise PlanError("HSTU_DEVICE=cuda but `nvidia-smi -L` lists no GPU (is the NVIDIA driver installed?); "
                        "use HSTU_DEVICE=cpu for the CPU stack")
    notes: list[str] = []
    if machine.base_torch and machine.base_torch_cuda:
        # reuse the interpreter's CUDA torch; its companions must exist
        torch_minor = _version(machine.base_torch)
        if torch_minor not in COMPANIONS:
            known = ", ".join(f"{a}.{b}" for a, b in sorted(COMPANIONS))
            raise PlanError(f"the base interpreter's torch {machine.base_torch} has no known fbgemm-gpu / torchrec "
                            f"release here (known torch versions: {known}); install torch {PINNED_TORCH} "
                            "or set HSTU_DEVICE=cpu")
        cuda = _version(machine.base_torch_cuda)
        variant = variant_override or _variant(cuda)
        fbgemm, torchrec = COMPANIONS[torch_minor]
        notes.append(f"reusing the base interpreter's torch {machine.base_torch} (CUDA {machine.base_torch_cuda})")
        torch_step: list[list[str]] = []
        site = True
    else:
        if variant_override:
            variant = variant_override
        else:
            if machine.driver_cuda is None:
                raise PlanError("cannot read the driver's CUDA version from nvidia-smi; set HSTU_CUDA_VARIANT "
                                "(e.g. cu130) to the PyTorch wheel variant to install")
            usable = [c for c in CUDA_VARIANTS if c <= machine.driver_cuda]
            if not usable:
                raise PlanError(f"the NVIDIA driver supports CUDA {machine.driver_cuda[0]}.{machine.driver_cuda[1]} "
                                f"only; PyTorch {PINNED_TORCH} wheels need CUDA "
                                f"{CUDA_VARIANTS[-1][0]}.{CUDA_VARIANTS[-1][1]} or newer: update the driver")
            variant = _variant(usable[0])
        fbgemm, torchrec = COMPANIONS[_version(PINNED_TORCH)]
        torch_step = [["--index-url", WHEEL_INDEX.format(variant=variant), f"torch=={PINNED_TORCH}"]]
        site = False
    if not re.fullmatch(r"cu\d{3,4}", variant):
        raise PlanError(f"HSTU_CUDA_VARIANT must look like cu130, got {variant!r}")
    if machine.nvcc is None:
        notes.append("no nvcc on PATH: the fused CUDA kernels are not built and the ops run their PyTorch references; "
                     "install the CUDA toolkit (nvcc) and rerun `pip install --no-build-isolation -e .`")
    steps = torch_step + [
        # fbgemm-gpu's CUDA builds live on PyTorch's index; --no-deps keeps the torch chosen above
        ["--no-deps", "--index-url", WHEEL_INDEX.format(variant=variant), f"fbgemm-gpu=={fbgemm}"],
        COMMON,
        ["--no-deps", f"torchrec=={torchrec}", "nvidia-cutlass==4.2.0.0"],
    ]
    return Plan("cuda", f".hstu-bootstrap-v1-cuda-{variant}", site, steps=steps, notes=notes)


def _run(cmd: list[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def probe(python: str = sys.executable) -> Machine:
    listed = _run(["nvidia-smi", "-L"]) or ""
    gpus = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    driver = _run(["nvidia-smi"]) or ""
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", driver)
    nvcc_out = _run(["nvcc", "--version"]) or ""
    n = re.search(r"release (\d+\.\d+)", nvcc_out)
    torch_info = _run([python, "-c", "import json, torch; print(json.dumps([torch.__version__, torch.version.cuda]))"])
    base_torch = base_cuda = None
    if torch_info:
        try:
            base_torch, base_cuda = json.loads(torch_info.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    return Machine(gpus, _version(m.group(1)) if m else None, _version(n.group(1)) if n else None, base_torch,
                   base_cuda)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--variant", default=None, help="PyTorch CUDA wheel variant, e.g. cu130 (default: detected)")
    parser.add_argument("--format", choices=("shell", "text", "json"), default="text")
    args = parser.parse_args(argv)
    try:
        p = plan(probe(), args.device, args.variant or None)
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(p.as_dict()))
    elif args.format == "shell":
        # sourced by bootstrap.sh: plan_device, plan_stamp, plan_site, plan_notes, plan_step_<i>, plan_steps
        print(f"plan_device={p.device}")
        print(f"plan_stamp={shlex.quote(p.stamp)}")
        print(f"plan_site={int(p.system_site_packages)}")
        print(f"plan_notes={shlex.quote(chr(10).join(p.notes))}")
        for i, step in enumerate(p.steps):
            print(f"plan_step_{i}=({' '.join(shlex.quote(a) for a in step)})")
        print(f"plan_steps={len(p.steps)}")
    else:
        print(f"device: {p.device}")
        for note in p.notes:
            print(f"note: {note}")
        for step in p.steps:
            print("pip install " + " ".join(shlex.quote(a) for a in step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
