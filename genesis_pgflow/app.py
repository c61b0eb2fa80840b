"""The composition root: builds the database, stores, handlers, dispatcher and consumer from Settings."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from genesis_pgflow import maintenance
from genesis_pgflow.consumer import Consumer, ConsumerOptions
from genesis_pgflow.dispatcher import Dispatcher
from genesis_pgflow.handlers.base import Handler
from genesis_pgflow.handlers.experiments import ExperimentRunner
from genesis_pgflow.handlers.jobs import JobExecutor
from genesis_pgflow.handlers.llm_config import LlmConfigManager
from genesis_pgflow.handlers.rules import RuleEngine
from genesis_pgflow.sandbox import Sandbox
from genesis_pgflow.settings import Settings
from genesis_pgflow.store import admin, reports, retention, schema, tallies
from genesis_pgflow.store.control import PgControlStore
from genesis_pgflow.store.database import Database, check_reachable
from genesis_pgflow.store.embedded import embedded_dsn
from genesis_pgflow.store.experiments import ExperimentRecords, PgExperimentRecords
from genesis_pgflow.store.queue import PgQueueStore
from genesis_pgflow.store.state import PgStateStore, StateStore


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_dsn(settings: Settings) -> str:
    return settings.dsn or embedded_dsn(settings.home)


def upgrade_database(settings: Settings) -> schema.UpgradeReport:
    """`genesis db upgrade`: the configured (or embedded) database brought to the current schema."""
    dsn = resolve_dsn(settings)
    check_reachable(dsn)
    return schema.upgrade(dsn)


def prepare_database(settings: Settings, *, migrate: bool | None = None, writable: bool = False) -> str:
    """The DSN of the configured (or embedded, started) database once it is reachable (and, with
    writable, takes writes) and current: upgraded unless migrate (default: settings.migrate) is
    False, else checked (exit-2 errors)."""
    dsn = resolve_dsn(settings)
    check_reachable(dsn, writable=writable)
    if settings.migrate if migrate is None else migrate:
        schema.upgrade(dsn)
    else:
        schema.require_current(dsn)
    return dsn


def build_handlers(settings: Settings, state: StateStore, experiments: ExperimentRecords) -> dict[str, Handler]:
    """type -> handler; a new workflow plugs in here, not in the consumer."""
    sandbox = Sandbox()
    handlers: list[Handler] = [
        RuleEngine(state, settings.min_rule_confidence),
        LlmConfigManager(state),
        JobExecutor(sandbox, tools_dir=settings.npm_tools_dir),
        ExperimentRunner(settings, experiments, sandbox),
    ]
    return {h.payload_type: h for h in handlers}


@dataclass
class App:
    settings: Settings
    dsn: str
    db: Database
    queues: PgQueueStore
    state: PgStateStore
    experiments: PgExperimentRecords
    control: PgControlStore | None = None     # a consumer's, once built

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool | None = None, writable: bool = False) -> App:
        """Connect (exit-2 errors if the database is unreachable, read-only when writable, or
        behind), upgrading first unless migrate is False."""
        dsn = prepare_database(settings, migrate=migrate, writable=writable)
        # psycopg_pool warns once per connection it finds broken; the consumer's outage lines say it once
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        # connections: one per worker, one more for the loop, the completer and the periodic jobs
        # (they wait for each other), plus LISTEN and control of their own: --parallel + 3
        db = Database(dsn, max_size=settings.parallel + 1, application_name=f"genesis:{os.getpid()}",
                      connect_timeout_s=settings.connect_timeout_s,
                      statement_timeout_s=settings.statement_timeout_s).open()
        cipher = settings.secret_cipher()
        return cls(settings, dsn, db, PgQueueStore(db, consumer_name(), settings.intake_limits, cipher),
                   PgStateStore(db, cipher),
                   PgExperimentRecords(db))

    def dispatcher(self) -> Dispatcher:
        s = self.settings
        return Dispatcher(build_handlers(s, self.state, self.experiments), timeout_s=s.timeout_ms / 1000.0,
                          max_attempts=s.max_attempts, retry_base_s=s.retry_base_s, retry_max_s=s.retry_max_s,
                          max_timeout_s=s.max_timeout_ms / 1000.0,
                          timeout_ceilings={"genesis_experiment_request":
                                            max(s.max_experiment_timeout_ms, s.experiment_timeout_ms) / 1000.0})

    def consumer(self) -> Consumer:
        s = self.settings
        options = ConsumerOptions(queues=s.queues, parallel=s.parallel, batch_size=s.batch_size,
                                  poll_interval_s=s.poll_interval_ms / 1000.0, lease_s=s.lease_s,
                                  drain=s.drain, shutdown_grace_s=s.shutdown_grace_s, max_outage_s=s.max_outage_s,
                                  control_poll_s=s.heartbeat_interval_s, take_after_s=s.take_after_ms / 1000.0)
        # steered through genesis.fleet_control (pause, drain, stop), on a LISTEN connection of its own
        self.control = PgControlStore(self.db, self.queues.consumer)
        consumer = Consumer(self.queues, self.dispatcher(), options,
                            periodic=maintenance.scheduled_jobs(s, self.experiments), hurry=self.db.hurry,
                            control=self.control)
        # genesis.consumers: alive, and how much it holds (a timed-out job's slot is still held)
        presence = self.presence()
        consumer.periodic.append(("consumer_heartbeat", s.heartbeat_interval_s,
                                  lambda: presence.beat(len(consumer.running) + len(consumer.overrun))))
        consumer.periodic.append(retention.scheduled_job(self.db, s))
        consumer.periodic.append(tallies.scheduled_job(self.db))
        # the daily experiment report to genesis_reports: one consumer sends it, once a day
        consumer.periodic.append(reports.scheduled_job(self.db, self.queues.consumer))
        return consumer

    def presence(self) -> admin.ConsumerPresence:
        """This process as genesis.consumers lists it (the CLI registers it and marks it stopped)."""
        s = self.settings
        return admin.ConsumerPresence(self.db, self.queues.consumer, s.queues, s.parallel,
                                      s.heartbeat_interval_s, s.consumer_retention_s)

    def close(self) -> None:
        self.queues.close()
        if self.control is not None:
            self.control.close()
        self.db.close()
