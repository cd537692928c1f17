"""Read an sm_90 binary without a GPU: resources (registers, stack, shared memory) and SASS.

``compile_launches`` runs a Triton launcher on meta tensors with a stand-in sm_90 driver, so the
JIT specializes and compiles each launch exactly as it would on an H100/H200 (the same binder:
16-byte-aligned pointers, divisibility of the integer arguments, constexprs, the autotuner's
configs), and returns each compiled kernel instead of launching it. ``Sass`` parses the
disassembly (Triton's bundled ``cuobjdump``) into instructions and loops.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_RESOURCES = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")
_BRANCH = re.compile(r"\b(?:P\d+,\s*)?0x([0-9a-f]+)\s*$")


def tool(name: str) -> str:
    """Path of a CUDA binary tool shipped inside Triton's NVIDIA backend (cuobjdump, nvdisasm)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


@dataclass
class Function:
    """One kernel's SASS and resources."""

    name: str
    instructions: list[Instruction]
    registers: int = 0
    stack: int = 0  # bytes of local memory per thread: > 0 means spills (or a local array)
    shared: int = 0  # static shared memory, bytes
    loops: list[tuple[int, int]] = field(default_factory=list)  # (start index, end index) of each loop body

    def __post_init__(self):
        self.instructions = [i for i in self.instructions if i.base != "NOP"]
        by_address = {ins.address: k for k, ins in enumerate(self.instructions)}
        for k, ins in enumerate(self.instructions):
            m = _BRANCH.search(ins.operands) if ins.base == "BRA" else None
            if m and int(m.group(1), 16) <= ins.address:  # a backward branch closes a loop
                start = by_address.get(int(m.group(1), 16))
                if start is not None:
                    self.loops.append((start, k))
        # The tail of every kernel is a self-branch (`BRA .` after EXIT): not a loop.
        self.loops = [(s, e) for s, e in self.loops if e > s]

    def count(self, instructions=None) -> int:
        """Instructions issued, NOPs excluded (the trailing EXIT/self-branch padding counts once)."""
        return len(self.instructions if instructions is None else instructions)

    def histogram(self, instructions=None) -> collections.Counter:
        return collections.Counter(i.opcode for i in (self.instructions if instructions is None else instructions))

    def loop_span(self, containing: str | None = None) -> tuple[int, int] | None:
        """(start, end) indices of the largest loop (or of the largest loop holding an instruction
        whose opcode starts with `containing`, e.g. "LDG.E.128" for a vector path), or None."""
        loops = self.loops
        if containing is not None:
            loops = [(s, e) for s, e in loops
                     if any(i.opcode.startswith(containing) for i in self.instructions[s:e + 1])]
        return max(loops, key=lambda se: se[1] - se[0]) if loops else None

    def loop_body(self, containing: str | None = None) -> list[Instruction]:
        """The instructions of the loop that loop_span picks ([] when there is none)."""
        span = self.loop_span(containing)
        return self.instructions[span[0]:span[1] + 1] if span else []

    def other_loops(self, containing: str | None = None) -> list[Instruction]:
        """The instructions of every loop disjoint from the one loop_span picks (e.g. a grid-stride
        kernel's scalar tail loop beside its vector loop)."""
        span = self.loop_span(containing)
        if span is None:
            return []
        idle = sorted({k for s, e in self.loops if e < span[0] or s > span[1] for k in range(s, e + 1)})
        return [self.instructions[k] for k in idle]

    def memory_ops(self, instructions=None) -> collections.Counter:
        """Global loads and stores by opcode (LDG.E.128 is a 16-byte access per thread)."""
        return collections.Counter(i.opcode for i in (self.instructions if instructions is None else instructions)
                                   if i.base in ("LDG", "STG", "LDGSTS", "UTMALDG", "UBLKCP", "RED", "ATOMG"))


def access_bytes(opcode: str) -> int:
    """Bytes per thread of one global access opcode: LDG.E.128 -> 16, LDG.E.U16 -> 2, LDG.E -> 4."""
    for width, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if f".{width}" in opcode:
            return nbytes
    return 4


@functools.cache
def _cuobjdump(binary: bytes | str, arch: str) -> tuple[str, str]:
    """(SASS, resource usage) of a cubin or an ELF: cached, since the launches of many shapes share
    one specialization, hence one cubin."""
    with contextlib.ExitStack() as stack:
        if isinstance(binary, bytes):
            f = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".cubin"))
            f.write(binary)
            f.flush()
            path = f.name
        else:
            path = binary
        cuobjdump = [tool("cuobjdump"), "-arch", arch]
        sass = subprocess.run([*cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([*cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


def disassemble(binary: bytes | str, arch: str = "sm_90") -> dict[str, Function]:
    """Functions of a cubin (bytes) or of an ELF/.so holding cubins (path), by mangled name: those
    built for `arch` only (an extension built for sm_80 and sm_90 holds each kernel twice)."""
    sass, usage = _cuobjdump(binary, arch)
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append(Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip()))
    out = {name: Function(name, ins) for name, ins in functions.items()}
    for m in _RESOURCES.finditer(usage):
        if m.group(1) in out:
            fn = out[m.group(1)]
            fn.registers, fn.stack, fn.shared = int(m.group(2)), int(m.group(3)), int(m.group(4))
    return out


@dataclass
class Launch:
    """One Triton launch, compiled for sm_90 as the runtime would have compiled it."""

    kernel: str  # the @triton.jit function's name
    compiled: object  # triton.compiler.CompiledKernel
    grid: tuple[int, int, int]
    constants: dict  # the launch's constexpr arguments (block sizes, feature flags)
    scalars: dict  # its integer and float arguments (sizes, strides, loop bounds)
    num_warps: int
    num_stages: int

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def function(self) -> Function:
        (fn,) = disassemble(self.compiled.asm["cubin"]).values()
        fn.shared = max(fn.shared, int(self.compiled.metadata.shared))  # dynamic shared memory included
        return fn


class _Sm90Driver:
    """What Triton's JIT asks of its driver before a launch, answered for an sm_90 device."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_launches():
    """Within the block, Triton launches compile for sm_90 and are recorded, not run (yields the
    list of :class:`Launch`). An autotuned kernel compiles every config. Needs TRITON_INTERPRET unset
    before triton is first imported; launchers get meta tensors (their data_ptr is 0, aligned)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_launches needs the real compiler: unset TRITON_INTERPRET before importing triton")
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip(self.arg_names, args, strict=False)) | kwargs  # trailing defaults unbound
        size = grid(bound) if callable(grid) else grid
        size = tuple(size) + (1,) * (3 - len(size))
        constants = {p.name: bound[p.name] for p in self.params if p.is_constexpr and p.name in bound}
        scalars = {name: v for name, v in bound.items()
                   if name not in constants and isinstance(v, (int, float)) and not isinstance(v, bool)}
        launches.append(Launch(self.fn.__name__, kernel, size, constants, scalars, kernel.metadata.num_warps,
                               kernel.metadata.num_stages))
        return kernel

    def tune(self, *args, **kwargs):
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    previous = driver._active  # reset_active() would create the real driver, which needs a GPU
    driver.set_active(_Sm90Driver())
    JITFunction.run, Autotuner.run = run, tune
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver._active = previous
