"""The replica's model lock: arrival order, and a long holder steps aside for waiters."""

import threading
import time

from cogenesis.deployments.fairlock import FairLock


def test_waiters_get_the_lock_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        while lock.waiting() < i + 1:  # queued before the next one starts
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(timeout=5)
    assert order == [0, 1, 2, 3, 4]


def test_a_long_holder_lets_waiting_steps_run_between_its_tokens():
    lock, events = FairLock(), []

    def outline():  # 5 "tokens", yielding between them
        with lock:
            for i in range(5):
                events.append(f"token{i}")
                if i == 1:
                    started.set()
                    while lock.waiting() == 0:
                        time.sleep(0.001)
                lock.yield_()

    def step():
        started.wait(5)
        with lock:
            events.append("step")

    started = threading.Event()
    threads = [threading.Thread(target=outline), threading.Thread(target=step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert events == ["token0", "token1", "step", "token2", "token3", "token4"]
    assert lock.yields == 1  # no waiter, no yield
    assert lock.waiting() == 0
