"""The bench's own arithmetic and meters: where a fill's tenths start and end, wakeups over
threads, the RSS peak."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from bench.growing import DepthTrace, _span
from bench.meters import switches_between, voluntary_switches
from bench.procs import RssSampler, read_rss


def trace(samples: list[tuple[float, int, float]]) -> DepthTrace:
    t = DepthTrace(pid=0, port=0)
    t.samples = samples
    return t


def test_at_depth_interpolates_time_and_cpu_between_samples() -> None:
    t = trace([(0.0, 0, 0.0), (1.0, 1000, 0.5), (2.0, 3000, 1.5)])
    assert t.at_depth(500) == (0.5, 0.25)
    assert t.at_depth(2000) == (1.5, 1.0)
    assert t.at_depth(3000) == (2.0, 1.5)
    assert t.at_depth(3001) is None


def test_span_gives_rate_and_cpu_per_million_between_two_depths() -> None:
    t = trace([(0.0, 0, 0.0), (1.0, 1000, 0.5), (2.0, 3000, 1.5)])
    span = _span(t, 1000, 3000)
    assert span["events_per_s"] == 2000
    assert span["cpu_s_per_m"] == 500   # 1 CPU s for 2,000 events
    assert _span(t, 0, 5000)["events_per_s"] is None


def test_switches_count_threads_born_in_the_window_from_zero() -> None:
    assert switches_between({1: 10, 2: 5}, {1: 12, 2: 5, 3: 4}) == 6


def test_voluntary_switches_reads_every_thread_of_the_process() -> None:
    started, release = threading.Event(), threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        started.set()
        release.wait(10)   # blocks: a voluntary switch of this thread

    th = threading.Thread(target=worker)
    th.start()
    try:
        assert started.wait(10)
        seen = voluntary_switches(os.getpid())
        assert threading.get_native_id() in seen and tid[0] in seen
    finally:
        release.set()
        th.join(10)


def test_rss_sampler_sees_a_peak_that_came_and_went_between_its_samples() -> None:
    # A peak held only while a call holds the GIL (a set's table rebuilt, say) can fall
    # between any two samples; the sampler must still report it.
    code = ("import sys; sys.stdin.readline(); b = b'x' * (64 << 20); del b; "
            "print('done', flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        with RssSampler(child.pid, interval=3600) as rss:   # no sample of its own meanwhile
            _, before = read_rss(child.pid)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "done\n"
            _, after = read_rss(child.pid)
            _, peak_anon = rss.take()
        assert after - before < 16 << 20          # it came and went
        assert peak_anon - before >= 60 << 20
    finally:
        child.kill()
        child.wait(10)
