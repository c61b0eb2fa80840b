"""The sandbox against real attacks: each test asserts the outcome and that nothing is left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from genesis_pgflow.errors import SandboxUnavailable
from genesis_pgflow.sandbox import Limits, Sandbox, run_bounded

pytestmark = pytest.mark.sandbox
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    box = Sandbox(Limits(wall_s=10))
    box.check()
    return box


def sandbox_processes(box: Sandbox) -> list[int]:
    """Host processes running as any of the sandbox's uids (or showing a marker, see below)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(f"/proc/{entry.name}/status").read_text()
            except OSError:
                continue
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            if uid in box.uids:
                found.append(int(entry.name))
    return found


def processes_showing(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def python(box: Sandbox, code: str, **kwargs) -> object:
    return box.run([PYTHON, "main.py"], files={"main.py": textwrap.dedent(code)}, **kwargs)


def test_runs_as_an_unprivileged_uid_with_no_capabilities_and_a_clean_environment(sandbox, monkeypatch):
    monkeypatch.setenv("GENESIS_SECRET_PROBE", "leaked")
    result = python(sandbox, """
        import os
        status = open("/proc/self/status").read()
        caps = {l.split()[0]: l.split()[1] for l in status.splitlines() if l.startswith("Cap")}
        print(os.getuid(), os.getcwd(), caps["CapEff:"], caps["CapPrm:"], caps["CapBnd:"])
        print("GENESIS_SECRET_PROBE" in os.environ, sorted(os.listdir("/")))
    """)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    uid, cwd, *capabilities = first.split()
    assert int(uid) in sandbox.uids and int(uid) != 0
    assert cwd == "/sandbox" and capabilities == ["0000000000000000"] * 3
    assert second.startswith("False")
    assert sandbox_processes(sandbox) == []


def test_a_fork_bomb_is_capped_and_leaves_no_process_behind(sandbox):
    result = python(sandbox, """
        import os, time
        forks = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                forks += 1
        except OSError as exc:
            print("capped after", forks, "errno", exc.errno)
    """, limits=Limits(processes=32, wall_s=10))
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[:2] == ["capped", "after"] and int(words[2]) < 32 and words[4] == "11"  # EAGAIN
    assert sandbox_processes(sandbox) == []


def test_a_shell_fork_bomb_is_killed_at_the_wall_time_with_nothing_left(sandbox):
    started = time.monotonic()
    result = sandbox.run(["/bin/sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 30"], limits=Limits(wall_s=3))
    assert time.monotonic() - started < 8
    assert result.returncode == 0 or result.timed_out
    assert wait_until(lambda: sandbox_processes(sandbox) == [], 5)


def test_allocating_two_gigabytes_fails(sandbox):
    result = python(sandbox, """
        try:
            block = bytearray(2 * 1024**3)
            print("allocated", len(block))
        except MemoryError:
            print("MemoryError")
    """)
    assert result.stdout.strip() == "MemoryError"


def test_an_infinite_loop_is_killed_within_the_wall_time(sandbox):
    started = time.monotonic()
    result = python(sandbox, "while True:\n    pass\n", limits=Limits(wall_s=2))
    assert result.timed_out and result.returncode is None
    assert 2 <= time.monotonic() - started < 5
    assert sandbox_processes(sandbox) == []


def test_cpu_time_is_bounded_even_when_the_wall_time_is_long(sandbox):
    started = time.monotonic()
    result = python(sandbox, "while True:\n    pass\n", limits=Limits(cpu_s=1, wall_s=20))
    assert not result.timed_out and result.returncode != 0
    assert time.monotonic() - started < 10


def test_a_huge_file_fails_with_efbig(sandbox):
    result = python(sandbox, """
        try:
            with open("big", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * 2**20)
        except OSError as exc:
            import os
            print("errno", exc.errno, os.path.getsize("big"))
    """, limits=Limits(file_bytes=4 * 2**20, wall_s=10))
    assert result.stdout.split() == ["errno", "27", str(4 * 2**20)]


def test_the_scratch_tmpfs_is_size_limited(sandbox):
    result = python(sandbox, """
        written = 0
        try:
            for n in range(64):
                with open(f"part{n}", "wb") as f:
                    f.write(b"x" * 2**20)
                written += 1
        except OSError as exc:
            print("errno", exc.errno, written)
    """, limits=Limits(tmpfs_bytes=8 * 2**20, wall_s=10))
    words = result.stdout.split()
    assert words[:2] == ["errno", "28"] and int(words[2]) <= 8  # ENOSPC


def test_no_network_not_even_the_hosts_loopback(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = python(sandbox, f"""
            import socket
            for port in (5432, {port}):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
                    print(port, "connected")
                except OSError as exc:
                    print(port, "unreachable", exc.errno)
            try:
                socket.getaddrinfo("pypi.org", 443)
                print("dns resolved")
            except OSError:
                print("dns failed")
        """)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("5432 unreachable") and lines[1].startswith(f"{port} unreachable"), result.stdout
    assert lines[2] == "dns failed"


def test_the_hosts_files_are_invisible_and_the_system_is_read_only(sandbox):
    project = Path(__file__).resolve().parents[2]
    result = python(sandbox, f"""
        import os
        for path in ("/work", "/root", "/home", "/etc/passwd", "/tmp", "/var", {str(project)!r}):
            print(path, os.path.exists(path))
        for path in ("/usr/evil", "/evil"):
            try:
                open(path, "w")
                print(path, "written")
            except OSError as exc:
                print(path, "refused", exc.errno)
    """)
    lines = result.stdout.splitlines()
    assert all(line.endswith(" False") for line in lines[:7]), result.stdout
    assert lines[7].startswith("/usr/evil refused") and lines[8].startswith("/evil refused")


def test_the_scratch_directory_is_fresh_each_time_and_leaves_nothing_on_the_host(sandbox, tmp_path):
    marker = f"genesis-scratch-{uuid.uuid4().hex}"
    first = sandbox.run(["/bin/sh", "-c", f"cat given.txt; mkdir -p sub && echo x > sub/{marker}; ls -a"],
                        files={"given.txt": "hello\n", "nested/dir/file.py": "pass\n"})
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["hello", ".", "..", "given.txt", "nested", "sub"]
    second = sandbox.run(["/bin/sh", "-c", "ls -a"])
    assert second.stdout.split() == [".", ".."]
    for root in ("/tmp", "/dev/shm", "/var/tmp"):
        leftovers = subprocess.run(["find", root, "-xdev", "-name", marker], capture_output=True, text=True, check=False)
        assert leftovers.stdout == ""


def test_a_writable_directory_is_the_only_place_the_code_can_write(sandbox, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "existing.txt").write_text("before\n")
    result = sandbox.run(["/bin/sh", "-c", "cat existing.txt && echo after > existing.txt && echo new > made.txt"],
                         writable=tmp_path / "repo")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "before\n"
    assert (tmp_path / "repo" / "existing.txt").read_text() == "after\n"
    assert (tmp_path / "repo" / "made.txt").read_text() == "new\n"
    assert not (tmp_path / "made.txt").exists()


def test_killing_the_parent_takes_the_sandbox_down(tmp_path):
    marker = f"genesis-orphan-{uuid.uuid4().hex}"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from genesis_pgflow.sandbox import Limits, Sandbox
        print("running", flush=True)
        Sandbox(Limits(wall_s=60)).run(["/bin/sh", "-c", "sleep 60; echo {marker}"])
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline() == "running\n"
        assert wait_until(lambda: len(processes_showing(marker)) > 0)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: processes_showing(marker) == [], 5), processes_showing(marker)
    finally:
        parent.kill()
        parent.stdout.close()


def test_cancelling_a_run_kills_it_at_once(sandbox):
    cancelled = threading.Event()
    timer = threading.Timer(0.5, cancelled.set)
    timer.start()
    started = time.monotonic()
    result = sandbox.run(["/bin/sh", "-c", "sleep 30"], cancelled=cancelled)
    timer.join()
    assert result.cancelled and result.returncode is None
    assert time.monotonic() - started < 3
    assert sandbox_processes(sandbox) == []


def test_output_is_bounded(sandbox):
    result = python(sandbox, "import sys\nsys.stdout.write('x' * (4 * 2**20))\n", limits=Limits(output_bytes=2**20))
    assert result.returncode == 0 and result.stdout_truncated and len(result.stdout) == 2**20


def test_concurrent_runs_get_their_own_uid_and_process_budget(sandbox):
    results = []
    script = "import os, time\npids = [os.fork() or time.sleep(2) or os._exit(0) for _ in range(20)]\nprint(os.getuid())\n"
    threads = [threading.Thread(target=lambda: results.append(python(sandbox, script, limits=Limits(processes=32))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 2


def test_fails_closed_when_bwrap_is_missing():
    box = Sandbox(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="/nonexistent/bwrap is missing") as raised:
        box.run(["/bin/true"])
    assert raised.value.code == "sandbox_unavailable"
    assert not box.available


def test_run_bounded_kills_the_whole_process_group_on_timeout():
    marker = f"genesis-group-{uuid.uuid4().hex}"
    result = run_bounded(["/bin/sh", "-c", f"sh -c 'sleep 30; echo {marker}' & sleep 30"], timeout_s=0.5)
    assert result.timed_out and result.returncode is None
    assert wait_until(lambda: processes_showing(marker) == [], 5)
