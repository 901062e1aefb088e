"""The per-device gate that keeps CUDA graph captures apart from other engines' work on the same GPU
(``sllm_actors/gpu/device_gate.py``): its rules, on plain threads (no GPU needed)."""

from __future__ import annotations

import threading

from sllm_actors.gpu.device_gate import DeviceGate, device_gate

WAIT_S = 10.0


def _hold_shared(gate: DeviceGate, long: bool, holding: threading.Event, release: threading.Event) -> threading.Thread:
    def body() -> None:
        with gate.shared(long=long):
            holding.set()
            release.wait(WAIT_S)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    assert holding.wait(WAIT_S)
    return thread


def test_shared_holders_never_wait_for_each_other() -> None:
    gate = DeviceGate("cuda:0")
    release = threading.Event()
    first = _hold_shared(gate, False, threading.Event(), release)
    second = _hold_shared(gate, False, threading.Event(), release)  # would hang if shared excluded shared
    release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)


def test_a_capture_waits_for_an_in_flight_step_and_holds_new_ones_back() -> None:
    gate = DeviceGate("cuda:0")
    release, holding = threading.Event(), threading.Event()
    step = _hold_shared(gate, False, holding, release)
    got: list[bool] = []
    entered, new_step_ran = threading.Event(), threading.Event()
    order: list[str] = []

    def capture() -> None:
        with gate.exclusive(timeout=WAIT_S) as alone:
            got.append(alone)
            entered.set()
            order.append("capture")

    def new_step() -> None:
        with gate.shared():
            order.append("step")
            new_step_ran.set()

    capturer = threading.Thread(target=capture, daemon=True)
    capturer.start()
    # The capture is pending behind the in-flight step: a step arriving now waits behind the capture.
    assert not entered.wait(0.2)
    late = threading.Thread(target=new_step, daemon=True)
    late.start()
    assert not new_step_ran.wait(0.2)
    release.set()
    assert entered.wait(WAIT_S) and new_step_ran.wait(WAIT_S)
    for thread in (step, capturer, late):
        thread.join(WAIT_S)
    assert got == [True] and order == ["capture", "step"]


def test_a_capture_gives_up_at_once_while_a_load_is_in_flight() -> None:
    gate = DeviceGate("cuda:0")
    release = threading.Event()
    load = _hold_shared(gate, True, threading.Event(), release)
    with gate.exclusive(timeout=WAIT_S) as alone:
        assert alone is False
    with gate.exclusive_or_why(timeout=WAIT_S) as refused:
        assert refused == "load"
    with gate.shared():  # and nothing was left held
        pass
    release.set()
    load.join(WAIT_S)
    with gate.exclusive(timeout=WAIT_S) as alone:
        assert alone is True


def test_a_step_that_captures_upgrades_its_own_hold_and_two_never_deadlock() -> None:
    gate = DeviceGate("cuda:0")
    with gate.shared(), gate.exclusive(timeout=WAIT_S) as alone:
        assert alone  # its own shared hold does not count
        with gate.shared():  # re-entrant inside its own capture
            pass
    # Two steps that both want to capture: one gets the gate once the other's step ends, the other gives up.
    both_in, results = threading.Barrier(2, timeout=WAIT_S), []

    def step_then_capture() -> None:
        with gate.shared():
            both_in.wait()
            with gate.exclusive(timeout=1.0) as alone:
                results.append(alone)

    threads = [threading.Thread(target=step_then_capture, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == [False, True]


def test_a_cpu_device_has_no_gate_to_wait_on() -> None:
    gate = device_gate("cpu")
    with gate.shared(), gate.exclusive() as alone:
        assert alone
