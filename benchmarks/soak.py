"""A soak run for minutes, outside CI: producers send steadily while chaos strikes at random (kill -9
and SIGTERM of consumers, which are restarted; backend termination; fast and immediate server
restarts; a refused or blackholed network for a few seconds). Every interval it prints throughput,
retries, errors and each consumer's memory; at the end it drains and checks that every request has
exactly one result, one archive row and one terminal run row (tests/faults/invariants.py).

    python -m benchmarks.soak [--minutes 5] [--consumers 2] [--parallel 4] [--rate 200] [--seed N]

Exit 0 when the invariants hold, 1 when not. Needs root or the postgres user (its own throwaway
PostgreSQL: the shared one is never touched)."""

from __future__ import annotations

import argparse
import json
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from tests.faults.conftest import RULES, RULES_RESULTS, TEMPLATE, rule
from tests.faults.consumers import GENESIS, Consumer, Consumers, cli_env, run_cli
from tests.faults.invariants import violations
from tests.faults.proxy import Proxy
from tests.faults.server import ThrowawayServer

DB = "soak"
LLM = "genesis_llm_config_updates"


def llm_config(i: int) -> dict[str, object]:
    return {"type": "genesis_llm_config_update", "provider": f"p{i % 7}", "complexity": "simple",
            "models": [f"m-{i}"], "settings": {"api_key": f"sk-soak-{i}"}}


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.server = ThrowawayServer.create()
        self.home = Path(tempfile.mkdtemp(prefix="genesis-soak-", dir="/var/tmp"))
        self.home.chmod(0o755)
        self.proxy = Proxy(self.server.port)
        self.consumers = Consumers()
        self.slots: list[Consumer] = []
        self.stop = threading.Event()
        self.sent = 0
        self.send_errors = 0
        self.events: list[str] = []
        self.unexpected_exits = 0
        self.lock = threading.RLock()

    # --- set-up ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.server.execute(f'CREATE DATABASE "{TEMPLATE}"')
        upgraded = run_cli("db", "upgrade", env=cli_env(self.home, self.server.dsn(TEMPLATE)), script=GENESIS)
        if upgraded.returncode != 0:
            raise SystemExit(upgraded.stderr)
        self.server.execute(f'CREATE DATABASE "{DB}" TEMPLATE "{TEMPLATE}"')

    def start_consumer(self) -> Consumer:
        env = cli_env(self.home, self.server.dsn(DB, port=str(self.proxy.port)), GENESIS_LEASE_S="5",
                      GENESIS_SHUTDOWN_GRACE_S="5")
        # no --no-migrate: a restarted consumer upgrades the database first, as in production
        return self.consumers.start("--parallel", str(self.args.parallel), "--queues", f"{RULES},{LLM}", env=env)

    # --- the threads ----------------------------------------------------------------------------

    def produce(self) -> None:
        """About `rate` requests a second, in small batches, straight to the server (producers
        are not behind the proxy: their outage is not the consumer's)."""
        i = 0
        conn: psycopg.Connection | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.server.dsn(DB), autocommit=True, connect_timeout=3)
                batch = max(1, self.args.rate // 10)
                conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])",
                             (RULES, [json.dumps(rule(i + k)) for k in range(batch)]))
                if i % 5 == 0:
                    conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (LLM, json.dumps(llm_config(i))))
                    self.sent += 1
                i += batch
                self.sent += batch
            except psycopg.Error:
                self.send_errors += 1
                conn = None
                self.stop.wait(0.5)
            self.stop.wait(0.1)
        if conn is not None:
            conn.close()

    def chaos(self) -> None:
        actions = [self.kill_9, self.kill_9, self.sigterm, self.terminate_backends, self.restart_fast,
                   self.restart_immediate, self.cut, self.blackhole]
        while not self.stop.wait(self.rng.uniform(self.args.chaos_min_s, self.args.chaos_max_s)):
            action = self.rng.choice(actions)
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - a failed action is reported, the soak goes on
                self.event(f"{action.__name__} failed: {exc}")

    def event(self, what: str) -> None:
        self.events.append(what)
        print(f"  ! {time.strftime('%H:%M:%S')} {what}", flush=True)

    def kill_9(self) -> None:
        with self.lock:
            self._kill_9()

    def _kill_9(self) -> None:
        slot = self.rng.randrange(len(self.slots))
        self.slots[slot].kill()
        self.slots[slot] = self.start_consumer()
        self.event(f"kill -9 consumer {slot}, restarted")

    def sigterm(self) -> None:
        with self.lock:
            self._sigterm()

    def _sigterm(self) -> None:
        slot = self.rng.randrange(len(self.slots))
        self.slots[slot].signal(signal.SIGTERM)
        code = self.slots[slot].wait(timeout=120)
        self.slots[slot] = self.start_consumer()
        self.event(f"SIGTERM consumer {slot}: exit {code}, restarted")

    def terminate_backends(self) -> None:
        self.event(f"terminated {self.server.terminate_backends(DB)} backend(s)")

    def restart_fast(self) -> None:
        self.server.restart("fast")
        self.proxy.upstream = ("127.0.0.1", self.server.port)
        self.event("server restarted (fast)")

    def restart_immediate(self) -> None:
        self.server.restart("immediate")
        self.proxy.upstream = ("127.0.0.1", self.server.port)
        self.event("server restarted (immediate)")

    def revive(self) -> None:
        """A consumer that exited on its own is a finding: reported, then restarted."""
        for slot, consumer in enumerate(self.slots):
            if not consumer.running() and consumer.proc.returncode is not None:
                code = consumer.wait(timeout=5)
                self.event(f"consumer {slot} EXITED on its own with {code}: {consumer.stderr().splitlines()[-1:]}")
                self.unexpected_exits += 1
                self.slots[slot] = self.start_consumer()

    def cut(self) -> None:
        seconds = self.rng.uniform(1, 8)
        self.proxy.cut()
        self.stop.wait(seconds)
        self.proxy.restore()
        self.event(f"network refused for {seconds:.1f} s")

    def blackhole(self) -> None:
        seconds = self.rng.uniform(1, 8)
        self.proxy.blackhole()
        self.stop.wait(seconds)
        self.proxy.restore()
        self.event(f"network blackholed for {seconds:.1f} s")

    # --- reporting ------------------------------------------------------------------------------

    def figures(self) -> dict[str, int]:
        with psycopg.connect(self.server.dsn(DB), autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(f"""
                SELECT (SELECT count(*) FROM pgmq.q_{RULES_RESULTS})
                     + (SELECT count(*) FROM pgmq.q_{LLM}_results) AS answered,
                       (SELECT count(*) FROM genesis.workflow_runs WHERE attempts > 1) AS retried,
                       (SELECT count(*) FROM genesis.workflow_runs WHERE status = 'failed') AS failed,
                       (SELECT count(*) FROM pgmq.q_{RULES}) + (SELECT count(*) FROM pgmq.q_{LLM}) AS queued,
                       (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) AS sessions
            """).fetchone()
        assert row is not None
        return dict(zip(("answered", "retried", "failed", "queued", "sessions"), row, strict=True))

    @staticmethod
    def rss_mb(consumer: Consumer) -> str:
        try:
            for line in Path(f"/proc/{consumer.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return f"{int(line.split()[1]) / 1024:.0f}"
        except OSError:
            pass
        return "-"

    def run(self) -> int:
        self.prepare()
        self.slots = [self.start_consumer() for _ in range(self.args.consumers)]
        threads = [threading.Thread(target=self.produce, daemon=True), threading.Thread(target=self.chaos, daemon=True)]
        for thread in threads:
            thread.start()
        started = last_at = time.monotonic()
        last = 0
        print(f"soak: {self.args.minutes} min, {self.args.consumers} consumer(s) x --parallel {self.args.parallel}, "
              f"~{self.args.rate} req/s, seed {self.args.seed}")
        print(f"{'t (s)':>6} {'sent':>8} {'answered':>9} {'answers/s':>9} {'retried':>8} {'failed':>7} "
              f"{'queued':>7} {'sessions':>8}  RSS MB per consumer")
        try:
            while time.monotonic() - started < self.args.minutes * 60:
                time.sleep(self.args.every)
                with self.lock:
                    self.revive()
                try:
                    f = self.figures()
                except psycopg.Error as exc:
                    print(f"{time.monotonic() - started:6.0f} (database away: {str(exc).splitlines()[0]})")
                    continue
                now = time.monotonic()
                rate = (f["answered"] - last) / (now - last_at)
                last, last_at = f["answered"], now
                print(f"{now - started:6.0f} {self.sent:8d} {f['answered']:9d} {rate:9.0f} {f['retried']:8d} "
                      f"{f['failed']:7d} {f['queued']:7d} {f['sessions']:8d}  "
                      f"{' '.join(self.rss_mb(c) for c in self.slots)}", flush=True)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(180)
        return self.finish()

    def finish(self) -> int:
        """Network and server back, every consumer stopped, one drain; then the invariants."""
        self.proxy.restore()
        self.server.ensure_running()
        for consumer in self.slots:
            consumer.signal(signal.SIGTERM)
            consumer.wait(timeout=120)
        drained = run_cli("--drain", "--parallel", str(self.args.parallel), "--queues", f"{RULES},{LLM}",
                          env=cli_env(self.home, self.server.dsn(DB), GENESIS_LEASE_S="5"),
                          timeout=1800)
        found = violations(self.server.dsn(DB))
        f = self.figures()
        print(f"drain: exit {drained.returncode}; sent {self.sent} (+{self.send_errors} failed sends), "
              f"answered {f['answered']}, retried {f['retried']}, failed {f['failed']}; {len(self.events)} fault(s)")
        if drained.returncode != 0:
            print(drained.stderr[-3000:])
        print(f"consumers that exited on their own: {self.unexpected_exits}")
        print("invariants: " + ("hold" if not found else "BROKEN\n  " + "\n  ".join(found[:20])))
        return 0 if not found and drained.returncode == 0 and not self.unexpected_exits else 1

    def close(self) -> None:
        self.consumers.kill_all()
        self.proxy.close()
        self.server.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rate", type=int, default=200, help="requests a second, about")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between two report lines")
    parser.add_argument("--chaos-min-s", type=float, default=8.0)
    parser.add_argument("--chaos-max-s", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(2**32))
    soak = Soak(parser.parse_args())
    try:
        return soak.run()
    finally:
        soak.close()


if __name__ == "__main__":
    raise SystemExit(main())
