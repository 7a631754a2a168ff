"""Build script of the hstu package.

Without a CUDA build of torch, without nvcc, or with HSTU_SKIP_CUDA_BUILD=1, this installs the pure-Python package
and compiles nothing. With CUDA torch and nvcc it also builds the extension ``hstu._C`` from csrc/.

Environment switches:
  TORCH_CUDA_ARCH_LIST   architectures, default "8.0;9.0a" ("8.0" -> sm_80, "9.0a" -> sm_90a, "+PTX" adds PTX)
  MAX_JOBS               parallel compile jobs (ninja)
  HSTU_FORCE_BUILD=1     build the extension even when no GPU is visible (a CUDA torch and nvcc are still needed)
  HSTU_SKIP_CUDA_BUILD=1 never build the extension
  HSTU_DISABLE_BF16 / HSTU_DISABLE_FP16 / HSTU_DISABLE_HDIM{32,64,128,256} / HSTU_DISABLE_RAB /
  HSTU_DISABLE_BACKWARD / HSTU_DISABLE_SM80 (drop the 8.x targets from the architecture list) /
  HSTU_DISABLE_SM90 (skip the Hopper wgmma units, *_sm90.cu: the forward and the backward)
                         prune generated instantiations (csrc/hstu_attention/instantiations) to shorten builds
  The Hopper units (*_sm90.cu: fwd_kernel_sm90.h, bwd_kernel_sm90.h) are built only when the list holds 9.0a;
  then every unit gets -DHSTU_WITH_SM90_FWD and the launchers pick them per call on an sm_90 device
  (csrc/hstu_attention/heuristics.h). Their device code exists for sm_90a only (other targets compile a trapping
  stub).
  csrc/layer/uvqk.cu (the fused LayerNorm -> UVQK GEMM -> SiLU) holds its CUTLASS sm90 GEMM under the same condition
  (HSTU_WITH_SM90_FWD; sm_90a device code only) and a cuBLAS path for every architecture.
  HSTU_BENCH_VARIANTS=1  also compile the benchmark-only kernel variants (-DHSTU_BENCH_VARIANTS; selected with
                         KernelVariant.bench_* in hstu.ops.hstu_attention.cuda); production builds leave it off
  CUTLASS_INCLUDE_DIR    CUTLASS/CuTe headers; default: the installed nvidia-cutlass package's headers
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def log(msg: str) -> None:
    print(f"[hstu setup] {msg}", file=sys.stderr)


DISABLE_FLAGS = [
    "HSTU_DISABLE_BF16",
    "HSTU_DISABLE_FP16",
    "HSTU_DISABLE_HDIM32",
    "HSTU_DISABLE_HDIM64",
    "HSTU_DISABLE_HDIM128",
    "HSTU_DISABLE_HDIM256",
    "HSTU_DISABLE_RAB",
    "HSTU_DISABLE_BACKWARD",
    "HSTU_DISABLE_SM80",
    "HSTU_DISABLE_SM90",
]


def arch_list() -> list[str]:
    return [a for a in re.split(r"[;\s,]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a").strip()) if a]


def builds_sm90_fwd() -> bool:
    """Whether the Hopper forward units are built: sm_90a in the architecture list and no HSTU_DISABLE_SM90."""
    return not env_flag("HSTU_DISABLE_SM90") and any(a.replace("+PTX", "") == "9.0a" for a in arch_list())


def selected_instantiations() -> list[str]:
    """The generated translation units that survive the HSTU_DISABLE_* switches."""
    pattern = re.compile(r"hstu_(fwd|bwd)_(bf16|fp16)_hdim(\d+)_(norab|rab)_(sm80|sm90)\.cu$")
    out = []
    sm90 = builds_sm90_fwd()
    for path in sorted((CSRC / "hstu_attention" / "instantiations").glob("*.cu")):
        m = pattern.match(path.name)
        if not m:
            continue
        direction, dtype, hdim, rab, arch = m.groups()
        if arch == "sm90" and not sm90:
            continue
        if direction == "bwd" and env_flag("HSTU_DISABLE_BACKWARD"):
            continue
        if env_flag(f"HSTU_DISABLE_{dtype.upper()}") or env_flag(f"HSTU_DISABLE_HDIM{hdim}"):
            continue
        if rab == "rab" and env_flag("HSTU_DISABLE_RAB"):
            continue
        out.append(str(path.relative_to(ROOT)))
    return out


def arch_flags() -> list[str]:
    flags = []
    for item in arch_list():
        ptx = item.endswith("+PTX")
        item = item.replace("+PTX", "")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item)
        if not m:
            raise ValueError(f"cannot parse TORCH_CUDA_ARCH_LIST entry {item!r}")
        major, minor, suffix = m.groups()
        if int(major) < 8:
            log(f"skipping arch {item}: the kernels need sm_80 or newer")
            continue
        if int(major) == 8 and env_flag("HSTU_DISABLE_SM80"):
            continue
        num = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError("no CUDA architecture left to build for (TORCH_CUDA_ARCH_LIST / HSTU_DISABLE_SM80)")
    return flags


def cutlass_include() -> str | None:
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env and (pathlib.Path(env) / "cute").is_dir():
        return env
    try:
        import cutlass_library  # type: ignore

        path = pathlib.Path(cutlass_library.__file__).resolve().parent / "source" / "include"
        if (path / "cute").is_dir():
            return str(path)
    except ImportError:
        pass
    local = ROOT / "third_party" / "cutlass" / "include"
    if (local / "cute").is_dir():
        return str(local)
    return None


def cuda_extension_setup() -> dict:
    """setup() keyword arguments that add the CUDA extension, or {} when nothing should be built."""
    if env_flag("HSTU_SKIP_CUDA_BUILD"):
        log("HSTU_SKIP_CUDA_BUILD=1: installing the pure-Python package only")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable in the build environment: pure-Python install (use --no-build-isolation to build the extension)")
        return {}
    if torch.version.cuda is None:
        log("torch has no CUDA: pure-Python install")
        return {}
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None:
        log("nvcc / CUDA_HOME not found: pure-Python install")
        return {}
    if not torch.cuda.is_available() and not env_flag("HSTU_FORCE_BUILD") and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        log("no GPU visible and neither HSTU_FORCE_BUILD=1 nor TORCH_CUDA_ARCH_LIST set: building anyway for the default architectures")
    include = cutlass_include()
    if include is None:
        log("CUTLASS headers not found (set CUTLASS_INCLUDE_DIR or pip install nvidia-cutlass): pure-Python install")
        return {}
    sources = ["csrc/hstu_attention/hstu_api.cpp", "csrc/jagged/jagged.cu",
               "csrc/layer/norm_mul_dropout.cu", "csrc/layer/uvqk.cu"] + selected_instantiations()
    defines = [f"-D{name}" for name in DISABLE_FLAGS if env_flag(name)]
    if env_flag("HSTU_BENCH_VARIANTS"):
        defines.append("-DHSTU_BENCH_VARIANTS")
    if any(src.endswith("_sm90.cu") for src in sources):
        defines.append("-DHSTU_WITH_SM90_FWD")
    nvcc = [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-lineinfo",
        "-Xptxas=-warn-spills",
        "-DNDEBUG",
        *defines,
        *arch_flags(),
    ]
    if os.environ.get("NVCC_THREADS"):
        nvcc.append(f"--threads={os.environ['NVCC_THREADS']}")
    cxx = ["-O3", "-std=c++17", "-DNDEBUG", *defines]
    ext = cpp_extension.CUDAExtension(
        name="hstu._C",
        sources=sources,
        include_dirs=[str(CSRC / "hstu_attention"), include],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    log(f"building hstu._C from {len(sources)} sources for {' '.join(arch_flags())}")
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(
    name="hstu",
    version="0.1.0",
    description="Open training stack for HSTU generative recommenders",
    packages=find_packages(include=["hstu", "hstu.*"]),
    python_requires=">=3.10",
    install_requires=[],
    zip_safe=False,
    **cuda_extension_setup(),
)
