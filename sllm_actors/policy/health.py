"""Which GPUs may take work: load circuit breakers, poisoned devices and cordoned nodes, as a pure core.

A target is one GPU of one node. Three things keep work off it:

- its **circuit breaker**: ``BREAKER_THRESHOLD`` loads in a row that failed there open it; while open it starts
  no new instance (its ready instances still serve: a model that fails to load is not a reason to stop one
  that runs). After a back-off that doubles with each trip (``BACKOFF_S`` up to ``BACKOFF_MAX_S``) it is
  half-open: one load may try, and while it runs no other starts there; its success closes the breaker, its
  failure opens it again for twice as long. Without it, a node whose every load fails (the incident of issue 21:
  a GPU whose CUDA generator a crashed graph capture left broken) takes placement after placement and every
  request placed there fails.
- a **poisoned device**: a CUDA error that leaves the process's context broken for every later kernel (a
  capture interrupted by another thread, an illegal address, a device-side assert) is not a load's bad luck.
  The GPU is unhealthy at once (no requests, no instances) and its breaker open; the shell restarts the node
  process, the only way to get a fresh context, and the node's next incarnation clears the mark (the breaker
  still makes its first load a trial).
- a **cordoned node** (an operator's ``sllm cordon``/``drain``): no new requests nor instances on any of its GPUs;
  what runs there goes on (cordon) or moves away / finishes and is unloaded (drain).

And one thing keeps a *model* from loading anywhere: a **suspect model**. A load fails for the GPU's reasons or
the model's, and one failure cannot tell which; the pattern can. Where a model's loads fail on
``MODEL_SUSPECT_GPUS`` different GPUs, ``MODEL_SUSPECT_FAILURES`` times in all, with no load of it succeeding
anywhere meanwhile, the model is the suspect, not the devices: its failures stop counting against the GPUs (the
breakers its failures alone had opened close again, so the other models keep those GPUs), and its own breaker
opens: no load of it starts for ``MODEL_BACKOFF_S`` (doubling per trip up to ``MODEL_BACKOFF_MAX_S``), and a
request for it that no instance can take is answered at once with an error naming the model and what its loads
said, instead of waiting in the queue for loads that fail everywhere. Then one trial load may go (half-open); its
success clears the model, its failure holds it off for twice as long. Its ready instances (if some load of it
did succeed) go on serving. Checkpoint faults (a corrupt or missing file) never get here: they fail their
requests at once (the scheduler) and say nothing about a GPU.

Nothing here reads a clock: ``now`` is passed in, so the state machine is tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_S",
    "BREAKER_THRESHOLD",
    "MODEL_BACKOFF_MAX_S",
    "MODEL_BACKOFF_S",
    "MODEL_SUSPECT_FAILURES",
    "MODEL_SUSPECT_GPUS",
    "Breaker",
    "Health",
    "ModelHealth",
    "is_poisoned",
]

GpuKey = tuple[str, int]
"""(node, GPU index)."""

BREAKER_THRESHOLD = 3
"""Consecutive failed loads on a GPU that open its breaker: one failure can be the model's or the moment's
(a checkpoint still being written, memory briefly short); three in a row on the same GPU while others load
is the GPU's."""
BACKOFF_S = 5.0
"""How long a breaker first stays open: long enough that a burst of requests does not hammer a broken GPU
with loads, short enough that a GPU that recovered (its node restarted) is soon tried again."""
BACKOFF_MAX_S = 300.0
"""The back-off's cap: a GPU that keeps failing is still tried every five minutes."""
MODEL_SUSPECT_GPUS = 2
"""Different GPUs a model's loads must have failed on before the model, not the GPUs, is the suspect: on one GPU
alone the fault may be that GPU's."""
MODEL_SUSPECT_FAILURES = BREAKER_THRESHOLD
"""...and how many of its loads in all: as many as open a GPU's breaker, so one unlucky failure on each of two GPUs
(memory briefly short) does not yet hold a model off everywhere."""
MODEL_BACKOFF_S = 30.0
"""How long a suspect model first loads nowhere: its requests fail at once meanwhile, so this is how long an operator's
fix (a new checkpoint, a freed dependency) waits at most to be tried."""
MODEL_BACKOFF_MAX_S = 600.0

POISON_MARKERS = (
    "operation not permitted when stream is capturing",
    "offset increment outside graph capture",
    "capture may not be invalidated",
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "cuda error: an illegal instruction",
)
"""Error texts (lower case) of CUDA errors after which the process's device context is unusable: every later
load or step there fails the same way (seen: the first two, issue 21). Only a new process recovers."""


def is_poisoned(error: str) -> bool:
    """Whether ``error`` (a failed load's or a crashed instance's text) says the device context is broken."""
    text = error.lower()
    return any(marker in text for marker in POISON_MARKERS)


@dataclass
class Breaker:
    """One GPU's load circuit breaker: closed, open until ``opened_at + open_for``, then half-open."""

    threshold: int = BREAKER_THRESHOLD
    backoff_s: float = BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S
    failures: int = 0
    """Loads that failed in a row here."""
    tripped: bool = False
    opened_at: float = 0.0
    open_for: float = 0.0
    trips: int = 0
    """Times it opened since it last closed: the back-off doubles with each."""
    trial: bool = False
    """A half-open trial load is under way: no other load starts here until it ends."""
    reason: str = ""
    models: dict[str, int] = field(default_factory=dict)
    """model -> how many of the ``failures`` in a row were its loads (a suspect model's are taken back)."""

    def state(self, now: float) -> str:
        """``closed``, ``open`` or ``half_open`` at ``now``."""
        if not self.tripped:
            return "closed"
        return "open" if now < self.opened_at + self.open_for else "half_open"

    def allows_load(self, now: float) -> bool:
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self.trial)

    def load_started(self, now: float) -> None:
        if self.state(now) == "half_open":
            self.trial = True

    def failed(self, now: float, reason: str, model: str = "") -> bool:
        """A load (of ``model``) failed here; True when this opened the breaker."""
        self.failures += 1
        self.reason = reason
        if model:
            self.models[model] = self.models.get(model, 0) + 1
        state = self.state(now)
        if state == "open":
            return False  # a load that started before it opened: already counted in this trip's back-off
        if state == "half_open" or self.failures >= self.threshold:
            self.trip(now, reason)
            return True
        return False

    def trip(self, now: float, reason: str) -> None:
        """Open now, for the next back-off."""
        self.open_for = min(self.backoff_max_s, self.backoff_s * 2 ** self.trips)
        self.trips += 1
        self.tripped = True
        self.opened_at = now
        self.trial = False
        self.reason = reason

    def succeeded(self) -> None:
        """A load succeeded here: closed, and the back-off starts over."""
        self.failures = self.trips = 0
        self.tripped = self.trial = False
        self.reason = ""
        self.models.clear()

    def acquit(self, model: str) -> bool:
        """``model`` is the suspect: its failures here no longer count. True when that closed the breaker (they
        were all its failures)."""
        counted = self.models.pop(model, 0)
        if not counted:
            return False
        self.failures = max(0, self.failures - counted)
        if self.failures == 0:
            was = self.tripped
            self.succeeded()
            return was
        return False

    def retry_in(self, now: float) -> float:
        """Seconds until it is half-open (0 when not open)."""
        return max(0.0, self.opened_at + self.open_for - now) if self.tripped else 0.0


@dataclass
class ModelHealth:
    """One model's record of failed loads since a load of it last succeeded, and its own breaker (open: the
    model is the suspect and loads nowhere)."""

    breaker: Breaker
    failed_on: dict[GpuKey, str] = field(default_factory=dict)
    """GPU -> the last error a load of the model failed with there."""
    failures: int = 0

    def reason(self) -> str:
        where = "; ".join(f"{node}/gpu-{gpu}: {error}" for (node, gpu), error in sorted(self.failed_on.items()))
        return f"its loads failed {self.failures} times on {len(self.failed_on)} GPUs ({where})"


@dataclass
class Health:
    """The health of every GPU and node the scheduler places on, and of every model's loads. See the module's
    docstring."""

    breakers: dict[GpuKey, Breaker] = field(default_factory=dict)
    unhealthy: dict[GpuKey, str] = field(default_factory=dict)
    """GPU -> why its device context is poisoned (until its node's process restarts, or an operator resets it)."""
    cordoned: dict[str, str] = field(default_factory=dict)
    """node -> why it takes no new work."""
    draining: set[str] = field(default_factory=set)
    """Cordoned nodes whose instances are being emptied and unloaded."""
    models: dict[str, ModelHealth] = field(default_factory=dict)
    """model -> its failed loads since one last succeeded (only models with a failure since)."""
    acquitted: list[GpuKey] = field(default_factory=list)
    """After a ``suspect`` verdict: the GPUs whose breakers closed because the suspect's failures were all they
    held against them."""
    threshold: int = BREAKER_THRESHOLD
    backoff_s: float = BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S
    suspect_gpus: int = MODEL_SUSPECT_GPUS
    suspect_failures: int = MODEL_SUSPECT_FAILURES
    model_backoff_s: float = MODEL_BACKOFF_S
    model_backoff_max_s: float = MODEL_BACKOFF_MAX_S

    def breaker(self, key: GpuKey) -> Breaker:
        found = self.breakers.get(key)
        if found is None:
            found = self.breakers[key] = Breaker(self.threshold, self.backoff_s, self.backoff_max_s)
        return found

    def model(self, name: str) -> ModelHealth:
        found = self.models.get(name)
        if found is None:
            found = self.models[name] = ModelHealth(Breaker(1, self.model_backoff_s, self.model_backoff_max_s))
        return found

    # ------------------------------------------------------------------ what the scheduler reads

    def may_serve(self, key: GpuKey) -> bool:
        """Whether instances on ``key`` may take new requests."""
        return key[0] not in self.cordoned and key not in self.unhealthy

    def may_load(self, key: GpuKey, now: float) -> bool:
        """Whether a new instance may start on ``key`` at ``now``."""
        return self.may_serve(key) and self.breaker(key).allows_load(now)

    def model_may_load(self, model: str, now: float) -> bool:
        """Whether a new instance of ``model`` may start anywhere at ``now`` (False while it is the suspect)."""
        found = self.models.get(model)
        return found is None or found.breaker.allows_load(now)

    def model_held(self, model: str, now: float) -> str:
        """Why ``model`` loads nowhere now ('' when it may): for its requests' error and ``sllm status``."""
        found = self.models.get(model)
        if found is None or found.breaker.allows_load(now):
            return ""
        state = found.breaker.state(now)
        when = (f"held off for {found.breaker.retry_in(now):.0f}s more" if state == "open"
                else "a trial load is under way")
        return (f"model {model} is failing to load everywhere ({found.breaker.reason}); the GPUs stay in service, "
                f"loads of {model} are {when}")

    def why_not(self, key: GpuKey, now: float) -> str:
        """Why ``key`` takes no new instance ('' when it does)."""
        if key[0] in self.cordoned:
            return f"{key[0]} {'draining' if key[0] in self.draining else 'cordoned'}: {self.cordoned[key[0]]}"
        if key in self.unhealthy:
            return f"unhealthy: {self.unhealthy[key]}"
        breaker = self.breaker(key)
        state = breaker.state(now)
        if state == "open":
            return f"breaker open for {breaker.retry_in(now):.0f}s more: {breaker.reason}"
        if state == "half_open" and breaker.trial:
            return "breaker half-open: a trial load is under way"
        return ""

    # ------------------------------------------------------------------ what happened

    def load_started(self, key: GpuKey, now: float, model: str = "") -> None:
        self.breaker(key).load_started(now)
        if model in self.models:
            self.models[model].breaker.load_started(now)

    def load_succeeded(self, key: GpuKey, model: str = "") -> None:
        self.breaker(key).succeeded()
        self.models.pop(model, None)

    def load_abandoned(self, key: GpuKey, model: str = "") -> None:
        """A load on ``key`` ended with no verdict (its node was lost meanwhile): a half-open breaker's trial
        is free to run again, else the breaker would wait for a verdict that never comes."""
        self.breaker(key).trial = False
        if model in self.models:
            self.models[model].breaker.trial = False

    def load_failed(self, key: GpuKey, error: str, now: float, model: str = "") -> str:
        """A load (of ``model``) on ``key`` failed with ``error``: ``poisoned`` (the device is unhealthy and its
        node's process must restart), ``suspect`` (the model became the suspect: see ``acquitted``), ``held``
        (the model was the suspect already: a trial or a load started before failed; the GPU is not charged),
        ``opened`` (the GPU's breaker opened) or ``counted``."""
        if is_poisoned(error):
            self.poison(key, error, now)
            return "poisoned"
        if model:
            record = self.model(model)
            record.failed_on[key] = error
            record.failures += 1
            if record.breaker.tripped:
                if record.breaker.state(now) == "half_open":
                    record.breaker.trip(now, record.reason())
                return "held"
            if len(record.failed_on) >= self.suspect_gpus and record.failures >= self.suspect_failures:
                record.breaker.trip(now, record.reason())
                self.acquitted = [k for k, b in sorted(self.breakers.items()) if b.acquit(model)]
                return "suspect"
        return "opened" if self.breaker(key).failed(now, error, model) else "counted"

    def reset_model(self, model: str) -> bool:
        """An operator clears ``model``'s record (it was fixed); False when it had none."""
        return self.models.pop(model, None) is not None

    def instance_crashed(self, key: GpuKey, reason: str, now: float) -> bool:
        """An instance on ``key`` crashed; True when its reason poisons the device (a crash for any other reason
        is the request's or the model's, and counts against no breaker)."""
        if is_poisoned(reason):
            self.poison(key, reason, now)
            return True
        return False

    def poison(self, key: GpuKey, reason: str, now: float) -> None:
        self.unhealthy[key] = reason
        breaker = self.breaker(key)
        breaker.failures += 1
        breaker.trip(now, f"device context poisoned: {reason}")

    def node_restarted(self, node: str) -> None:
        """A new process of ``node`` joined: its devices have fresh contexts. Breakers stay as they are: the
        first load after a trip is still a trial."""
        for key in [k for k in self.unhealthy if k[0] == node]:
            del self.unhealthy[key]

    # ------------------------------------------------------------------ operators

    def cordon(self, node: str, why: str, *, drain: bool = False) -> None:
        self.cordoned[node] = why
        if drain:
            self.draining.add(node)

    def uncordon(self, node: str) -> bool:
        """False when ``node`` was not cordoned."""
        self.draining.discard(node)
        return self.cordoned.pop(node, None) is not None

    def drained(self, node: str) -> None:
        """``node`` holds nothing any more: it stays cordoned."""
        self.draining.discard(node)

    def reset(self, node: str, gpu: int | None = None) -> list[GpuKey]:
        """Close the breakers and clear the unhealthy marks of ``node``'s GPUs (only ``gpu``, if given); the
        GPUs that were open or unhealthy."""
        cleared = []
        for key in sorted(set(self.breakers) | set(self.unhealthy)):
            if key[0] != node or (gpu is not None and key[1] != gpu):
                continue
            was = key in self.unhealthy or self.breakers.get(key, Breaker()).tripped
            self.unhealthy.pop(key, None)
            if key in self.breakers:
                self.breakers[key].succeeded()
            if was:
                cleared.append(key)
        return cleared

    # ------------------------------------------------------------------ reports

    def gpu_state(self, key: GpuKey, now: float) -> str:
        """``healthy``, ``cordoned``, ``draining``, ``unhealthy``, ``breaker open`` or ``breaker half-open``."""
        if key in self.unhealthy:
            return "unhealthy"
        if key[0] in self.cordoned:
            return "draining" if key[0] in self.draining else "cordoned"
        state = self.breaker(key).state(now)
        return {"open": "breaker open", "half_open": "breaker half-open"}.get(state, "healthy")

    def report(self, keys: list[GpuKey], now: float) -> dict[str, Any]:
        """For ``sllm status``, the TUI and ``/metrics``: each GPU's state and reason, and the cordoned nodes."""
        gpus = []
        for key in keys:
            breaker = self.breaker(key)
            gpus.append({
                "node": key[0], "gpu": key[1], "state": self.gpu_state(key, now), "reason": self.why_not(key, now),
                "breaker": breaker.state(now), "failures": breaker.failures, "trips": breaker.trips,
                "retry_in_s": round(breaker.retry_in(now), 1),
            })
        nodes = {node: {"state": "draining" if node in self.draining else "cordoned", "reason": why}
                 for node, why in sorted(self.cordoned.items())}
        models = {name: {"state": {"open": "held", "half_open": "trial"}.get(m.breaker.state(now), "failing"),
                         "reason": self.model_held(name, now) or m.reason(), "failures": m.failures,
                         "gpus": [f"{node}/gpu-{gpu}" for node, gpu in sorted(m.failed_on)],
                         "retry_in_s": round(m.breaker.retry_in(now), 1)}
                  for name, m in sorted(self.models.items())}
        return {"gpus": gpus, "nodes": nodes, "models": models}
