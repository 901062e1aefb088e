"""The live-migration protocol's two sides driven against each other by hand: no actors, no sockets.

Each side is a state machine that takes a message and an engine and returns an ``Outbox``; these tests carry the
messages from one side to the other themselves and check, step by step, what each side asks to send. Two real
engines on a tiny model stand for the source and the destination instance, so the request the destination
takes over must go on with exactly the tokens it would have produced at the source.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.messages import (
    KvCopyBegin,
    KvCopyChunk,
    Migrated,
    MigrateOut,
    MigrationEnded,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
    StartInference,
)
from sllm_actors.migration import (
    ArmTimer,
    MigrationDestination,
    MigrationSource,
    MigrationTimeout,
    Outbox,
    PrefillTimed,
    Publish,
    RunNow,
)
from sllm_actors.migration.destination import PARKED_TTL_S
from sllm_actors.migration.source import COPY_TIMEOUT_MIN_S, ROUND_TIMEOUT_S

PROMPT = "Once upon a time there was a small model"
MAX_TOKENS = 40
SEED, TEMPERATURE, TOP_P = 5, 0.8, 0.9
"""Sampled, not greedy: a continuation only matches if the destination samples each step as the source would."""


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> tuple[Any, Any]:
    from sllm_actors.models import load_for_inference

    return load_for_inference(tiny_model, "cpu")


def _engine(loaded: tuple[Any, Any]) -> Any:
    from sllm_actors.gpu.engine import Engine

    model, tokenizer = loaded
    return Engine(model, tokenizer, kv_cache_bytes=4 * 1024**2)


def _request(engine: Any, request_id: str = "r1") -> Any:
    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams

    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, seed=SEED)
    return Sequence(request_id, engine.tokenize(PROMPT, chat=False), [], sampling)


def _reference(engine: Any) -> list[int]:
    """The request's tokens undisturbed, on one engine."""
    seq = _request(engine, "reference")
    engine.add(seq)
    while engine.has_work():
        engine.step_batch()
    return list(seq.generated_ids)


def _decode(engine: Any, steps: int) -> None:
    for _ in range(steps):
        engine.step_batch()


def _finish_here(engine: Any, seq: Any) -> list[int]:
    """What the instance does with a request the destination hands back (``RunNow``): its next token at once,
    then the batch."""
    engine.step(seq)
    if not seq.finish_reason:
        engine.admit(seq)
        while engine.has_work():
            engine.step_batch()
    return list(seq.generated_ids)


def _order(rid: str, transfer: str = "recompute", **knobs: Any) -> MigrateOut:
    return MigrateOut("m1", "src-i", "node-b", "dst-i", [rid], transfer=transfer, **knobs)


class Pair:
    """A source instance and a destination instance, each an engine with its migration side."""

    def __init__(self, loaded: tuple[Any, Any]) -> None:
        self.src_engine, self.dst_engine = _engine(loaded), _engine(loaded)
        self.source = MigrationSource("src-i", "node-a", name="source")
        self.dest = MigrationDestination(name="dest")
        self.finished_at_dest: set[str] = set()

    def start(self, steps: int) -> Any:
        seq = _request(self.src_engine)
        self.src_engine.add(seq)
        _decode(self.src_engine, steps)
        assert seq.num_cached > 0 and len(seq.generated_ids) == steps
        return seq

    def to_dest(self, outbox: Outbox) -> list[Outbox]:
        """Deliver every message addressed to the destination node; their outboxes, in order."""
        answers = []
        for send in outbox.sends:
            msg = send.message
            if send.address != "node-b":
                continue
            if isinstance(msg, ResumeRequest):
                answers.append(self.dest.resume_in(msg, self.dst_engine, self.finished_at_dest))
            elif isinstance(msg, KvCopyBegin):
                answers.append(self.dest.copy_begin(msg, self.dst_engine))
            elif isinstance(msg, KvCopyChunk):
                answers.append(self.dest.copy_chunk(msg, self.dst_engine))
            else:
                raise TypeError(f"unexpected message for the destination: {msg!r}")
        return answers


def _only(outboxes: list[Outbox]) -> Outbox:
    """The one outbox of a delivery that asked for anything."""
    busy = [o for o in outboxes if o.actions]
    assert len(busy) == 1, busy
    return busy[0]


def test_a_recomputed_migration_hands_over_in_rounds_and_continues_exactly(loaded: tuple[Any, Any]) -> None:
    reference = _reference(_engine(loaded))
    pair = Pair(loaded)
    seq = pair.start(steps=4)

    # Round 0: the whole log, to recompute the cache from; the board shows the instance migrating.
    out = pair.source.migrate_out(_order("r1", delta_tokens=3, max_rounds=3), pair.src_engine)
    [resume] = out.messages
    assert isinstance(resume, ResumeRequest) and out.sends[0].address == "node-b"
    assert (resume.round, resume.final, resume.source_node, resume.source_instance) == (0, False, "node-a", "src-i")
    assert resume.prompt_ids == seq.prompt_ids and resume.generated_ids == seq.generated_ids == reference[:4]
    assert out.timers == [ArmTimer(ROUND_TIMEOUT_S, MigrationTimeout("m1", "r1", 0))]
    assert Publish() in out.actions and pair.source.busy()

    # The destination prefills the log, parks the cache and answers; its prefill is a cost sample for the source.
    answer = _only(pair.to_dest(out))
    [done] = answer.messages
    assert isinstance(done, ResumeDone) and answer.sends[0].address == "node-a"
    assert (done.round, done.request_id, done.instance_id, done.n_tokens) == (0, "r1", "src-i", len(seq.tokens))
    assert [a.tokens for a in answer.actions if isinstance(a, PrefillTimed)] == [len(seq.tokens)]
    assert "r1" in pair.dest.parked

    # Meanwhile the source went on: enough new tokens for another round, which sends just those.
    _decode(pair.src_engine, 3)
    out = pair.source.round_done(done, pair.src_engine)
    [resume] = out.messages
    assert isinstance(resume, ResumeRequest)
    assert (resume.round, resume.prompt_ids, resume.generated_ids) == (1, [], reference[4:7])
    answer = _only(pair.to_dest(out))
    [done] = answer.messages
    assert isinstance(done, ResumeDone) and (done.round, done.n_tokens) == (1, 3)

    # Fewer than delta_tokens new: the hand-over. The router hears Migrated first, then the destination the last
    # tokens; the order ends.
    _decode(pair.src_engine, 1)
    out = pair.source.round_done(done, pair.src_engine)
    migrated, final, ended = out.messages
    assert isinstance(migrated, Migrated) and out.sends[0].address == ""
    assert (migrated.request_id, migrated.source_instance, migrated.dest_node, migrated.dest_instance) == \
        ("r1", "src-i", "node-b", "dst-i")
    assert (migrated.n_generated, migrated.rounds, migrated.transfer) == (8, 2, "recompute")
    assert migrated.tokens_recomputed == len(seq.prompt_ids) + 4 + 3 + 1
    assert isinstance(final, ResumeRequest) and out.sends[1].address == "node-b"
    assert (final.round, final.final, final.generated_ids) == (2, True, reference[7:8])
    assert ended == MigrationEnded("m1", "src-i", "done", "")
    assert [e.kind for e in out.events] == ["migrate"] and out.actions[-1] == Publish()
    assert pair.src_engine.get("r1") is None and not pair.source.busy()

    # The destination feeds the last token and gives the request back to run now; nothing goes on the wire.
    answer = _only(pair.to_dest(out))
    [run] = answer.actions
    assert isinstance(run, RunNow) and run.seq.generated_ids == reference[:8] and not pair.dest.parked
    assert _finish_here(pair.dst_engine, run.seq) == reference


def test_a_kv_copy_is_sent_in_chunks_and_continues_exactly(loaded: tuple[Any, Any]) -> None:
    reference = _reference(_engine(loaded))
    pair = Pair(loaded)
    seq = pair.start(steps=5)

    out = pair.source.migrate_out(_order("r1", "copy", delta_tokens=100), pair.src_engine)
    begin, *chunks = out.messages
    assert isinstance(begin, KvCopyBegin) and begin.round == 0 and begin.n_cached == seq.num_cached
    assert begin.generated_ids == reference[:5] and len(chunks) == begin.n_chunks >= 1
    assert [c.index for c in chunks] == list(range(begin.n_chunks))  # type: ignore[attr-defined]
    assert all(s.address == "node-b" for s in out.sends)
    # The whole (small) copy went at once: its answer is awaited a while, then it recomputes.
    [timer] = out.timers
    assert timer.seconds >= COPY_TIMEOUT_MIN_S and timer.timeout == MigrationTimeout("m1", "r1", 0)
    assert not pair.source.copies_pending()

    answers = pair.to_dest(out)
    assert all(not a.actions for a in answers[:-1])  # the begin and all chunks but the last: nothing to say
    [done] = answers[-1].messages
    assert isinstance(done, ResumeDone) and (done.round, done.n_tokens) == (0, len(seq.tokens))

    # delta_tokens is never reached: the next answer hands over.
    _decode(pair.src_engine, 2)
    out = pair.source.round_done(done, pair.src_engine)
    migrated, final, ended = out.messages
    assert isinstance(migrated, Migrated) and migrated.transfer == "copy" and migrated.kv_bytes == begin.total_bytes
    assert isinstance(final, ResumeRequest) and final.final and final.generated_ids == reference[5:7]
    assert isinstance(ended, MigrationEnded) and ended.outcome == "done"
    [run] = _only(pair.to_dest(out)).actions
    assert isinstance(run, RunNow)
    assert _finish_here(pair.dst_engine, run.seq) == reference


def test_a_refused_copy_falls_back_to_recomputing(loaded: tuple[Any, Any]) -> None:
    pair = Pair(loaded)
    seq = pair.start(steps=3)
    out = pair.source.migrate_out(_order("r1", "copy"), pair.src_engine)
    begin, *chunks = out.messages
    assert isinstance(begin, KvCopyBegin)
    last = chunks[-1]
    assert isinstance(last, KvCopyChunk)
    pair.dest.copy_begin(begin, pair.dst_engine)
    for chunk in chunks[:-1]:
        assert not pair.dest.copy_chunk(chunk, pair.dst_engine).actions  # type: ignore[arg-type]
    damaged = KvCopyChunk(last.migration_id, last.round, last.request_id, last.instance_id, last.index,
                          bytes([last.data[0] ^ 0xFF]) + last.data[1:])
    answer = pair.dest.copy_chunk(damaged, pair.dst_engine)
    [failed] = answer.messages
    assert isinstance(failed, ResumeFailed) and failed.copy_failed and "checksum" in failed.message
    assert answer.sends[0].address == "node-a" and not pair.dest.parked

    # The source recomputes in the next round (one more round allowed for it) from the whole log.
    out = pair.source.resume_failed(failed, pair.src_engine)
    [resume] = out.messages
    assert isinstance(resume, ResumeRequest)
    assert (resume.round, resume.prompt_ids, resume.generated_ids) == (1, seq.prompt_ids, seq.generated_ids)
    assert [e.kind for e in out.events] == ["migrate"] and "KV copy failed" in out.events[0].text
    assert out.timers == [ArmTimer(ROUND_TIMEOUT_S, MigrationTimeout("m1", "r1", 1))]
    [done] = _only(pair.to_dest(out)).messages
    assert isinstance(done, ResumeDone) and done.round == 1


def test_a_round_without_an_answer_aborts_and_the_request_goes_on(loaded: tuple[Any, Any]) -> None:
    pair = Pair(loaded)
    seq = pair.start(steps=2)
    out = pair.source.migrate_out(_order("r1"), pair.src_engine)
    [timer] = out.timers
    out = pair.source.timed_out(timer.timeout, pair.src_engine)
    assert out.messages == [MigrationEnded("m1", "src-i", "aborted", f"round 0 got no answer in {ROUND_TIMEOUT_S:.0f}s")]
    assert [e.kind for e in out.events] == ["migrate"] and out.actions[-1] == Publish()
    assert pair.src_engine.get("r1") is seq and not pair.source.busy()
    # The late answer finds the round settled.
    late = ResumeDone("m1", 0, "r1", "src-i", len(seq.tokens), 0.1)
    assert not pair.source.round_done(late, pair.src_engine).actions


def test_a_request_not_started_moves_without_rounds(loaded: tuple[Any, Any]) -> None:
    pair = Pair(loaded)
    waiting = _request(pair.src_engine, "queued")
    pair.src_engine.add(waiting)  # queued, not stepped: no cache
    out = pair.source.migrate_out(_order("queued"), pair.src_engine)
    assert out.messages == [Migrated("m1", "queued", "src-i", "node-b", "dst-i", 0, 0, 0, 0.0),
                            MigrationEnded("m1", "src-i", "done", "nothing left to migrate")]
    assert pair.src_engine.get("queued") is None and not out.timers


def test_the_routers_start_continues_a_parked_cache(loaded: tuple[Any, Any]) -> None:
    reference = _reference(_engine(loaded))
    pair = Pair(loaded)
    seq = pair.start(steps=4)
    out = pair.source.migrate_out(_order("r1"), pair.src_engine)
    _only(pair.to_dest(out))
    # The hand-over was lost; the router's StartInference carries the whole log, two tokens past the parked one.
    _decode(pair.src_engine, 2)
    start = StartInference("r1", "dst-i", PROMPT, False, list(seq.prompt_ids), list(seq.generated_ids), MAX_TOKENS,
                           TEMPERATURE, TOP_P, SEED, [], seq.text)
    caught_up = pair.dest.continue_parked(start, pair.dst_engine)
    assert caught_up is not None and caught_up.generated_ids == reference[:6] and not pair.dest.parked
    assert _finish_here(pair.dst_engine, caught_up) == reference
    # Nothing parked any more: the router's start would rebuild from the log.
    assert pair.dest.continue_parked(start, pair.dst_engine) is None


def test_a_parked_cache_nobody_continues_expires(loaded: tuple[Any, Any]) -> None:
    now = [0.0]
    pair = Pair(loaded)
    pair.dest = MigrationDestination(name="dest", clock=lambda: now[0])
    pair.start(steps=2)
    _only(pair.to_dest(pair.source.migrate_out(_order("r1"), pair.src_engine)))
    used_before = pair.dst_engine.kv_usage()[0]
    now[0] += PARKED_TTL_S / 2
    pair.dest.expire(pair.dst_engine)
    assert "r1" in pair.dest.parked
    now[0] += PARKED_TTL_S
    pair.dest.expire(pair.dst_engine)
    assert not pair.dest.parked and pair.dst_engine.kv_usage()[0] < used_before


def test_the_sides_know_nothing_of_the_instance_actor() -> None:
    """The sides return what to do instead of calling back into their host: no import of any actor, not even
    one for type checking (that was the circle instance <-> migration)."""
    import sllm_actors.migration

    package = Path(sllm_actors.migration.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith("sllm_actors.actors")], f"{path.name} imports an actor"
