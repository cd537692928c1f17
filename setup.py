"""Metadata lives in pyproject.toml; this file only decides about the optional CUDA extension.

dpkernels._C (sources in csrc/) needs a CUDA build of torch in the build environment (install with
``pip install --no-build-isolation``) and a CUDA toolkit (nvcc in $CUDA_HOME, on PATH, or in
/usr/local/cuda). No GPU is needed to build it.

    DPKERNELS_BUILD_CUDA   0: skip it; 1: any failure to build it is an error; unset: build it when
                           possible, otherwise (or when the build fails) install without it and say
                           why in one line
    DPKERNELS_CUDA_ARCHS   compute capabilities to compile for, e.g. "90" or "80;90" (default: 80 and
                           90, plus PTX of the newest so later GPUs can JIT it); when unset, a set
                           TORCH_CUDA_ARCH_LIST is used instead, as torch reads it
    MAX_JOBS               parallel compile jobs (torch's BuildExtension, with ninja when installed)
"""

import glob
import importlib.util
import os
import re
import shutil

from setuptools import setup

_DEFAULT_ARCHS = ("80", "90")


class CannotBuild(Exception):
    """A reason why the extension cannot be built here."""


def _say(message: str) -> None:
    print(f"dpkernels: {message}", flush=True)


def _cuda_home() -> str:
    """The toolkit with nvcc and the CUDA headers, exported as CUDA_HOME for torch to use.

    $CUDA_HOME (or $CUDA_PATH) when set, else /usr/local/cuda, else the toolkit around the nvcc on
    PATH (which may be a wrapper script outside any toolkit, hence the header check).
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        candidates = [explicit]
    else:
        candidates = ["/usr/local/cuda"]
        on_path = shutil.which("nvcc")
        if on_path:
            candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            # torch.utils.cpp_extension reads CUDA_HOME when first imported, so set it before that.
            os.environ["CUDA_HOME"] = home
            return home
    where = f"$CUDA_HOME={explicit}" if explicit else "/usr/local/cuda or around the nvcc on PATH"
    raise CannotBuild(f"no CUDA toolkit found (no bin/nvcc with include/cuda_runtime.h in {where})")


def _arch_flags() -> list[str]:
    """nvcc -gencode flags; [] leaves the choice to torch (TORCH_CUDA_ARCH_LIST)."""
    spec = os.environ.get("DPKERNELS_CUDA_ARCHS", "").strip()
    if not spec and os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return []
    archs = []
    for item in re.split(r"[;,\s]+", spec) if spec else _DEFAULT_ARCHS:
        arch = re.sub(r"^(sm_|compute_)", "", item).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"DPKERNELS_CUDA_ARCHS={spec!r}: {item!r} is not a compute capability like 80 or 9.0")
        archs.append(arch)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(re.sub(r"\D", "", a)))
    if newest.isdigit():  # arch-specific targets (90a) have no forward-compatible PTX
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _wheel_cuda_includes(torch) -> list[str]:
    """site-packages/nvidia/cuXX/include of torch's CUDA wheels (cusparse.h, cublas_v2.h, ...).

    Searched after the toolkit's own headers (-idirafter): a minimal toolkit lacks these, and the
    toolkit's copies win where both exist.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    sub = f"cu{torch.version.cuda.split('.')[0]}"
    dirs = [os.path.join(loc, sub, "include") for loc in spec.submodule_search_locations]
    return [flag for d in dirs if os.path.isdir(d) for flag in ("-idirafter", d)]


def _extension(strict: bool):
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        raise CannotBuild("csrc/ holds no extension sources")
    try:
        import torch
    except ImportError as exc:
        raise CannotBuild("torch is not importable here (install torch first, then pip install "
                          "--no-build-isolation)") from exc
    if torch.version.cuda is None:
        raise CannotBuild(f"torch {torch.__version__} is not a CUDA build")
    home = _cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension, is_ninja_available

    class BuildCudaExtension(BuildExtension):
        """torch's BuildExtension; outside strict mode a failed build installs the package without _C."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                if strict:
                    raise
                _say(f"building the CUDA extension dpkernels._C failed, installing without it: "
                     f"{type(exc).__name__}: {exc}")
                self.extensions.clear()  # nothing to copy or record

    arch = _arch_flags()
    ext = CUDAExtension(
        "dpkernels._C",
        sources,
        extra_compile_args={
            "cxx": ["-O3", *_wheel_cuda_includes(torch)],
            "nvcc": ["-O3", "-lineinfo", *arch],  # -lineinfo: compute-sanitizer reports source lines
        },
    )
    targets = " ".join(flag.rsplit("code=", 1)[1] for flag in arch) or "TORCH_CUDA_ARCH_LIST=" + os.environ[
        "TORCH_CUDA_ARCH_LIST"]
    _say(f"building the CUDA extension dpkernels._C with {home}/bin/nvcc for {targets}")
    return [ext], {"build_ext": BuildCudaExtension.with_options(use_ninja=is_ninja_available())}


def cuda_extensions():
    mode = os.environ.get("DPKERNELS_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"DPKERNELS_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        _say("DPKERNELS_BUILD_CUDA=0, not building the CUDA extension dpkernels._C")
        return [], {}
    try:
        return _extension(strict=mode == "1")
    except CannotBuild as exc:
        if mode == "1":
            raise RuntimeError(f"DPKERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {exc}") from exc
        _say(f"not building the CUDA extension dpkernels._C: {exc}")
        return [], {}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
