"""Prefix caching in the engine: KV blocks keyed by their tokens and prefix, shared between requests, kept until
evicted. A shared prefix is computed once, and a request served from the cache makes exactly the tokens it makes
with caching off, also under preemption, eviction and a KV-copy migration; salts keep tenants apart. CPU, fp32,
tiny random-weight model."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.gpu.engine import Engine
from sllm_actors.gpu.runner import kv_bytes_per_token
from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import SamplingParams

BLOCK = 16
PREFIX = 5 * BLOCK
"""A system prompt of five full blocks."""


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> tuple[Any, Any]:
    from sllm_actors.models import load_for_inference

    return load_for_inference(tiny_model, "cpu")


def _engine(loaded: tuple[Any, Any], *, caching: bool = True, blocks: int = 256, **kwargs: Any) -> Engine:
    model, tokenizer = loaded
    per_block = kv_bytes_per_token(model.config, next(model.parameters()).dtype) * BLOCK
    return Engine(model, tokenizer, kv_cache_bytes=blocks * per_block, block_size=BLOCK, prefix_caching=caching,
                  **kwargs)


def _tokens(n: int, seed: int, tokenizer: Any) -> list[int]:
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    return [t for t in (rng.randrange(5, len(tokenizer)) for _ in range(2 * n)) if t != eos][:n]


SYSTEM_SEED = 1


def _seq(loaded: tuple[Any, Any], name: str, suffix_seed: int, *, temperature: float = 0.0, max_tokens: int = 24,
         salt: str = "", prefix_seed: int = SYSTEM_SEED) -> Sequence:
    tokenizer = loaded[1]
    prompt = _tokens(PREFIX, prefix_seed, tokenizer) + _tokens(7, 100 + suffix_seed, tokenizer)
    return Sequence(name, prompt, [], SamplingParams(max_tokens, temperature, 0.9, 11 + suffix_seed),
                    cache_salt=salt)


def _fresh(seq: Sequence) -> Sequence:
    return Sequence(seq.request_id, list(seq.prompt_ids), [], seq.sampling, cache_salt=seq.cache_salt)


def _alone(loaded: tuple[Any, Any], seq: Sequence) -> list[int]:
    """The request's tokens run alone, caching off: what every cached run must reproduce."""
    engine = _engine(loaded, caching=False)
    return _serve(engine, [_fresh(seq)])[0]


def _serve(engine: Engine, seqs: list[Sequence]) -> list[list[int]]:
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step_batch()
    return [s.generated_ids for s in seqs]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_shared_prefix_is_computed_once_and_changes_no_token(loaded: tuple[Any, Any], temperature: float) -> None:
    engine = _engine(loaded)
    first, second = (_seq(loaded, f"r{i}", i, temperature=temperature) for i in range(2))
    assert _serve(engine, [first]) == [_alone(loaded, first)]
    assert engine.prefix_cache_usage() == (0, first.n_tokens - len(first.generated_ids))
    hits_before, queries_before = engine.prefix_cache_usage()
    expected = _alone(loaded, second)
    assert _serve(engine, [second]) == [expected]
    hits, queries = engine.prefix_cache_usage()
    # The second request computed only its 7-token suffix: its five prefix blocks came from the cache.
    assert hits - hits_before == PREFIX
    assert queries - queries_before - (hits - hits_before) == 7
    assert engine.kv_usage()[0] == 0, "every block let go once the requests finished"
    assert engine.blocks.cached_blocks > 0, "their full blocks stay cached"


def test_requests_decoding_on_shared_blocks_under_preemption_lose_no_token(loaded: tuple[Any, Any]) -> None:
    # A pool too small for all of them at once: the newest are preempted while they share the prefix's blocks
    # with the others, and recomputed later (from the cache where it still holds their blocks).
    seqs = [_seq(loaded, f"r{i}", i, temperature=0.8 if i % 2 else 0.0, max_tokens=40) for i in range(6)]
    expected = [_alone(loaded, s) for s in seqs]
    engine = _engine(loaded, blocks=16)
    warm = _seq(loaded, "warm", 99, max_tokens=1)
    _serve(engine, [warm])  # the prefix is cached before the batch arrives, so all of them share it
    assert _serve(engine, seqs) == expected
    assert engine.preemptions > 0
    hits, _ = engine.prefix_cache_usage()
    assert hits >= PREFIX * len(seqs)
    assert engine.kv_usage()[0] == 0


def test_a_full_pool_evicts_the_least_recently_used_prefix(loaded: tuple[Any, Any]) -> None:
    engine = _engine(loaded, blocks=16)
    old = _seq(loaded, "old", 1, prefix_seed=2, max_tokens=4)
    new = _seq(loaded, "new", 2, prefix_seed=3, max_tokens=4)
    _serve(engine, [old])
    _serve(engine, [new])
    cached = engine.blocks.cached_blocks
    assert cached >= 10  # both prefixes' blocks, none held
    # A request with a prefix of its own needs more blocks than are unkeyed: the oldest cached ones go first.
    other = _seq(loaded, "other", 3, prefix_seed=4, max_tokens=4)
    expected_other = _alone(loaded, other)
    assert _serve(engine, [other]) == [expected_other]
    again_new, again_old = _seq(loaded, "new2", 5, prefix_seed=3, max_tokens=4), \
        _seq(loaded, "old2", 6, prefix_seed=2, max_tokens=4)
    expected = [_alone(loaded, again_new), _alone(loaded, again_old)]
    hits0, _ = engine.prefix_cache_usage()
    assert _serve(engine, [again_new]) == expected[:1]
    hits1, _ = engine.prefix_cache_usage()
    assert hits1 - hits0 == PREFIX, "the recently used prefix survived"
    assert _serve(engine, [again_old]) == expected[1:]
    hits2, _ = engine.prefix_cache_usage()
    assert hits2 - hits1 < PREFIX, "the least recently used prefix was evicted (in part)"


def test_salts_keep_tenants_apart(loaded: tuple[Any, Any]) -> None:
    engine = _engine(loaded)
    _serve(engine, [_seq(loaded, "a1", 1, salt="tenant-a")])
    hits0, _ = engine.prefix_cache_usage()
    other_tenant = _seq(loaded, "b1", 2, salt="tenant-b")
    assert _serve(engine, [other_tenant]) == [_alone(loaded, other_tenant)]
    hits1, _ = engine.prefix_cache_usage()
    assert hits1 == hits0, "another tenant's prefix is not shared"
    _serve(engine, [_seq(loaded, "a2", 3, salt="tenant-a")])
    hits2, _ = engine.prefix_cache_usage()
    assert hits2 - hits1 == PREFIX, "the same tenant's is"
    _serve(engine, [_seq(loaded, "u", 4)])
    assert engine.prefix_cache_usage()[0] == hits2, "nor is a salted prefix shared with unsalted requests"


def test_kv_copy_export_of_a_request_whose_blocks_are_shared(loaded: tuple[Any, Any]) -> None:
    source = _engine(loaded)
    holder, moving = _seq(loaded, "holder", 1, max_tokens=30), _seq(loaded, "moving", 2, temperature=0.8,
                                                                    max_tokens=30)
    expected_holder, expected_moving = _alone(loaded, holder), _alone(loaded, moving)
    _serve(source, [_seq(loaded, "warm", 9, max_tokens=1)])
    source.add(holder)
    source.add(moving)
    for _ in range(6):
        source.step_batch()
    assert set(moving.block_table[:5]) == set(holder.block_table[:5]), "the two share the prefix's blocks"
    n_cached, layers = source.export_cache(moving)
    assert n_cached == moving.n_tokens - 1  # the whole cache, shared blocks included
    destination = _engine(loaded)
    copied = Sequence("moving", list(moving.prompt_ids), list(moving.generated_ids), moving.sampling,
                      text=moving.text)
    destination.import_cache(copied, n_cached, [(k.clone(), v.clone()) for k, v in layers])
    source.remove("moving")  # migrated away: its own blocks go, the shared ones stay with the holder
    while not copied.finish_reason:
        destination.step(copied)
    assert copied.generated_ids == expected_moving
    while source.has_work():
        source.step_batch()
    assert holder.generated_ids == expected_holder
    assert source.kv_usage()[0] == 0


def test_deterministic_mode_keeps_prefix_caching_off(loaded: tuple[Any, Any]) -> None:
    engine = _engine(loaded, deterministic=True)
    assert not engine.prefix_caching
    _serve(engine, [_seq(loaded, "a", 1, max_tokens=2)])
    _serve(engine, [_seq(loaded, "b", 2, max_tokens=2)])
    assert engine.prefix_cache_usage() == (0, 0)


def test_the_hit_ratio_reaches_metrics() -> None:
    from prometheus_client import generate_latest

    from sllm_actors.http.metrics import Metrics

    instance = {"model": "tiny", "state": "running", "instance_id": "i1", "kv_blocks_used": 3, "kv_blocks_total": 9,
                "prefix_hit_tokens": 80, "prefix_query_tokens": 160}
    text = generate_latest(Metrics(lambda: {"instances": [instance]}).registry).decode()
    assert 'sllm_prefix_cache_hit_ratio{instance="i1",model="tiny"} 0.5' in text
    assert 'sllm_prefix_cache_hit_tokens_total{instance="i1",model="tiny"} 80.0' in text
    assert 'sllm_prefix_cache_query_tokens_total{instance="i1",model="tiny"} 160.0' in text


def test_a_shared_prompt_prefix_through_the_cluster_shows_in_status(cluster: Any) -> None:
    # The instance's hit counts travel with its KV blocks: node status -> scheduler -> `sllm status`. The same long
    # system prompt twice (then under another tenant's salt, which shares nothing).
    from sllm_actors.client import Completion

    system = "You are a helpful assistant who answers briefly. " * 6

    def run(question: str, salt: str = "") -> Completion:
        with cluster.client() as client:
            events = list(client.generate("tiny", system + question, max_tokens=4, cache_salt=salt))
        done = events[-1]
        assert isinstance(done, Completion)
        return done

    def counts() -> tuple[int, int]:
        with cluster.client() as client:
            instances = client.status()["instances"]
        return (sum(int(i.get("prefix_hit_tokens", 0)) for i in instances),
                sum(int(i.get("prefix_query_tokens", 0)) for i in instances))

    def wait_for(check: Any) -> tuple[int, int]:
        deadline, tick = 30.0, threading.Event()
        for _ in range(int(deadline / 0.1)):
            seen = counts()
            if check(seen):
                return seen
            tick.wait(0.1)
        raise AssertionError(f"the status never showed it: {counts()}")

    run("What is the capital of France?")
    _, queried = wait_for(lambda c: c[1] > 0)
    run("And of Spain?")
    hits, queried = wait_for(lambda c: c[1] > queried and c[0] > 0)
    assert hits >= BLOCK
    run("And of Italy?", salt="another tenant")
    assert wait_for(lambda c: c[1] > queried)[0] == hits
