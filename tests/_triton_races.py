"""Races between the programs of a Triton launch, found under the interpreter.

The interpreter runs a launch's programs one after another, so a kernel whose programs write the
same memory, or read what another program writes, gives the expected answer there and an
order-dependent one on a GPU. ``ProgramAccesses`` records, for each launch inside its block, which
bytes each program loads and stores (masked-off lanes excluded), and ``check()`` fails on

- a byte stored by two programs of one launch (the last writer wins, in no fixed order), and
- a byte loaded by one program and stored by another (the load may see either value).

A program reading and writing its own bytes (an accumulation into ``.grad``) is not a race. The
kernels use no atomics; an atomic would need its own rule here.
"""

from __future__ import annotations

import contextlib

import numpy as np

_RECORDING = []  # the ProgramAccesses recording now, innermost last: only that one records


class ProgramAccesses:
    def __init__(self):
        self.races = []  # one message per launch whose programs raced
        self.program_counts = {}  # kernel name -> the most programs one of its launches ran with accesses
        self._launch = None  # {"load": [(program, byte addresses)], "store": [...]} of the running launch

    @contextlib.contextmanager
    def recording(self):
        from triton.runtime import interpreter

        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        saved = builder.create_masked_load, builder.create_masked_store, executor.__call__
        record = self._record

        def masked_load(b, ptrs, mask, *args, **kwargs):
            record(b, "load", ptrs, mask)
            return saved[0](b, ptrs, mask, *args, **kwargs)

        def masked_store(b, ptrs, value, mask, *args, **kwargs):
            record(b, "store", ptrs, mask)
            return saved[1](b, ptrs, value, mask, *args, **kwargs)

        def launch(grid_executor, *args, **kwargs):
            if _RECORDING[-1] is not self:  # an inner recording (a test of this check) takes these launches
                return saved[2](grid_executor, *args, **kwargs)
            self._launch = {"load": [], "store": []}
            try:
                return saved[2](grid_executor, *args, **kwargs)
            finally:
                self._finish(grid_executor.fn.__name__)

        builder.create_masked_load, builder.create_masked_store, executor.__call__ = (
            masked_load, masked_store, launch)
        _RECORDING.append(self)
        try:
            yield self
        finally:
            _RECORDING.pop()
            builder.create_masked_load, builder.create_masked_store, executor.__call__ = saved

    def _record(self, builder, kind, ptrs, mask):
        if self._launch is None:
            return
        addresses = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        addresses = addresses[np.broadcast_to(mask.data, addresses.shape)].astype(np.uint64).ravel()
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        nbytes = (addresses[:, None] + np.arange(width, dtype=np.uint64)).ravel()
        x, y, z = builder.grid_idx
        nx, ny, _ = builder.grid_dim
        self._launch[kind].append(((z * ny + y) * nx + x, nbytes))

    def _finish(self, name):
        """Judge the launch that just ended, then drop its records."""
        accesses, self._launch = self._launch, None
        programs = {p for p, _ in accesses["load"] + accesses["store"]}
        self.program_counts[name] = max(self.program_counts.get(name, 0), len(programs))
        if len(programs) < 2 or not accesses["store"]:
            return
        store_at, store_by = _flat(accesses["store"])
        order = np.lexsort((store_by, store_at))
        store_at, store_by = store_at[order], store_by[order]
        twice = (store_at[1:] == store_at[:-1]) & (store_by[1:] != store_by[:-1])
        if twice.any():
            byte = store_at[1:][twice][0]
            writers = sorted(set(store_by[store_at == byte].tolist()))
            self.races.append(f"{name}: programs {writers} all store byte {int(byte):#x}")
        elif accesses["load"]:
            load_at, load_by = _flat(accesses["load"])
            at = np.searchsorted(store_at, load_at).clip(max=len(store_at) - 1)
            clash = (store_at[at] == load_at) & (store_by[at] != load_by)
            if clash.any():
                i = int(np.flatnonzero(clash)[0])
                self.races.append(f"{name}: program {int(load_by[i])} loads byte {int(load_at[i]):#x}, "
                                  f"which program {int(store_by[at[i]])} stores")

    def check(self):
        """Raise AssertionError naming every launch whose programs raced."""
        assert not self.races, "; ".join(self.races)

    def programs(self, name: str) -> int:
        """The most programs with memory accesses in one launch of kernel `name` (tests want several)."""
        return self.program_counts.get(name, 0)


def _flat(records) -> tuple[np.ndarray, np.ndarray]:
    """(byte addresses, the program of each) of a launch's loads or stores."""
    at = np.concatenate([b for _, b in records])
    by = np.concatenate([np.full(len(b), p, dtype=np.int64) for p, b in records])
    return at, by
