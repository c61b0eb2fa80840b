"""The deployment files (Dockerfile, compose.yaml, deploy/kubernetes, deploy/systemd): checked against
their schemas where one is available offline, by hand for what matters to genesis-consume, and run:
the image's entrypoint as a plain process (no container engine here), and the sandbox under the
capabilities the files grant it."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml  # type: ignore[import-untyped]

from genesis_pgflow.messages import REQUEST_QUEUES
from genesis_pgflow.settings import Settings
from genesis_pgflow.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "genesis-consume.service"
UNIT_ENV = ROOT / "deploy" / "systemd" / "genesis-consume.env.example"
VENV_BIN = Path(sys.executable).parent
IMAGE_VENV_BIN = "/opt/genesis/venv/bin"
GRACE_DEFAULT = Settings.model_fields["shutdown_grace_s"].default
SANDBOX_QUEUES = {"code_execution_requests", "genesis_experiment_requests"}
OLDEST_KUBERNETES = "1.30.0"    # securityContext.appArmorProfile is 1.30's


# --- reading the files ----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_stages(text: str) -> list[Stage]:
    """The Dockerfile's stages with their instructions (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue    # Docker drops comment lines, inside a continuation too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append((pending + line).strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        else:
            assert keyword == "ARG", f"only ARG may come before the first FROM, not {keyword}"
    return stages


def stage_named(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def stage_chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    names = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[0].base in names:
        chain.insert(0, names[chain[0].base])
    return chain


def image_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for link in stage_chain(stages, stage):
        for rest in link.all("ENV"):
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def image_argv(stages: list[Stage], stage: Stage) -> list[str]:
    """ENTRYPOINT + CMD, as the container runtime puts them together."""
    chain = stage_chain(stages, stage)
    entrypoint = next((exec_form(e) for s in reversed(chain) if (e := s.last("ENTRYPOINT"))), [])
    cmd = next((exec_form(c) for s in reversed(chain) if (c := s.last("CMD"))), [])
    return entrypoint + cmd


def healthcheck_command(stages: list[Stage], stage: Stage) -> str:
    rest = next(h for s in reversed(stage_chain(stages, stage)) if (h := s.last("HEALTHCHECK")))
    options, _, command = rest.partition(" CMD ")
    assert command, f"HEALTHCHECK without CMD: {rest}"
    return command.strip()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching it or one
    of its parent folders decides, `!` re-includes; `*` stays within one path segment."""
    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        compiled = regex(os.path.normpath(raw.lstrip("!")).lstrip("/"))
        if any(compiled.match(c) for c in candidates):
            excluded = not negated
    return excluded


def ignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, against `env` (default: empty)."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", one, value)


def kubernetes_documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path, doc))
    return found


def deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _path, doc in kubernetes_documents() if doc["kind"] == "Deployment"}


def container(deployment: dict[str, Any], name: str = "consumer") -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def plain_env(entries: list[dict[str, Any]], secret_dsn: str = "postgresql://u@db/genesis") -> dict[str, str]:
    """A container's env as the pod would see it (secret references given a stand-in value)."""
    env = {}
    for entry in entries:
        env[entry["name"]] = entry["value"] if "value" in entry else secret_dsn
    return env


def settings_variables() -> set[str]:
    names = {f"GENESIS_{name.upper()}" for name in Settings.model_fields if name != "dsn"}
    return names | {"GENESIS_DATABASE_URL"}


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (with `commented`, also the `#KEY=VALUE` ones)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if commented and re.match(r"#[A-Z_]+=", line):
            line = line[1:]
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def seconds(value: str | int | float) -> float:
    """A compose duration ("45s", "1m30s") or a plain number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def capabilities_of_unit() -> set[str]:
    return {c.removeprefix("CAP_") for c in unit()["Service"]["CapabilityBoundingSet"].split()}


# --- Dockerfile ---------------------------------------------------------------------------------------


def test_the_default_image_ends_as_a_non_root_user_running_genesis_consume():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    final = stages[-1]
    assert final.name == "consumer"
    user = final.last("USER")
    assert user is not None, "the default target must say which user it runs as"
    uid, _, gid = user.partition(":")
    # numeric, so that Kubernetes' runAsNonRoot can check it without a passwd lookup
    assert uid.isdigit() and int(uid) != 0 and (not gid or (gid.isdigit() and int(gid) != 0)), user
    # nothing after USER switches back, and the entrypoint is the consumer
    kinds = [kw for kw, _ in final.instructions]
    assert "USER" not in kinds[kinds.index("USER") + 1:]
    argv = image_argv(stages, final)
    assert argv[:2] == ["/usr/bin/tini", "--"] and argv[2] == "genesis-consume", argv
    assert final.last("STOPSIGNAL") == "SIGTERM" or stage_named(stages, "base").last("STOPSIGNAL") == "SIGTERM"
    assert "/healthz" in healthcheck_command(stages, final)
    env = image_env(stages, final)
    assert env["GENESIS_METRICS_HOST"] == "0.0.0.0", "probes from outside the container must reach the port"
    assert env["GENESIS_METRICS_PORT"] in stage_named(stages, "base").last("EXPOSE").split()  # type: ignore[union-attr]
    assert "GENESIS_DATABASE_URL" not in env and "DATABASE_URL" not in env, "no DSN (nor password) baked in"
    assert set(env) - {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"} <= settings_variables()


def test_the_sandbox_image_runs_as_root_with_bubblewrap():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    sandbox = stage_named(stages, "sandbox")
    assert sandbox.base == "base" and sandbox.last("USER") in ("0", "0:0", "root")
    installs = " ".join(sandbox.all("RUN"))
    assert "bubblewrap" in installs and "python3-pytest" in installs
    assert image_argv(stages, sandbox) == image_argv(stages, stages[-1])


def test_the_image_pins_the_npm_tools_as_system_deps_does():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for a in stage_named(stages, "npm-tools").all("ARG") if "=" in a)
    script = (ROOT / "scripts" / "system-deps.sh").read_text()
    assert args["BIOME_VERSION"] == re.search(r'biome_version="([^"]+)"', script).group(1)  # type: ignore[union-attr]
    assert args["TYPESCRIPT_VERSION"] == re.search(r'typescript_version="([^"]+)"', script).group(1)  # type: ignore[union-attr]


def test_the_build_context_holds_what_the_image_copies_and_nothing_local():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    patterns = ignore_patterns()
    copied = []
    for stage in stages:
        for rest in stage.all("COPY"):
            if rest.startswith("--from="):
                continue
            copied += shlex.split(rest)[:-1]
    assert copied, "the wheel stage copies the sources"
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is copied but .dockerignore leaves it out"
    # what the wheel must hold (SQL and migrations ship inside the package) reaches the build
    for path in [*ROOT.glob("genesis_pgflow/sql/*.sql"), *ROOT.glob("genesis_pgflow/migrations/versions/*.py")]:
        assert not dockerignored(str(path.relative_to(ROOT)), patterns), path
    for local in (".venv/bin/python", ".git/HEAD", ".tools/node_modules/x", "build/lib/x.py",
                  "genesis_pgflow/__pycache__/cli.cpython-311.pyc", "tests/conftest.py"):
        assert dockerignored(local, patterns), local


def test_the_dockerignore_matcher_follows_docker():
    # the matcher above decides the previous test: check it on Docker's documented examples
    assert dockerignored("a/temp.txt", ["*/temp*"]) and not dockerignored("a/b/temp.txt", ["*/temp*"])
    assert dockerignored("a/b/temp.txt", ["**/temp*"]) and dockerignored("temp.txt", ["**/temp*"])
    assert not dockerignored("README.md", ["*.md", "!README*.md"])
    assert dockerignored("x/y.py", ["x"]) and not dockerignored("x/y.py", ["*", "!x"])


# --- compose.yaml --------------------------------------------------------------------------------------


def test_compose_passes_the_compose_specification_schema():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (test extra) carries the compose-spec schema")
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_runs_postgres_with_pgmq_a_migration_and_scalable_consumers():
    services = compose()["services"]
    postgres, migrate, consumer = services["postgres"], services["migrate"], services["consumer"]
    assert "pgmq" in postgres["image"] and ":" in postgres["image"], "a pgmq image, pinned"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    # migrate: the admin CLI through the image's init, once
    assert migrate["entrypoint"][-1] == "genesis" and migrate["command"] == ["db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    # consumers: --scale works only without a fixed name or a published port
    assert "container_name" not in consumer and "ports" not in consumer
    assert consumer["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert consumer["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert consumer["command"] == ["--no-migrate"]
    assert consumer["build"]["target"] == "consumer"
    env = {k: interpolate(str(v)) for k, v in consumer["environment"].items()}
    assert "@postgres:5432/" in env["GENESIS_DATABASE_URL"]
    Settings.from_env(env)      # every value is one the consumer accepts
    assert set(env) <= settings_variables()
    grace = float(env.get("GENESIS_SHUTDOWN_GRACE_S") or GRACE_DEFAULT)
    assert consumer["stop_signal"] == "SIGTERM" and seconds(consumer["stop_grace_period"]) > grace
    assert re.fullmatch(r"on-failure:\d+", consumer["restart"]), "exit 2 (configuration) must not loop forever"


def test_compose_healthchecks_probe_the_consumer_as_the_image_does():
    services = compose()["services"]
    stages = dockerfile_stages(DOCKERFILE.read_text())
    for name in ("consumer", "consumer-sandbox"):
        check = services[name]["healthcheck"]
        assert check["test"][0] == "CMD-SHELL"
        assert check["test"][1] == healthcheck_command(stages, stages[-1]), name
        assert seconds(check["interval"]) > 0 and check["retries"] >= 1


def test_compose_routes_untrusted_code_to_the_sandbox_consumers_only():
    services = compose()["services"]
    sandbox = services["consumer-sandbox"]
    assert sandbox["profiles"] == ["sandbox"], "opt-in: it needs a privileged container"
    assert sandbox["build"]["target"] == "sandbox" and sandbox["privileged"] is True
    env = {k: interpolate(str(v)) for k, v in sandbox["environment"].items()}
    assert set(env["GENESIS_QUEUES"].split(",")) == SANDBOX_QUEUES
    Settings.from_env(env)
    assert set(env) <= settings_variables()
    # the default consumers take CONSUMER_QUEUES when given (the other two queues), else all
    default_env = services["consumer"]["environment"]
    routed = interpolate(default_env["GENESIS_QUEUES"],
                         {"CONSUMER_QUEUES": "genesis_rule_updates,genesis_llm_config_updates"})
    assert set(routed.split(",")) == set(REQUEST_QUEUES) - SANDBOX_QUEUES
    assert interpolate(default_env["GENESIS_QUEUES"]) == ""
    assert Settings.from_env({"GENESIS_QUEUES": ""}).queues == REQUEST_QUEUES


# --- Kubernetes --------------------------------------------------------------------------------------------


def test_the_kubernetes_files_pass_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) carries the Kubernetes schemas")
    documents = kubernetes_documents()
    assert {doc["kind"] for _path, doc in documents} >= {"Deployment", "Secret"}
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for path, doc in documents:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name} ({doc['kind']}) against Kubernetes {version}: {exc}")


def test_the_kubernetes_files_have_what_any_resource_needs():
    # what the API server refuses before any schema: checked by hand, so that it holds without the extra
    for path, doc in kubernetes_documents():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    for name, deployment in deployments().items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        for c in spec["template"]["spec"]["containers"] + spec["template"]["spec"].get("initContainers", []):
            assert c["name"] and c["image"], name


@pytest.mark.parametrize("name", ["genesis-consumer", "genesis-consumer-sandbox"])
def test_the_deployments_probe_healthz_and_readyz_and_outwait_the_grace_period(name):
    deployment = deployments()[name]
    pod = deployment["spec"]["template"]["spec"]
    consumer = container(deployment)
    env = plain_env(consumer["env"])
    assert set(env) <= settings_variables()
    settings = Settings.from_env(env)
    ports = {p["name"]: p["containerPort"] for p in consumer["ports"]}
    assert ports["metrics"] == settings.metrics_port and settings.metrics_host == "0.0.0.0"
    probes = {kind: consumer[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == settings.metrics_port
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s
    assert consumer.get("args") == ["--no-migrate"]
    init = pod["initContainers"][0]
    assert init["command"][-3:] == ["genesis", "db", "upgrade"] and init["image"] == consumer["image"]


def test_the_default_deployment_is_non_root_and_leaves_untrusted_code_alone():
    deployment = deployments()["genesis-consumer"]
    pod = deployment["spec"]["template"]["spec"]
    consumer = container(deployment)
    stages = dockerfile_stages(DOCKERFILE.read_text())
    image_uid = int(stages[-1].last("USER").partition(":")[0])  # type: ignore[union-attr]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in [consumer, *pod["initContainers"]]:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True and not context.get("privileged")
        assert "add" not in context["capabilities"]
    # the read-only root leaves GENESIS_HOME and /tmp writable
    mounts = {m["mountPath"] for m in consumer["volumeMounts"]}
    assert {"/tmp", "/var/lib/genesis"} <= mounts
    queues = set(plain_env(consumer["env"])["GENESIS_QUEUES"].split(","))
    assert "genesis_experiment_requests" not in queues


def test_the_sandbox_deployment_grants_what_the_systemd_unit_grants():
    deployment = deployments()["genesis-consumer-sandbox"]
    consumer = container(deployment)
    context = consumer["securityContext"]
    assert context["runAsUser"] == 0
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) == capabilities_of_unit()
    assert context["appArmorProfile"]["type"] == "Unconfined"
    assert set(plain_env(consumer["env"])["GENESIS_QUEUES"].split(",")) == SANDBOX_QUEUES
    assert consumer["image"].endswith(":sandbox")


# --- systemd ---------------------------------------------------------------------------------------------


def test_the_unit_stops_gracefully_and_does_not_loop_on_configuration_errors():
    parsed = unit()
    service = parsed["Service"]
    assert service["ExecStart"].split()[0].endswith("/bin/genesis-consume")
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    env = env_file(UNIT_ENV, commented=True)
    assert set(env) <= settings_variables()
    settings = Settings.from_env(env)
    assert float(service["TimeoutStopSec"]) > settings.shutdown_grace_s
    # exit 2 is a configuration error: either it is never restarted, or the start limit stops the loop
    prevented = "2" in service.get("RestartPreventExitStatus", "").split()
    burst, interval = int(parsed["Unit"].get("StartLimitBurst", 0)), float(parsed["Unit"].get("StartLimitIntervalSec", 0))
    assert prevented or (burst > 0 and interval > burst * float(service["RestartSec"])), \
        "a consumer exiting 2 at once would be restarted forever"
    assert service["StateDirectory"] == "genesis" and service["StateDirectoryMode"] == "0755"
    assert "ProtectControlGroups" not in service and "MemoryDenyWriteExecute" not in service
    assert "user" not in service["RestrictNamespaces"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's console script
    text = UNIT.read_text().replace(f"{IMAGE_VENV_BIN}/genesis-consume", str(VENV_BIN / "genesis-consume"))
    assert text != UNIT.read_text()
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (run.stdout + run.stderr).splitlines()
                  if UNIT.name in line and ("ignoring" in line or "Unknown" in line or "Failed" in line)]
    assert run.returncode == 0 and not complaints, run.stdout + run.stderr


@pytest.mark.sandbox
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                    reason="the root sandbox's capabilities can only be measured as root with bubblewrap")
def test_the_sandbox_works_with_exactly_the_capabilities_granted():
    # What the unit's CapabilityBoundingSet (and the sandbox Deployment's capabilities) grant, with
    # no_new_privs as NoNewPrivileges= sets it: the sandbox's probe and a run pass; without
    # NET_ADMIN, one of them, the sandbox is unavailable (so the list is not merely generous).
    probe = ("from genesis_pgflow.sandbox import Sandbox\n"
             "s = Sandbox()\n"
             "s.check()\n"
             "r = s.run(['/usr/bin/python3', '-c', 'print(6 * 7)'], timeout_s=60)\n"
             "print('ran', r.returncode, r.stdout.strip())\n")

    def under(capabilities: set[str]) -> subprocess.CompletedProcess[str]:
        bounding = "-all," + ",".join(f"+{c.lower()}" for c in sorted(capabilities))
        return subprocess.run(["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all",
                               sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)

    granted = capabilities_of_unit()
    ok = under(granted)
    assert ok.returncode == 0 and ok.stdout.split() == ["ran", "0", "42"], ok.stdout + ok.stderr
    short = under(granted - {"NET_ADMIN"})
    assert short.returncode != 0 and "SandboxUnavailable" in short.stderr, short.stdout + short.stderr


# --- the image's entrypoint, as a plain process -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_plain_process(argv: list[str]) -> list[str]:
    """The image's argv on this machine: its init if installed here, else the command it runs."""
    if argv[0] == "/usr/bin/tini" and not os.access(argv[0], os.X_OK):
        argv = argv[argv.index("--") + 1:]
    return argv


def container_env(stages: list[Stage], stage: Stage, dsn: str, home: Path) -> dict[str, str]:
    """The image's ENV, with only what must differ on this machine replaced: the image's virtualenv
    is this checkout's, the database is the test's, GENESIS_HOME is a folder of the test's (the
    image's /var/lib/genesis is the machine's own here), and the metrics port is a free one (other
    tests run beside this one); nothing of this process's environment is passed on."""
    env = image_env(stages, stage)
    env["PATH"] = env["PATH"].replace(IMAGE_VENV_BIN, str(VENV_BIN))
    assert str(VENV_BIN) in env["PATH"]
    env.update(GENESIS_DATABASE_URL=dsn, GENESIS_HOME=str(home), HOME=str(home),
               GENESIS_METRICS_PORT=str(free_port()))
    # tini is not PID 1 here: as a subreaper it still reaps the orphans it is there for (and says
    # nothing about it on stderr)
    env["TINI_SUBREAPER"] = "1"
    return env


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.db
@pytest.mark.slow
def test_the_compose_flow_migrates_an_empty_database_and_the_image_consumer_drains_it(empty_db_dsn, genesis_home):
    stages = dockerfile_stages(DOCKERFILE.read_text())
    services = compose()["services"]
    env = container_env(stages, stages[-1], empty_db_dsn, genesis_home)

    migrate = as_plain_process(services["migrate"]["entrypoint"] + services["migrate"]["command"])
    run = subprocess.run(migrate, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr

    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send('genesis_rule_updates', %s::jsonb)", [json.dumps({
            "type": "genesis_rule_update", "namespace": "deploy", "rule_id": "no-eval", "version": 1,
            "confidence": 0.93, "rule": {"deny": "eval"}})])

    argv = as_plain_process(image_argv(stages, stages[-1]) + services["consumer"]["command"] + ["--drain"])
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), "GENESIS_LOG_FORMAT=json"

    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        archived = conn.execute("SELECT count(*) FROM pgmq.a_genesis_rule_updates").fetchone()
        results = conn.execute("SELECT message->>'status' FROM pgmq.q_genesis_rule_updates_results").fetchall()
    assert archived == (1,) and results == [("completed",)]


@pytest.mark.db
@pytest.mark.slow
def test_the_image_healthcheck_and_probes_pass_and_sigterm_ends_the_consumer_with_0(db_dsn, genesis_home):
    stages = dockerfile_stages(DOCKERFILE.read_text())
    env = container_env(stages, stages[-1], db_dsn, genesis_home)
    port = env["GENESIS_METRICS_PORT"]
    check = healthcheck_command(stages, stages[-1]).replace(f"{IMAGE_VENV_BIN}/python", sys.executable)
    argv = as_plain_process(image_argv(stages, stages[-1]))
    with open(genesis_home / "stderr", "w+") as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            def healthy() -> bool:
                assert proc.poll() is None, f"the consumer exited with {proc.returncode}"
                return subprocess.run(["/bin/sh", "-c", check], env=env, capture_output=True,
                                      timeout=30).returncode == 0

            wait_until(healthy, timeout=180, interval=0.5, what="the image's HEALTHCHECK to pass")
            # the Kubernetes probes, on the address the Deployment gives them
            assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
            wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, timeout=60,
                       what="/readyz to answer 200")
            proc.send_signal(signal.SIGTERM)    # what the runtime sends first (STOPSIGNAL)
            code = proc.wait(timeout=GRACE_DEFAULT + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        output = stderr.read()
    assert code == 0, output
    # stopped, the probes fail: the health check's failure is real, not a constant
    assert subprocess.run(["/bin/sh", "-c", check], env=env, capture_output=True, timeout=30).returncode != 0
