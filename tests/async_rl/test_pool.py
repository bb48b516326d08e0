"""TrajectoryPool / GroupedTrajectoryPool: order, bounded staleness (drops counted), blocking, closing, groups."""

import threading

import pytest

from llm_trainer.async_rl import GroupedTrajectoryPool, PoolClosed, Trajectory, TrajectoryPool


def traj(version: int = 0, group: int = 0, tag: int = 0) -> Trajectory:
    return Trajectory(prompt_ids=[1], completion_ids=[tag], model_version=version, group_id=group)


def run_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_fifo_exact_n():
    pool = TrajectoryPool()
    pool.put([traj(tag=i) for i in range(5)])
    assert len(pool) == 5
    assert [t.completion_ids[0] for t in pool.get_batch(3, current_version=0)] == [0, 1, 2]
    assert [t.completion_ids[0] for t in pool.get_batch(2, current_version=0)] == [3, 4]
    assert len(pool) == 0


def test_stale_samples_dropped_and_counted():
    pool = TrajectoryPool(max_staleness=1)
    pool.put([traj(version=0, tag=0), traj(version=1, tag=1), traj(version=2, tag=2), traj(version=0, tag=3)])
    batch = pool.get_batch(2, current_version=2)
    assert [t.completion_ids[0] for t in batch] == [1, 2]
    assert all(2 - t.model_version <= 1 for t in batch)
    stats = pool.stats()
    assert stats["pool/dropped_stale"] == 2
    assert stats["pool/staleness_max"] == 1 and stats["pool/staleness_mean"] == 0.5
    assert stats["pool/size"] == 0


def test_zero_staleness_keeps_only_current_version():
    pool = TrajectoryPool(max_staleness=0)
    pool.put([traj(version=0), traj(version=1)])
    with pytest.raises(TimeoutError):
        pool.get_batch(2, current_version=1, timeout=0.05)
    assert pool.dropped_stale == 1


def test_get_batch_waits_for_producer():
    pool = TrajectoryPool()
    producer = run_thread(lambda: [pool.put([traj(tag=i)]) for i in range(4)])
    batch = pool.get_batch(4, current_version=0, timeout=30)
    producer.join()
    assert [t.completion_ids[0] for t in batch] == [0, 1, 2, 3]


def test_timeout_message_names_what_is_buffered():
    pool = TrajectoryPool()
    pool.put([traj()])
    with pytest.raises(TimeoutError, match=r"batch of 3 .*0\.05 s.* 1 ready"):
        pool.get_batch(3, current_version=0, timeout=0.05)


def test_health_check_aborts_the_wait():
    pool = TrajectoryPool()
    calls = []

    def health_check():
        calls.append(1)
        raise RuntimeError("server at http://x died")

    with pytest.raises(RuntimeError, match="http://x"):
        pool.get_batch(1, current_version=0, timeout=30, health_check=health_check)
    assert calls == [1]


def test_close_wakes_getters_and_putters():
    pool = TrajectoryPool(maxsize=1)
    pool.put([traj()])
    errors = []

    def put():
        try:
            pool.put([traj()])
        except PoolClosed as err:
            errors.append(err)

    putter = run_thread(put)
    pool.close()
    putter.join(10)
    assert not putter.is_alive() and len(errors) == 1
    with pytest.raises(PoolClosed):
        pool.get_batch(1, current_version=0)
    with pytest.raises(PoolClosed):
        pool.put([traj()])


def test_close_wakes_a_waiting_getter():
    pool = TrajectoryPool()
    errors = []

    def get():
        try:
            pool.get_batch(1, current_version=0)
        except PoolClosed as err:
            errors.append(err)

    getter = run_thread(get)
    pool.close()
    getter.join(10)
    assert not getter.is_alive() and len(errors) == 1


def test_put_blocks_while_full():
    pool = TrajectoryPool(maxsize=2)
    pool.put([traj(tag=0), traj(tag=1)])
    with pytest.raises(TimeoutError, match="maxsize=2"):
        pool.put([traj(tag=2)], timeout=0.05)
    done = threading.Event()
    putter = run_thread(lambda: (pool.put([traj(tag=2)]), done.set()))
    assert [t.completion_ids[0] for t in pool.get_batch(1, current_version=0)] == [0]
    putter.join(10)
    assert done.is_set()
    assert [t.completion_ids[0] for t in pool.get_batch(2, current_version=0)] == [1, 2]


def test_concurrent_producers_deliver_each_sample_once():
    pool = TrajectoryPool(maxsize=12)
    producers = [run_thread(lambda p=p: [pool.put([traj(tag=p * 100 + i)]) for i in range(50)]) for p in range(4)]
    seen = []
    for _ in range(20):
        seen += [t.completion_ids[0] for t in pool.get_batch(10, current_version=0, timeout=30)]
    for producer in producers:
        producer.join(10)
    assert sorted(seen) == sorted(p * 100 + i for p in range(4) for i in range(50))


def test_grouped_releases_whole_groups_only():
    pool = GroupedTrajectoryPool(group_size=2)
    pool.put([traj(group=7, tag=0), traj(group=8, tag=1)])
    assert len(pool) == 0 and pool.partial_groups == 2
    with pytest.raises(TimeoutError):
        pool.get_batch(2, current_version=0, timeout=0.05)
    pool.put([traj(group=8, tag=2)])
    batch = pool.get_batch(2, current_version=0)
    assert [(t.group_id, t.completion_ids[0]) for t in batch] == [(8, 1), (8, 2)]
    assert pool.partial_groups == 1


def test_grouped_needs_whole_groups():
    pool = GroupedTrajectoryPool(group_size=4)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        pool.get_batch(6, current_version=0)


def test_grouped_drops_stale_group_whole_by_oldest_member():
    pool = GroupedTrajectoryPool(group_size=2, max_staleness=1)
    pool.put([traj(version=0, group=1), traj(version=2, group=1), traj(version=2, group=2), traj(version=1, group=2)])
    batch = pool.get_batch(2, current_version=2)
    assert {t.group_id for t in batch} == {2}
    assert pool.stats()["pool/dropped_stale"] == 2
    assert pool.stats()["pool/staleness_max"] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"maxsize": 0}, "maxsize"), ({"max_staleness": -1}, "max_staleness"), ({"max_staleness": 1.5}, "max_staleness")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrajectoryPool(**kwargs)
    with pytest.raises(ValueError, match="maxsize=2"):
        TrajectoryPool(maxsize=2).get_batch(3, current_version=0)
    with pytest.raises(ValueError, match="group_size"):
        GroupedTrajectoryPool(group_size=0)
    with pytest.raises(TypeError, match="Trajectory"):
        TrajectoryPool().put([{"prompt_ids": [1]}])
