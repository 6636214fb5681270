"""The engine thread owns the scheduler: add_request, abort and stats from many threads
at once against a running engine keep every invariant, and only the engine thread ever
touches the scheduler's lists."""

from __future__ import annotations

import random
import threading

from meshserve.engine.engine import EngineOverloadedError
from meshserve.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.engine_fixtures import SMALL, assert_idle, make_engine

WORKERS = 4
REQUESTS_PER_WORKER = 40


def _watched(seen: set[str]) -> type:
    """A list type that records the names of the threads that read or change it."""
    def wrap(name: str):
        base = getattr(list, name)

        def method(self, *args, **kwargs):
            seen.add(threading.current_thread().name)
            return base(self, *args, **kwargs)
        return method

    names = ("__iter__", "__len__", "__getitem__", "__contains__", "append", "remove",
             "sort", "pop", "insert", "index")
    return type("Watched", (list,), {name: wrap(name) for name in names})


def _check(stats, limit_running: int) -> None:
    assert 0 <= stats.free_pages <= stats.total_pages
    assert 0 <= stats.running <= limit_running and stats.waiting >= 0
    assert stats.running_tokens >= stats.running and stats.waiting_tokens >= stats.waiting
    if stats.running == 0:  # one snapshot: pages are held by running sequences only
        assert stats.free_pages == stats.total_pages


def test_add_abort_and_stats_from_many_threads(checkpoint_dir):
    engine = make_engine(checkpoint_dir("llama"), "", SMALL)
    touched: set[str] = set()  # threads that used the scheduler's lists
    watched = _watched(touched)
    sched = engine.scheduler
    sched.waiting = watched(sched.waiting)
    sched.running = watched(watched(r) for r in sched.running)
    engine.start()
    limit_running = SMALL.max_seqs * engine.data_shards
    errors: list[BaseException] = []
    accepted: list[int] = []  # per worker: requests the engine took
    ended: list[int] = []  # per worker: streams that ended with a final chunk
    stop_stats = threading.Event()

    def worker(w: int) -> None:
        rng = random.Random(w)
        handles, aborted = [], set()
        try:
            for i in range(REQUESTS_PER_WORKER):
                prompt = [rng.randrange(3, 250) for _ in range(rng.randint(1, 40))]
                params = SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True,
                                        temperature=rng.choice([0.0, 0.8]), seed=i)
                try:
                    h = engine.add_request(prompt, params, request_id=f"w{w}-{i}")
                except EngineOverloadedError:
                    continue
                handles.append((h, params.max_tokens))
                if rng.random() < 0.3:
                    aborted.add(h.request_id)
                    h.cancel()
                if rng.random() < 0.2:  # any id of ours: live, finished or not yet used
                    other = f"w{w}-{rng.randrange(REQUESTS_PER_WORKER)}"
                    if engine.abort(other):
                        aborted.add(other)
                _check(engine.stats(), limit_running)
            long = SamplingParams(max_tokens=100, ignore_eos=True)
            dup = engine.add_request([5], long, request_id=f"dup-{w}")
            try:  # a live id is refused, whatever the other threads do
                engine.add_request([5], long, request_id=f"dup-{w}")
                raise AssertionError("a duplicate request id was accepted")
            except InvalidRequestError:
                pass
            dup.cancel()
            done = 0
            for h, max_tokens in handles:
                chunks = list(h)
                final = chunks[-1]
                assert final.finished and sum(c.finished for c in chunks) == 1
                n = sum(len(c.token_ids) for c in chunks)
                assert n <= max_tokens and final.usage.completion_tokens == n
                if h.request_id not in aborted:
                    assert final.finish_reason == "length" and n == max_tokens
                done += 1
            accepted.append(len(handles))
            ended.append(done)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def stats_reader() -> None:
        last = 0
        try:
            while not stop_stats.is_set():
                st = engine.stats()
                _check(st, limit_running)
                assert st.finished >= last
                last = st.finished
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    readers = [threading.Thread(target=stats_reader) for _ in range(2)]
    try:
        for t in threads + readers:
            t.start()
        for t in threads:
            t.join(timeout=300)
        stop_stats.set()
        for t in readers:
            t.join(timeout=30)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads + readers)
        assert ended == accepted and sum(accepted) > WORKERS * REQUESTS_PER_WORKER // 2
        # The duplicates' originals (one per worker, cancelled) are never read.
        for _ in range(200):
            st = engine.stats()
            if st.finished == sum(accepted) + WORKERS:
                break
            threading.Event().wait(0.05)
        assert st.finished == sum(accepted) + WORKERS
        assert touched == {"meshserve-engine"}  # the owner only, whatever the others did
    finally:
        engine.shutdown()
    assert_idle(engine)
