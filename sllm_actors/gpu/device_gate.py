"""Engines that share a CUDA device in one process: a gate per device, so a CUDA graph capture never runs beside
another engine's work on that device.

Two instances on one GPU in one node process (a resume or a scale-out on the node makes them) run on two actor
threads. A CUDA stream capture is fragile against what other threads do on the device meanwhile:

- in CUDA's default ("global") capture mode, an unsafe call on *any* thread (a ``cudaMalloc`` from the caching
  allocator, a pageable copy) fails with "operation not permitted when stream is capturing" and invalidates
  the capture. Captures therefore use ``capture_error_mode="thread_local"`` (only the capturing thread is held
  to the rules), but that is not enough:
- a device-wide synchronisation (``torch.cuda.synchronize``, which an engine's cache rebuild and the loader run,
  or ``cudaFree`` under ``empty_cache``) from another thread breaks a capture in every mode;
- a capture marks the device's default random generator as capturing, and a draw on it from another thread
  (``torch.randn`` in a load) fails, and after a failed capture fails for ever. Nothing in the engine or its
  set-up draws on that generator (the norm probe uses a CPU generator of its own), but other code might.

The narrowest lock that makes this safe is a readers-writer gate per device: an engine's step, its set-up and
its cache copies, and a model's load on the device hold it *shared*, so they never wait for each other (two
instances on one GPU keep overlapping their host work, which is where their throughput comes from); a capture
holds it *exclusive* for the capture alone (tens of milliseconds, a few times in an engine's life), so nothing
of ours touches the device while it runs. A capture prefers itself over new shared holders (or it would starve
under two busy engines) but waits for in-flight ones only briefly, and not at all while a load (a long holder)
is in flight: it then gives up and the step runs eagerly, the capture tried again later. A capture is taken
by a thread that is inside its own engine's step (holding the gate shared): its own hold does not count.

On top, one capture at a time in the whole process (torch documents that restriction: its graph context
synchronises its device and empties the caching allocator of every device when it opens), and
:func:`quiet_for_captures` for what frees device memory process-wide (an unload's ``empty_cache``).
CPU devices get a gate that does nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CAPTURE_WAIT_S = 0.5
"""How long a capture waits for in-flight steps on its device (a step is milliseconds; a long prefill of a big
model a few hundred) before it gives up for now."""

_CAPTURE_LOCK = threading.Lock()
"""One capture at a time in the process, on any device."""


class DeviceGate:
    """A readers-writer gate of one CUDA device (see the module's docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        """thread id -> shared holds (re-entrant: an engine's step may call its cache rebuild)."""
        self._long = 0
        """Shared holds of loads in flight: a capture does not wait for them."""
        self._writer: int | None = None
        self._pending: int | None = None
        """The thread that waits for the gate exclusive; new shared holders wait behind it."""

    @contextmanager
    def shared(self, *, long: bool = False) -> Iterator[None]:
        """Work on the device that must not overlap a capture: an engine's step, set-up or cache copy; ``long``
        for a model's load (seconds), which a capture does not wait for."""
        me = threading.get_ident()
        with self._cond:
            if me not in self._readers and self._writer != me:
                while self._writer is not None or self._pending is not None:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
            self._long += long
        try:
            yield
        finally:
            with self._cond:
                left = self._readers[me] - 1
                if left:
                    self._readers[me] = left
                else:
                    del self._readers[me]
                self._long -= long
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float = CAPTURE_WAIT_S) -> Iterator[bool]:
        """The device alone (a capture): yields True once no other thread holds the gate, or False at once
        (nothing held) when a load is in flight, another thread waits for it exclusive, or ``timeout`` passed."""
        with self.exclusive_or_why(timeout) as refused:
            yield not refused

    @contextmanager
    def exclusive_or_why(self, timeout: float = CAPTURE_WAIT_S) -> Iterator[str]:
        """As :meth:`exclusive`, yielding why not: ``""`` (held), ``"capture"`` (another capture on this device),
        ``"load"`` (a load in flight) or ``"timeout"``."""
        me = threading.get_ident()
        refused = self._acquire(me, timeout)
        try:
            yield refused
        finally:
            if not refused:
                with self._cond:
                    self._writer = None
                    self._cond.notify_all()

    def _acquire(self, me: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._writer is not None or self._pending is not None:
                return "capture"
            self._pending = me
            try:
                while True:
                    if self._long:
                        return "load"
                    if all(thread == me for thread in self._readers):
                        self._writer = me
                        return ""
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return "timeout"
                    self._cond.wait(left)
            finally:
                self._pending = None
                self._cond.notify_all()


class _NoGate:
    """A CPU device's gate: no captures there, nothing to keep apart."""

    @contextmanager
    def shared(self, *, long: bool = False) -> Iterator[None]:
        yield

    @contextmanager
    def exclusive(self, timeout: float = CAPTURE_WAIT_S) -> Iterator[bool]:
        yield True

    @contextmanager
    def exclusive_or_why(self, timeout: float = CAPTURE_WAIT_S) -> Iterator[str]:
        yield ""


_NO_GATE = _NoGate()
_gates: dict[str, DeviceGate] = {}
_gates_lock = threading.Lock()


def device_gate(device: Any) -> DeviceGate | _NoGate:
    """The process-wide gate of ``device`` (a ``torch.device`` or its name; ``"cuda"`` is the current one)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return _NO_GATE
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    key = f"cuda:{index}"
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = DeviceGate(key)
        return gate


@contextmanager
def capturing(device: Any, timeout: float = CAPTURE_WAIT_S) -> Iterator[str]:
    """Hold what a capture on ``device`` needs: its gate exclusive, then the process's capture lock. Yields ``""``
    when held, else why not (``"capture"``: another capture, on this device or another; ``"load"``; ``"timeout"``),
    holding nothing: capture later. The gate comes first: a thread that holds the capture lock is capturing and
    waits for nothing, so no cycle can form."""
    with device_gate(device).exclusive_or_why(timeout) as refused:
        if refused:
            yield refused
            return
        if not _CAPTURE_LOCK.acquire(timeout=timeout):
            yield "capture"
            return
        try:
            yield ""
        finally:
            _CAPTURE_LOCK.release()


@contextmanager
def quiet_for_captures() -> Iterator[None]:
    """No capture on any device while held: for what frees device memory process-wide (``empty_cache``)."""
    with _CAPTURE_LOCK:
        yield


__all__ = ["CAPTURE_WAIT_S", "DeviceGate", "capturing", "device_gate", "quiet_for_captures"]
