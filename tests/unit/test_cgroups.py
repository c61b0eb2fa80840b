"""Per-run cgroups: the v2 logic against a directory laid out like cgroupfs (no v2 controller is
delegated on this machine kind), detection from real-format mountinfo, and v1 on the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from genesis_pgflow import cgroups
from genesis_pgflow.cgroups import Budget, CgroupError, V1Hierarchy, V2Hierarchy, V2Run
from genesis_pgflow.processes import usable_cores

MiB = 2**20


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma misc") -> Path:
    """A cgroup2 root as the kernel lays it out: the root lists its controllers, and a child made
    under it (by the code under test) would list what the root's subtree_control hands down."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    parent = root / cgroups.PARENT
    parent.mkdir()
    (parent / "cgroup.controllers").write_text(controllers + "\n")
    return parent


def mountinfo(v2_point: Path, v1: dict[str, Path] | None = None) -> str:
    lines = [f"35 24 0:30 / {v2_point} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"]
    for n, (controller, point) in enumerate((v1 or {}).items()):
        lines.append(f"{40 + n} 24 0:{40 + n} / {point} rw,relatime - cgroup cgroup rw,{controller}")
    lines.append("22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw")
    return "\n".join(lines) + "\n"


# --- detection -----------------------------------------------------------------------------------------


def test_v2_with_delegated_controllers_comes_first_and_hands_them_down(tmp_path):
    parent = fake_v2(tmp_path / "cgroup")
    hierarchy, reasons = cgroups.detect(mountinfo=mountinfo(tmp_path / "cgroup"), self_cgroup="0::/\n")
    assert isinstance(hierarchy, V2Hierarchy) and reasons == []
    assert hierarchy.parent == parent
    assert hierarchy.describe() == "cgroup v2 (memory, pids, cpu)"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_an_empty_v2_hierarchy_falls_back_to_v1_under_the_processs_own_cgroups(tmp_path):
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    v1 = {c: tmp_path / c for c in ("memory", "pids", "cpu", "cpuacct", "freezer")}
    for point in v1.values():
        (point / "box" / "inner").mkdir(parents=True)
        (point / "box" / "inner" / "cgroup.procs").write_text("")
        (point / "box" / "inner" / cgroups.PARENT).mkdir()
        (point / "box" / "inner" / cgroups.PARENT / "cgroup.procs").write_text("")
    own = "".join(f"{n}:{c}:/box/inner\n" for n, c in enumerate(v1, 1)) + "0::/\n"
    hierarchy, reasons = cgroups.detect(mountinfo=mountinfo(tmp_path / "unified", v1), self_cgroup=own)
    assert isinstance(hierarchy, V1Hierarchy)
    assert reasons == [f"cgroup v2: {tmp_path / 'unified' / cgroups.PARENT} has no memory or pids controller "
                       "(not delegated)"]
    assert hierarchy.parents["memory"] == tmp_path / "memory" / "box" / "inner" / cgroups.PARENT
    assert hierarchy.describe() == "cgroup v1 (memory, pids, cpu)"


def test_no_usable_hierarchy_says_why(tmp_path):
    (tmp_path / "unified").mkdir()
    hierarchy, reasons = cgroups.detect(mountinfo=mountinfo(tmp_path / "unified"), self_cgroup="0::/\n")
    assert hierarchy is None
    assert reasons[-1] == "cgroup v1: no cgroup v1 memory or pids hierarchy is mounted"


def test_a_v2_parent_whose_controllers_are_not_handed_down_is_refused(tmp_path):
    fake_v2(tmp_path / "cgroup", controllers="cpu io")
    with pytest.raises(CgroupError, match="has no memory or pids controller"):
        V2Hierarchy.open(tmp_path / "cgroup" / cgroups.PARENT)


# --- one v2 run, against the fake layout ---------------------------------------------------------------


def test_a_v2_run_gets_its_limits_in_its_own_directory(tmp_path):
    hierarchy = V2Hierarchy.open(fake_v2(tmp_path / "cgroup"))
    run = hierarchy.create("run-1-0", Budget(memory_bytes=256 * MiB, processes=65, cpu_cores=1.5))
    directory = tmp_path / "cgroup" / cgroups.PARENT / "run-1-0"
    assert run.directories() == [directory]
    written = {f.name: f.read_text() for f in directory.iterdir()}
    assert written == {"memory.max": str(256 * MiB), "memory.oom.group": "1", "pids.max": "65"}


def test_v2_swap_and_cpu_are_limited_where_the_kernel_offers_them(tmp_path):
    run = V2Run("run-1-0", tmp_path)
    (tmp_path / "memory.swap.max").write_text("max\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    run.apply(Budget(memory_bytes=64 * MiB, processes=8, cpu_cores=0.5))
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"


def test_the_first_process_enters_the_run_before_it_execs_the_command(tmp_path):
    run = V2Run("run-1-0", tmp_path)
    (tmp_path / "cgroup.procs").write_text("")
    done = subprocess.run(run.enter_command(["/bin/sh", "-c", "echo $$"]), capture_output=True, text=True, check=True)
    # the pid written into cgroup.procs is the very process that became the command
    assert (tmp_path / "cgroup.procs").read_text().strip() == done.stdout.strip()


def test_a_run_that_cannot_be_entered_never_runs_the_command(tmp_path):
    run = V2Run("run-1-0", tmp_path / "missing")
    marker = tmp_path / "ran"
    done = subprocess.run(run.enter_command(["/bin/touch", str(marker)]), capture_output=True, text=True)
    assert done.returncode == cgroups.ENTER_FAILED and cgroups.ENTER_FAILED_MARK in done.stderr
    assert not marker.exists()


def test_v2_usage_is_read_from_peak_events_and_cpu_stat(tmp_path):
    run = V2Run("run-1-0", tmp_path)
    (tmp_path / "memory.peak").write_text("268435456\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert run.usage() == cgroups.Usage(memory_peak_bytes=268435456, cpu_s=2.5, oom_kills=1)


def test_v2_kill_uses_cgroup_kill_where_the_kernel_has_it(tmp_path):
    run = V2Run("run-1-0", tmp_path)
    sleeper = subprocess.Popen(["/bin/sleep", "30"])
    try:
        (tmp_path / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        (tmp_path / "cgroup.kill").write_text("")
        run.kill(timeout_s=0.3)
        assert (tmp_path / "cgroup.kill").read_text() == "1"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_v2_kill_without_cgroup_kill_freezes_kills_every_pid_and_thaws(tmp_path):
    run = V2Run("run-1-0", tmp_path)
    sleeper = subprocess.Popen(["/bin/sleep", "30"])
    (tmp_path / "cgroup.procs").write_text(f"{sleeper.pid}\n")
    run.kill(timeout_s=0.3)
    assert sleeper.wait(timeout=10) == -9
    assert (tmp_path / "cgroup.freeze").read_text() == "0"


# --- v1 on this machine's kernel -----------------------------------------------------------------------


@pytest.fixture
def v1() -> V1Hierarchy:
    hierarchy, reasons = cgroups.detect()
    if not isinstance(hierarchy, V1Hierarchy):
        pytest.skip(f"no writable cgroup v1 hierarchy here: {reasons}")
    return hierarchy


@pytest.mark.sandbox
def test_a_v1_run_is_limited_killed_and_removed_on_the_real_kernel(v1):
    run = v1.create(v1.unique_name("test"), Budget(memory_bytes=64 * MiB, processes=8, cpu_cores=0.5))
    try:
        memory = run.by_controller["memory"]
        assert int((memory / "memory.limit_in_bytes").read_text()) == 64 * MiB
        assert (run.by_controller["pids"] / "pids.max").read_text().strip() == "8"
        script = textwrap.dedent("""
            import os, time
            for _ in range(3):
                if os.fork() == 0:
                    os.setsid()            # out of the process group: the cgroup still holds it
                    time.sleep(60)
            time.sleep(60)
        """)
        parent = subprocess.Popen(run.enter_command(["/usr/bin/python3", "-c", script]))
        started = cgroups_wait(lambda: len(run.pids()) >= 4)
        assert started, run.pids()
        pids = run.pids()
        run.kill()
        parent.wait(timeout=10)
        assert run.pids() == []
        assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)
    finally:
        run.close()
    assert not run.exists()


@pytest.mark.sandbox
def test_stale_runs_of_a_consumer_that_is_gone_are_removed(v1):
    name = f"test-{_dead_pid()}-0"
    run = v1.create(name, Budget(memory_bytes=64 * MiB, processes=8))
    assert run.exists()
    assert name in v1.remove_stale()
    assert not run.exists()


def cgroups_wait(condition, timeout_s: float = 10.0) -> bool:
    from genesis_pgflow.testing import wait_until

    try:
        return bool(wait_until(condition, timeout=timeout_s))
    except AssertionError:
        return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def _dead_pid() -> int:
    """A pid no process has now (one of ours that exited and was reaped)."""
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    assert not Path(f"/proc/{child.pid}").exists() or child.pid == os.getpid()
    return child.pid


# --- the CPU quota a consumer sizes itself by (processes.usable_cores) ----------------------------------


def test_the_lowest_v2_cpu_max_on_the_way_up_is_the_quota(tmp_path):
    root = tmp_path / "cgroup"
    inner = root / "box" / "inner"
    inner.mkdir(parents=True)
    (root / "box" / "cpu.max").write_text("150000 100000\n")
    (inner / "cpu.max").write_text("max 100000\n")
    assert cgroups.cpu_quota_cores(mountinfo=mountinfo(root), self_cgroup="0::/box/inner\n") == 1.5
    (inner / "cpu.max").write_text("50000 100000\n")
    assert cgroups.cpu_quota_cores(mountinfo=mountinfo(root), self_cgroup="0::/box/inner\n") == 0.5
    # no quota anywhere ("max", or no cpu controller files at all)
    (inner / "cpu.max").write_text("max 100000\n")
    (root / "box" / "cpu.max").unlink()
    assert cgroups.cpu_quota_cores(mountinfo=mountinfo(root), self_cgroup="0::/box/inner\n") is None


def test_a_v1_quota_of_minus_1_is_no_quota(tmp_path):
    (tmp_path / "unified").mkdir()
    cpu = tmp_path / "cpu"
    (cpu / "box").mkdir(parents=True)
    (cpu / "box" / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "box" / "cpu.cfs_period_us").write_text("100000\n")
    text = mountinfo(tmp_path / "unified", {"cpu": cpu})
    assert cgroups.cpu_quota_cores(mountinfo=text, self_cgroup="1:cpu:/box\n0::/\n") is None
    (cpu / "box" / "cpu.cfs_quota_us").write_text("200000\n")
    assert cgroups.cpu_quota_cores(mountinfo=text, self_cgroup="1:cpu:/box\n0::/\n") == 2.0


@pytest.mark.sandbox
def test_a_consumer_in_a_cgroup_of_one_core_counts_one_usable_core_on_the_real_kernel(v1):
    """A process put in a v1 cgroup with a quota of one core (as a container's --cpus 1 is) sizes
    --processes auto to 1, whatever the machine's cores; outside it, to its CPU affinity."""
    probe = [sys.executable, "-c", "from genesis_pgflow.processes import usable_cores; print(usable_cores())"]
    run = v1.create(v1.unique_name("test"), Budget(memory_bytes=256 * MiB, processes=16, cpu_cores=1.0))
    try:
        if "cpu" not in run.by_controller:
            pytest.skip("no v1 cpu controller here")
        inside = subprocess.run(run.enter_command(probe), capture_output=True, text=True, timeout=60, check=True)
        outside = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=True)
    finally:
        run.close()
    assert inside.stdout.strip() == "1"
    assert outside.stdout.strip() == str(usable_cores())
