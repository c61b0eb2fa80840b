"""Settings: one pydantic model, and the only place that reads environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from genesis_pgflow.cipher import KEY_FILE, SecretCipher, parse_keys
from genesis_pgflow.messages import REQUEST_QUEUES, IntakeLimits

ROOT_HOME = Path("/var/lib/genesis")
MAX_PROCESSES = 64


def default_home(env: Mapping[str, str], euid: int | None = None) -> Path:
    """GENESIS_HOME, else ~/.genesis; for root /var/lib/genesis, because root's home is private:
    the embedded server (run as the `pgserver` user) and the sandbox's unprivileged uids must
    reach the data and sandbox folders, and pgserver would open up every parent folder."""
    if env.get("GENESIS_HOME"):
        return Path(env["GENESIS_HOME"]).expanduser()
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_HOME
    return Path.home() / ".genesis"


class Settings(BaseModel):
    """Everything configurable; built once by the CLI (flags over environment over defaults)."""

    model_config = ConfigDict(frozen=True)

    dsn: str | None = None
    home: Path = Field(default_factory=lambda: default_home(os.environ))
    # npm tools of the analysers (Biome, TypeScript); see npm_tools_dir
    tools_dir: Path | None = None
    parallel: int = Field(default=4, ge=1, le=256)
    # consumer processes sharing `parallel` (processes.py); "auto": one per usable core, at most
    # `parallel`; 1: this process consumes
    processes: int | Literal["auto"] = "auto"
    batch_size: int = Field(default=10, ge=1, le=1000)
    # the consumer takes only messages that have waited this long, and wakes this much after a
    # NOTIFY (a command of several processes sets it for all but its first: processes.py)
    take_after_ms: int = Field(default=0, ge=0, le=60_000)
    poll_interval_ms: int = Field(default=1000, ge=10)
    timeout_ms: int = Field(default=30_000, ge=1)
    # the most a request's timeout_ms may ask for (an experiment's: max_experiment_timeout_ms);
    # never below timeout_ms
    max_timeout_ms: int = Field(default=300_000, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    # intake: a message over these limits fails alone (payload_too_large, invalid_payload); a
    # body over max_payload_bytes never leaves the database
    max_payload_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    max_headers_bytes: int = Field(default=64 * 1024, ge=256)
    max_json_depth: int = Field(default=64, ge=8, le=500)
    max_number_length: int = Field(default=100, ge=20, le=4000)
    queues: tuple[str, ...] = REQUEST_QUEUES
    drain: bool = False
    migrate: bool = True
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # the address /metrics, /healthz and /readyz listen on (0.0.0.0 or :: for every interface)
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    # the dashboard on the metrics port may requeue dead letters and pause queues (POST, with the
    # page's token); off: it only shows
    dashboard_actions: bool = False
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # retries through the queue: base * 2**(attempt-1), capped, with full jitter
    retry_base_s: float = Field(default=2.0, ge=0)
    retry_max_s: float = Field(default=300.0, ge=0)
    # lease (pgmq visibility timeout) held on in-flight messages, renewed every lease_s/3:
    # a killed consumer's messages come back within lease_s
    lease_s: int = Field(default=10, ge=1)
    # grace period for in-flight work at shutdown
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # a consumer's heartbeat in genesis.consumers; silent for 3 intervals it is shown as gone, and
    # gone or stopped for consumer_retention_s it is deleted
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    consumer_retention_s: float = Field(default=3600.0, ge=0)
    # how long the database may stay unreachable (or refuse writes) before the consumer exits 2
    max_outage_s: float = Field(default=300.0, gt=0)
    # server-side statement timeout of the consumer's own sessions; a call the server leaves
    # unanswered for 5 s longer is cut by the client (a blackholed network)
    statement_timeout_s: float = Field(default=30.0, gt=0)
    # libpq connect_timeout of every connection (unless the DSN sets one)
    connect_timeout_s: int = Field(default=5, ge=1)

    # RuleEngine
    min_rule_confidence: float = Field(default=0.85, ge=0, le=1)
    # ExperimentRunner
    regression_threshold: float = Field(default=0.05, ge=0, le=1)
    # tests failing after the change run this many more times at the change and at the baseline:
    # one that both passes and fails on a commit is flaky, never a regression
    experiment_reruns: int = Field(default=2, ge=0, le=10)
    experiment_timeout_ms: int = Field(default=3_600_000, ge=1)
    max_experiment_timeout_ms: int = Field(default=3_600_000, ge=1)
    max_experiments_concurrent: int = Field(default=5, ge=1)
    sandbox_max_age_days: float = Field(default=7.0, ge=0)
    sandbox_cleanup_interval_s: float = Field(default=6 * 3600.0, gt=0)
    sandbox_integrity_interval_s: float = Field(default=24 * 3600.0, gt=0)
    # which repositories an experiment may use (workspace.RepoAllow): comma-separated absolute
    # local roots and git URL prefixes; empty refuses every experiment
    repo_allow: str = ""
    # disk and memory an experiment may use: its copy (clone + checkout) on disk, and each test
    # run's writes on a capped scratch (tmpfs over the copy)
    experiment_max_copy_mb: int = Field(default=1024, ge=1)
    experiment_scratch_mb: int = Field(default=512, ge=1)
    experiment_scratch_inodes: int = Field(default=100_000, ge=100)
    # copies kept per producer (instance_id): the oldest finished ones go first
    experiment_copies_per_instance: int = Field(default=10, ge=1)
    experiment_copies_mb_per_instance: int = Field(default=4096, ge=1)
    # copies of experiments that ended in success are removed sooner than the rest
    sandbox_success_max_age_days: float = Field(default=1.0, ge=0)

    # retention (store/retention.py): archived requests, finished runs and unread results older
    # than these are deleted (0 keeps them forever); dead letters never are
    retention_archive_days: float = Field(default=7.0, ge=0)
    retention_runs_days: float = Field(default=30.0, ge=0)
    retention_results_days: float = Field(default=7.0, ge=0)
    retention_interval_s: float = Field(default=600.0, gt=0)
    retention_batch_size: int = Field(default=5000, ge=100, le=100_000)
    # Fernet key(s) sealing stored secrets, comma-separated, the first seals (cipher.py); unset:
    # <home>/secret.key, made on first use
    secret_key: SecretStr | None = None

    @field_validator("queues")
    @classmethod
    def _known_queues(cls, queues: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [q for q in queues if q not in REQUEST_QUEUES]
        if unknown:
            raise ValueError(f"unknown queue(s) {', '.join(unknown)}; known: {', '.join(REQUEST_QUEUES)}")
        if not queues:
            raise ValueError("at least one queue is needed")
        return tuple(dict.fromkeys(queues))

    @field_validator("processes", mode="before")
    @classmethod
    def _processes(cls, value: object) -> int | str:
        if value == "auto":
            return "auto"
        try:
            n = int(str(value))
        except ValueError:
            raise ValueError(f"must be auto or a whole number, got {value!r}") from None
        if not 1 <= n <= MAX_PROCESSES:
            raise ValueError(f"must be auto or 1 to {MAX_PROCESSES}, got {n}")
        return n

    @field_validator("secret_key")
    @classmethod
    def _usable_keys(cls, key: SecretStr | None) -> SecretStr | None:
        """At start, not at the first secret: raises cipher.SecretKeyError naming the key's position, never the key."""
        if key is not None:
            parse_keys(key.get_secret_value(), "GENESIS_SECRET_KEY")
        return key

    @property
    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(max_payload_bytes=self.max_payload_bytes, max_headers_bytes=self.max_headers_bytes,
                            max_depth=self.max_json_depth, max_number_length=self.max_number_length)

    def secret_cipher(self) -> SecretCipher:
        """The cipher of stored secrets: secret_key, else the key file <home>/secret.key (made on first use)."""
        return SecretCipher(self.secret_key.get_secret_value() if self.secret_key else None, self.home / KEY_FILE)

    @property
    def sandboxes_dir(self) -> Path:
        return self.home / "sandboxes"

    @property
    def npm_tools_dir(self) -> Path:
        """Where Biome and TypeScript are installed (scripts/system-deps.sh): GENESIS_TOOLS_DIR, else
        the checkout's .tools/ when running from one, else <home>/tools."""
        if self.tools_dir is not None:
            return self.tools_dir
        checkout = Path(__file__).resolve().parents[1] / ".tools"
        return checkout if checkout.is_dir() else self.home / "tools"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Flags (overrides, None meaning 'not given') over environment over defaults."""
        env = os.environ if env is None else env
        values: dict[str, object] = {"home": default_home(env)}
        dsn = env.get("GENESIS_DATABASE_URL") or env.get("DATABASE_URL")
        if dsn:
            values["dsn"] = dsn
        for name in cls.model_fields:
            key = f"GENESIS_{name.upper()}"
            if name not in ("dsn", "home") and env.get(key):
                values[name] = tuple(env[key].split(",")) if name == "queues" else env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
