"""Where genesis-consume spends its CPU: py-spy over one `--drain` run on N rule updates, top frames by own time.

    python -m benchmarks.hotspots [--messages 20000] [--top 10] [--idle] [--keep profile.txt] [-- CONSUMER ARGS]

Needs py-spy (pip install '.[bench]') and ptrace rights over the child (root, or
kernel.yama.ptrace_scope 0). Runs on a throwaway PostgreSQL of its own, as make bench does.
Own time: the samples in which the frame is the innermost one. By default only the thread holding
the interpreter lock is sampled (py-spy --gil): py-spy's idle detection does not see a thread
blocked in C (a lock, a socket) as idle here, so without it Condition.wait and psycopg's
Connection.wait topped the list; --idle counts every thread, waiting or not.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.pipelines import GENESIS_CONSUME, cli_env
from benchmarks.run import GENESIS_P4_B100, bench_database


def own_time(collapsed: str) -> tuple[Counter[str], int]:
    """Samples per innermost frame of py-spy's raw (collapsed) output, and the samples in all."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        total += int(count)
    return own, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--idle", action="store_true", help="count idle (waiting) threads as well")
    parser.add_argument("--keep", type=Path, help="keep py-spy's collapsed stacks in this file")
    parser.add_argument("consumer_args", nargs="*", default=GENESIS_P4_B100)
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed (pip install '.[bench]')")

    with bench_database(None) as (db, where), tempfile.TemporaryDirectory(prefix="genesis-hotspots-") as tmp:
        db.fill_pgmq(args.messages)
        out = Path(tmp) / "profile.txt"
        command = [py_spy, "record", "--format", "raw", "--rate", str(args.rate), "-o", str(out),
                   *(["--idle"] if args.idle else ["--gil"]),
                   "--", str(GENESIS_CONSUME), "--drain", *args.consumer_args]
        done = subprocess.run(command, env=cli_env(db.dsn, Path(tmp)), capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            sys.exit(f"py-spy failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        collapsed = out.read_text()
        if args.keep:
            args.keep.write_text(collapsed)
        archived, seconds = db.archive_window()
    own, total = own_time(collapsed)
    print(f"genesis-consume --drain {' '.join(args.consumer_args)} on {args.messages:,} rule updates ({where}); "
          f"{archived / seconds if seconds else 0:.0f} msg/s under py-spy; {total} samples"
          f"{' (idle included)' if args.idle else ' holding the interpreter lock'}")
    print(f"  {'own':>6}  frame")
    for frame, count in own.most_common(args.top):
        print(f"  {100 * count / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
