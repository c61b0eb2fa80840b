"""make bench's arithmetic: percentiles, per-round ratios, own time from py-spy's collapsed stacks, verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ is not an installed package: the checkout's root makes it importable here
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.hotspots import own_time  # noqa: E402
from benchmarks.latency import Latency, contention_targets, percentile  # noqa: E402
from benchmarks.pipelines import CpuSpent, Figures, RssSampler, Sample  # noqa: E402
from benchmarks.run import Report, verdict  # noqa: E402


def test_percentile_picks_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) in (50.0, 51.0)
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)     # nan: nothing seen is not 0 ms


def test_ratios_are_medians_of_each_rounds_own_ratio() -> None:
    report = Report()
    for floor_rate, rate in ((1000, 500), (2000, 800), (4000, 3600)):
        floor = Figures("floor", floor_rate, 1.0)
        report.add("raw", floor, floor)
        report.add("x", Figures("x", rate, 1.0), floor)
    assert report.ratio("raw") == 1.0
    assert report.ratio("x") == 0.5            # rounds: 0.5, 0.4, 0.9
    assert report.rate("x") == 800
    assert report.pair_ratio("x", "raw") == 0.5


def test_costs_are_per_message() -> None:
    report = Report()
    figures = Figures("x", 100, 1.0, commits=150, wal_bytes=10_000, dead_tuples=300)
    report.add("x", figures, figures)
    assert report.per_message("x", "commits") == 1.5
    assert report.per_message("x", "wal_bytes") == 100
    assert report.per_message("x", "dead_tuples") == 3.0


def test_cpu_is_per_message_and_the_rest_is_the_machine_less_the_pipeline() -> None:
    report = Report()
    for client_s, machine_s in ((0.5, 1.5), (0.7, 1.2), (0.6, 1.6)):
        figures = Figures("x", 10_000, 1.0, cpu=CpuSpent(10_000, client_s, machine_s))
        report.add("x", figures, figures)
    report.add("y", Figures("y", 10, 1.0), Figures("y", 10, 1.0))
    cpu = report.cpu_us("x")
    assert cpu is not None and (round(cpu[0], 6), round(cpu[1], 6)) == (60.0, 100.0)   # of 50/70/60, 100/50/100
    assert report.cpu_us("y") is None               # not measured: no figure rather than 0
    assert CpuSpent(100, 2.0, 1.0).rest_us == 0.0   # a machine counter read coarser than the process's


def test_the_consumers_cpu_is_taken_between_10_and_95_percent_of_its_messages() -> None:
    sampler = RssSampler(pid=0, db=None, total=1000)  # type: ignore[arg-type]
    sampler.samples = [Sample(0, 50, 1.0, 10.0),        # start-up: not counted
                       Sample(100, 60, 1.2, 10.5),      # 10%: from here
                       Sample(500, 60, 1.4, 10.9),
                       Sample(950, 60, 1.6, 11.3),      # 95%: to here
                       Sample(1000, 60, 2.5, 12.0)]     # exit: not counted
    cpu = sampler.cpu()
    assert cpu is not None and cpu.messages == 850
    assert round(cpu.client_s, 6) == 0.4 and round(cpu.machine_s, 6) == 0.8
    sampler.samples = sampler.samples[:1] + sampler.samples[-1:]
    assert sampler.cpu() is None                        # no steady part seen


def test_own_time_counts_the_innermost_frame_only() -> None:
    collapsed = ("main (a.py:1);loop (a.py:5);read (b.py:9) 30\n"
                 "main (a.py:1);loop (a.py:5) 10\n"
                 "main (a.py:1);loop (a.py:5);read (b.py:9) 5\n"
                 "garbage\n")
    own, total = own_time(collapsed)
    assert total == 45
    assert own["read (b.py:9)"] == 35
    assert own["loop (a.py:5)"] == 10
    assert "main (a.py:1)" not in own


def test_verdicts() -> None:
    assert (verdict(True), verdict(False), verdict(None)) == ("met", "NOT MET", "n/a")


def test_contention_targets_need_every_message_seen_and_pgmqs_dead_tuples() -> None:
    fast_but_lossy = Latency(200, 2000, 200, 1990, 10.0, 40.0, 60.0, "idle in transaction", dead_per_msg=2.0)
    slow = Latency(200, 2000, 200, 2000, 50.0, 150.0, 300.0, "2 analytic readers", dead_per_msg=3.0)
    targets = contention_targets([fast_but_lossy, slow], 2.0, "pgmq")
    assert [met for _, _, met in targets] == [False, False, True, False]
    assert "10 unseen" in targets[0][1]
    assert targets[2][0].endswith("idle in transaction")
