"""The dynamic batcher on plain numpy replicas: ordering under concurrency, counting, back-pressure, timeouts, drain."""

import asyncio
import threading

import numpy as np
import pytest

from lepton_jax.serve.batcher import (
    DrainingError,
    DynamicBatcher,
    QueueFullError,
    Replica,
    bucket_sizes,
    fair_shares,
)


class Recorder:
    """A replica function that doubles its rows, records every batch, and can be held closed."""

    def __init__(self):
        self.batches, self.gate, self.lock = [], threading.Event(), threading.Lock()
        self.gate.set()

    def __call__(self, rows):
        assert self.gate.wait(timeout=30)
        with self.lock:
            self.batches.append(rows.copy())
        return rows * 2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def _one_batch_running(fn: Recorder) -> tuple[DynamicBatcher, asyncio.Future]:
    """A batcher (batches of 4, no delay) whose replica is held running a first full batch of ones."""
    batcher = DynamicBatcher([Replica("a", fn)], max_batch_size=4, max_delay_s=0.0, max_queue_rows=1000)
    batcher.start()
    fn.gate.clear()
    first = asyncio.ensure_future(batcher.infer(np.full((4, 1), 1, np.float32), timeout_s=30))
    while not batcher.replicas[0].inflight_rows:
        await asyncio.sleep(0.001)
    return batcher, first


def test_bucket_sizes():
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(1) == [1]


def test_32_concurrent_clients_get_their_own_rows_in_order():
    fns = [Recorder(), Recorder()]

    async def main():
        batcher = DynamicBatcher([Replica("a", fns[0]), Replica("b", fns[1])], max_batch_size=16,
                                 max_delay_s=0.002, max_queue_rows=10_000)
        batcher.start()

        async def client(c):
            outs = []
            for r in range(10):
                n = 1 + (c + r) % 5
                rows = np.arange(n, dtype=np.float32)[:, None] + 1 + 1000 * c + 100 * r  # unique, never 0
                outs.append((rows, await batcher.infer(rows, timeout_s=30)))
            return outs

        results = await asyncio.gather(*(client(c) for c in range(32)))
        await batcher.drain(timeout_s=10)
        return batcher, results

    batcher, results = run(main())
    sent = 0
    for outs in results:
        for rows, got in outs:
            np.testing.assert_array_equal(got, rows * 2)
            sent += rows.shape[0]
    executed = np.concatenate([b for f in fns for b in f.batches])[:, 0]
    expected = np.concatenate([rows[:, 0] for outs in results for rows, _ in outs])
    # every row ran exactly once (none lost, none duplicated); zeros are padding up to the bucket size
    np.testing.assert_array_equal(np.sort(executed[executed != 0]), np.sort(expected))
    assert sum(r.rows for r in batcher.replicas) == sent == expected.size
    assert all(b.shape[0] in batcher.buckets for f in fns for b in f.batches)
    assert max(b.shape[0] for f in fns for b in f.batches) > 1  # requests were merged
    assert all(r.batches > 0 for r in batcher.replicas)  # both replicas took load


def test_queue_overflow_is_refused_at_once_and_the_queue_recovers():
    fn = Recorder()

    async def main():
        batcher = DynamicBatcher([Replica("a", fn)], max_batch_size=4, max_delay_s=0.0, max_queue_rows=8)
        batcher.start()
        fn.gate.clear()  # the replica is stuck: the first batch runs, the rest wait in the queue
        first = asyncio.ensure_future(batcher.infer(np.ones((4, 1), np.float32), timeout_s=30))
        while not batcher.replicas[0].inflight_rows:  # until the first batch has gone to the replica
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher.infer(np.full((2, 1), i, np.float32), timeout_s=30))
                  for i in range(4)]
        await asyncio.sleep(0.01)
        assert batcher.queued_rows == 8
        with pytest.raises(QueueFullError, match="at most 8 rows"):
            await batcher.infer(np.ones((1, 1), np.float32), timeout_s=30)
        fn.gate.set()
        outs = await asyncio.gather(first, *queued)
        await batcher.drain()
        return outs

    outs = run(main())
    assert [o[0, 0] for o in outs] == [2, 0, 2, 4, 6]


def test_timeout_drops_a_queued_request_and_drain_finishes_running_ones():
    fn = Recorder()

    async def main():
        batcher = DynamicBatcher([Replica("a", fn)], max_batch_size=2, max_delay_s=0.0, max_queue_rows=100)
        batcher.start()
        fn.gate.clear()
        running = asyncio.ensure_future(batcher.infer(np.ones((2, 1), np.float32), timeout_s=30))
        while not batcher.replicas[0].inflight_rows:
            await asyncio.sleep(0.001)
        with pytest.raises(TimeoutError):
            await batcher.infer(np.full((2, 1), 5, np.float32), timeout_s=0.05)
        assert batcher.queued_rows == 0
        drain = asyncio.ensure_future(batcher.drain(timeout_s=30))
        await asyncio.sleep(0.01)
        with pytest.raises(DrainingError):
            await batcher.infer(np.ones((1, 1), np.float32))
        fn.gate.set()
        await drain
        return await running

    out = run(main())
    np.testing.assert_array_equal(out, np.full((2, 1), 2))
    assert all(5 not in b for b in fn.batches)  # the timed-out request never ran


def test_fair_shares_give_small_requests_all_their_rows_and_split_the_rest_equally():
    assert fair_shares([1, 990, 990], 32) == [1, 16, 15]  # the 1-row request whole; the odd row to the older one
    assert fair_shares([100, 100, 100], 32) == [11, 11, 10]
    assert fair_shares([3, 20, 5], 16) == [3, 8, 5]
    assert fair_shares([1] * 40, 32) == [1] * 32 + [0] * 8  # more requests than rows: the oldest first
    assert fair_shares([50], 32) == [32]


def test_a_large_request_does_not_hold_up_a_small_one_behind_it():
    """Batches share their rows fairly over the queued requests: a 1-row request that arrives behind 160 queued
    rows runs in the next batch (beside 3 of them), not after them."""
    fn = Recorder()

    async def main():
        batcher, first = await _one_batch_running(fn)
        large = asyncio.ensure_future(batcher.infer(np.full((160, 1), 2, np.float32), timeout_s=30))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(batcher.infer(np.full((1, 1), 3, np.float32), timeout_s=30))
        await asyncio.sleep(0.01)
        fn.gate.set()
        outs = await asyncio.gather(first, large, small)
        await batcher.drain()
        return outs

    first, large, small = run(main())
    np.testing.assert_array_equal(large, np.full((160, 1), 4))
    assert small[0, 0] == 6
    assert sorted(fn.batches[1][:, 0].tolist()) == [2, 2, 2, 3]  # right after the running batch
    assert len(fn.batches) == 1 + 41  # every batch full but the last: 161 rows in batches of 4


def test_with_more_queued_requests_than_batch_rows_the_oldest_share_each_batch_and_the_rest_wait_in_order():
    """Six queued requests (a 6-row one first) for batches of 4: the oldest four share a batch (the large one gets
    the odd row), the others come next, ahead of the large request's remaining rows; every answer is its own."""
    fn = Recorder()

    async def main():
        batcher, first = await _one_batch_running(fn)
        large = asyncio.ensure_future(batcher.infer(np.arange(10, 16, dtype=np.float32)[:, None], timeout_s=30))
        await asyncio.sleep(0.005)
        small = []
        for value in range(2, 7):
            small.append(asyncio.ensure_future(batcher.infer(np.full((1, 1), value, np.float32), timeout_s=30)))
            await asyncio.sleep(0.005)
        fn.gate.set()
        outs = await asyncio.gather(first, large, *small)
        await batcher.drain()
        return outs

    _, large, *small = run(main())
    np.testing.assert_array_equal(large[:, 0], np.arange(10, 16) * 2)
    assert [s[0, 0] for s in small] == [4, 6, 8, 10, 12]
    assert [sorted(v for v in b[:, 0].tolist() if v) for b in fn.batches[1:]] == [[2, 3, 4, 10], [5, 6, 11, 12],
                                                                                [13, 14, 15]]  # 0: padding


def test_requests_into_a_part_full_queue_wait_for_the_deadline_and_a_full_batch_goes_at_once():
    """Arrivals only wake the scheduler when the queue was empty or a batch is full: three staggered 1-row
    requests still make one batch at the deadline, and a full batch does not wait for a long deadline."""
    recorder = Recorder()

    async def main():
        batcher = DynamicBatcher([Replica("r0", recorder)], max_batch_size=4, max_delay_s=0.3)
        batcher.start()
        staggered = []
        for i in range(3):
            staggered.append(asyncio.ensure_future(batcher.infer(np.full((1, 1), i, np.float32), timeout_s=30)))
            await asyncio.sleep(0.01)
        outs = await asyncio.gather(*staggered)
        assert [o.tolist() for o in outs] == [[[0.0]], [[2.0]], [[4.0]]]
        assert len(recorder.batches) == 1  # one batch: the 3 rows, padded to the bucket of 4
        assert recorder.batches[0][:3].ravel().tolist() == [0.0, 1.0, 2.0]

        slow = DynamicBatcher([Replica("r1", recorder)], max_batch_size=4, max_delay_s=30.0)
        slow.start()
        start = asyncio.get_running_loop().time()
        full = await asyncio.gather(*(slow.infer(np.full((1, 1), i, np.float32), timeout_s=60) for i in range(4)))
        assert asyncio.get_running_loop().time() - start < 10  # not the 30 s deadline
        assert [o.tolist() for o in full] == [[[0.0]], [[2.0]], [[4.0]], [[6.0]]]
        await batcher.drain(timeout_s=10)
        await slow.drain(timeout_s=10)

    run(main())


async def _holding_one_batch(recorder: Recorder) -> tuple[DynamicBatcher, asyncio.Future]:
    """A started batcher (max batch 2) whose replica holds its first batch: a 2-row request, running."""
    batcher = DynamicBatcher([Replica("r0", recorder)], max_batch_size=2, max_delay_s=0.001)
    batcher.start()
    recorder.gate.clear()
    running = asyncio.ensure_future(batcher.infer(np.ones((2, 1), np.float32), timeout_s=30))
    await asyncio.sleep(0.05)
    return batcher, running


def test_a_timed_out_request_of_several_chunks_fails_once_and_leaves_nothing_queued():
    recorder = Recorder()

    async def main():
        batcher, running = await _holding_one_batch(recorder)
        with pytest.raises(TimeoutError, match="no result within 0.05 s"):
            await batcher.infer(np.ones((6, 1), np.float32), timeout_s=0.05)  # three chunks, all still queued
        assert batcher.queued_rows == 0
        recorder.gate.set()
        assert (await running).tolist() == [[2.0], [2.0]]
        await batcher.drain(timeout_s=10)

    run(main())


def test_abandon_fails_running_and_queued_requests_at_once():
    """A force quit: the request whose batch is running (held by the replica) and the one still queued both fail
    with DrainingError now, new ones are refused, and drain then waits for the held batch's thread without blocking
    the event loop."""
    recorder = Recorder()

    async def main():
        batcher, running = await _holding_one_batch(recorder)
        queued = asyncio.ensure_future(batcher.infer(np.ones((3, 1), np.float32), timeout_s=30))  # two chunks
        await asyncio.sleep(0.05)
        assert not running.done() and not queued.done() and batcher.queued_rows == 3
        batcher.abandon("force quit")
        for request in (running, queued):
            with pytest.raises(DrainingError, match="force quit"):
                await asyncio.wait_for(request, timeout=1)
        assert batcher.queued_rows == 0
        with pytest.raises(DrainingError):
            await batcher.infer(np.ones((1, 1), np.float32))
        threading.Timer(1.0, recorder.gate.set).start()  # the held batch ends later
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await batcher.drain(timeout_s=10)
        ticker.cancel()
        assert ticks >= 20, ticks  # the loop ran on while drain waited about 1 s for the replica thread
        assert batcher.replicas[0].inflight_rows == 0

    run(main())
