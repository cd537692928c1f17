"""Build and drive the CPU emulation of the CUDA kernels (tests/cuda_emulator/).

csrc/gates.cu, scatter.cu and sddmm.cu are compiled by the host compiler, unchanged but for each
`kernel<<<config>>>(args)`, which becomes `::cuda_emulator::launch(config, kernel, args)`, with
AddressSanitizer and UndefinedBehaviorSanitizer, and linked with a harness that runs one launcher
per process on arrays passed through files (ASan must own the process, so not a ctypes library).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMULATOR = Path(__file__).resolve().parent / "cuda_emulator"
KERNEL_SOURCES = ("gates.cu", "scatter.cu", "sddmm.cu")
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer")

# ElemType of csrc/launchers.h
ELEM_TYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CUDA_ERROR_INVALID_CONFIGURATION = 9  # cudaErrorInvalidConfiguration

# `name` or `name<args>` (no nested angle brackets), then <<<config>>>(
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;{}()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def rewrite_launches(source: str) -> str:
    """`kernel<<<cfg>>>(args)` -> `::cuda_emulator::launch(::cuda_emulator::LaunchConfig(cfg), kernel, args)`."""
    rewritten, count = _LAUNCH.subn(r"::cuda_emulator::launch(::cuda_emulator::LaunchConfig(\2), \1, ", source)
    if count != source.count("<<<"):
        raise RuntimeError(f"rewrote {count} of {source.count('<<<')} kernel launches")
    return rewritten


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_fp16.h), as setup.py finds it."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        inc = Path(home) / "include"
        if (inc / "cuda_runtime.h").is_file() and (inc / "cuda_bf16.h").is_file():
            return inc
    return None


@functools.cache
def missing() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "no host C++ compiler (g++)"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_runtime.h); set CUDA_HOME"
    with tempfile.TemporaryDirectory() as tmp:  # the sanitizer runtimes may be missing (libasan, libubsan)
        probe = Path(tmp) / "probe.cpp"
        probe.write_text("int main() { return 0; }\n")
        proc = subprocess.run(["g++", *SANITIZE, str(probe), "-o", str(Path(tmp) / "probe")], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return f"g++ cannot link with {' '.join(SANITIZE[:1])}: {proc.stderr.strip()[-300:]}"
    return None


def _sources() -> list[Path]:
    return [CSRC / s for s in KERNEL_SOURCES] + [EMULATOR / "harness.cpp"]


def compile_flags() -> list[str]:
    """g++ flags of every emulated source: the sanitizers, csrc/ and the CUDA headers, emulator.h first."""
    return ["-std=c++17", "-O1", "-g", "-pthread", *SANITIZE, "-I", str(CSRC), "-I", str(EMULATOR), "-I",
            str(cuda_include_dir()), "-include", str(EMULATOR / "emulator.h")]


def build(out_dir: Path) -> Path:
    """Compile the kernels and the harness (in parallel, one g++ per file); returns the executable."""
    flags = compile_flags()
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in [*_sources(), EMULATOR / "emulator.h", *sorted(CSRC.glob("*.h")), *sorted(CSRC.glob("*.cuh"))]:
        digest.update(path.read_bytes())
    exe = out_dir / f"harness-{digest.hexdigest()[:16]}"
    if exe.exists():
        return exe
    jobs, objects = [], []
    for src in _sources():
        rewritten = out_dir / f"{src.stem}.emulated.cpp"
        rewritten.write_text(f'#line 1 "{src}"\n' + rewrite_launches(src.read_text()))
        obj = out_dir / f"{src.stem}.o"
        objects.append(obj)
        jobs.append(subprocess.Popen(["g++", *flags, "-c", str(rewritten), "-o", str(obj)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    errors = [out for job in jobs if (out := job.communicate()[0]) and job.returncode != 0]
    if errors:
        raise RuntimeError("compiling the emulated kernels failed:\n" + "\n".join(errors))
    subprocess.run(["g++", *SANITIZE, "-pthread", *map(str, objects), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    return exe


class LaunchFailed(RuntimeError):
    """The harness process died: a sanitizer report or an emulator abort (in the message)."""


class Harness:
    """Runs one launcher per call: `run(op, scalars, arrays, tables)` -> (status, arrays after)."""

    def __init__(self, exe: Path, work_dir: Path):
        self.exe, self.work_dir = exe, work_dir

    def run(self, op: str, scalars: dict, arrays: dict, tables: dict | None = None):
        """arrays: name -> tensor, or (tensor, misalign in bytes); tables: name -> list of array names.

        Returns (cudaError_t as int, {name: tensor of the same dtype and shape after the launch}).
        """
        job = Path(tempfile.mkdtemp(prefix="job", dir=self.work_dir))
        try:
            return self._run(job, op, scalars, arrays, tables or {})
        finally:
            shutil.rmtree(job)

    def _run(self, job: Path, op: str, scalars: dict, arrays: dict, tables: dict):
        lines = [f"op {op}"]
        lines += [f"scalar {k} {int(v) if isinstance(v, bool) else v}" for k, v in scalars.items()]
        layout = {}
        for name, spec in arrays.items():
            tensor, misalign = spec if isinstance(spec, tuple) else (spec, 0)
            tensor = tensor.detach().contiguous().cpu()
            layout[name] = tensor
            raw = tensor.view(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
            (job / f"{name}.bin").write_bytes(raw.numpy().tobytes())
            lines.append(f"array {name} {raw.numel()} {misalign}")
        for name, members in tables.items():
            lines.append(f"table {name} {' '.join(members)}")
        (job / "job.txt").write_text("\n".join(lines) + "\n")
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
        proc = subprocess.run([str(self.exe), str(job)], capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            report = proc.stderr if len(proc.stderr) <= 8000 else f"{proc.stderr[:4000]}\n...\n{proc.stderr[-4000:]}"
            raise LaunchFailed(f"{op}: harness exited with {proc.returncode}\n{report}")
        status = int(re.search(r"status (-?\d+)", proc.stdout).group(1))
        out = {}
        for name, tensor in layout.items():
            data = bytearray((job / f"{name}.out").read_bytes())
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            out[name] = flat.view(tensor.dtype).view(tensor.shape).clone()
        return status, out
