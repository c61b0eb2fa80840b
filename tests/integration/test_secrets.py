"""Secrets at rest on a real PostgreSQL: an LLM configuration's api_key sent with plain SQL and
consumed by App's consumer is found in no pgmq table (queues, archives, dead letters) and no
genesis table, yet reads back through the API, also after a dead letter's requeue; key rotation,
the key file, and a wrong key's error."""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg.rows import dict_row

from genesis_pgflow.app import App
from genesis_pgflow.cipher import SEALED_PREFIX, SecretCipher, SecretKeyError
from genesis_pgflow.cli import admin_main
from genesis_pgflow.messages import redact
from genesis_pgflow.settings import Settings
from genesis_pgflow.store import schema
from genesis_pgflow.store.database import Database
from genesis_pgflow.store.state import LlmConfig, PgStateStore

pytestmark = pytest.mark.db

LLM = "genesis_llm_config_updates"
LLM_DLQ = "genesis_llm_config_updates_dlq"


def query(dsn: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def send(dsn: str, body: Any, headers: Any = None) -> int:
    return query(dsn, "SELECT pgmq.send(%s, %s::jsonb, %s::jsonb) AS id",
                 (LLM, json.dumps(body), json.dumps(headers) if headers else None))[0]["id"]


def tables_holding(dsn: str, needle: str) -> list[str]:
    """Every table of the pgmq and genesis schemas whose rows, as text, contain needle."""
    found = []
    for row in query(dsn, "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('pgmq', 'genesis')"):
        table = f'{row["schemaname"]}."{row["tablename"]}"'
        if query(dsn, f"SELECT count(*) AS n FROM {table} AS t WHERE t::text LIKE %s", (f"%{needle}%",))[0]["n"]:
            found.append(table)
    return sorted(found)


def llm_update(secret: str, complexity: str = "complex") -> dict[str, Any]:
    return {"type": "genesis_llm_config_update", "provider": "claude", "complexity": complexity, "models": ["opus"],
            "settings": {"api_key": secret, "temperature": 0.2, "headers": {"Authorization": f"Bearer {secret}"}},
            "note": {"password": secret}}


def consume(dsn: str, home: Path, key: str) -> None:
    app = App.open(Settings(dsn=dsn, home=home, secret_key=key, queues=(LLM,), drain=True, poll_interval_ms=50))
    try:
        app.consumer().run()
    finally:
        app.close()


def test_no_secret_stays_in_any_table(db_dsn: str, genesis_home: Path) -> None:
    key = Fernet.generate_key().decode()
    secret = "sk-live-" + uuid.uuid4().hex
    send(db_dsn, llm_update(secret), headers={"authorization": secret, "correlation_id": "c-1"})
    send(db_dsn, llm_update(secret, complexity="galactic"))          # invalid: fails, archived all the same
    dead = send(db_dsn, llm_update(secret, complexity="simple"))    # read too often: dead-lettered
    query(db_dsn, f"UPDATE pgmq.q_{LLM} SET read_ct = 3 WHERE msg_id = %s", (dead,))
    consume(db_dsn, genesis_home, key)

    assert len(query(db_dsn, f"SELECT 1 FROM pgmq.a_{LLM}")) == 3
    assert tables_holding(db_dsn, secret) == []
    [letter] = query(db_dsn, f"SELECT message FROM pgmq.q_{LLM_DLQ}")
    assert letter["message"]["settings"]["api_key"].startswith(SEALED_PREFIX)
    assert letter["message"]["note"]["password"].startswith(SEALED_PREFIX)
    assert letter["message"]["complexity"] == "simple" and letter["message"]["settings"]["temperature"] == 0.2
    stored = query(db_dsn, "SELECT settings FROM genesis.llm_config_versions")[0]["settings"]
    assert stored["temperature"] == 0.2 and stored["api_key"].startswith(SEALED_PREFIX)
    assert stored["headers"]["Authorization"].startswith(SEALED_PREFIX)
    archived = query(db_dsn, f"SELECT message, headers FROM pgmq.a_{LLM} ORDER BY msg_id")[0]
    assert archived["message"]["settings"]["api_key"] == "[redacted]" and archived["message"]["models"] == ["opus"]
    assert archived["headers"] == {"authorization": "[redacted]", "correlation_id": "c-1"}

    # requeued and consumed: the store opens the sealed secrets; the archived dead letter is scrubbed
    with Database(db_dsn) as db:
        db.open()
        from genesis_pgflow.store.admin import PgAdminStore
        assert len(PgAdminStore(db).requeue_dead_letters(LLM)) == 1
    consume(db_dsn, genesis_home, key)
    assert tables_holding(db_dsn, secret) == []
    assert query(db_dsn, "SELECT count(*) AS n FROM genesis.llm_config_versions")[0]["n"] == 2

    # readable only through the API, with the key
    with Database(db_dsn) as db:
        db.open()
        configs = PgStateStore(db, SecretCipher(key)).llm_configs("claude")
    assert {c["complexity"]: c["settings"]["api_key"] for c in configs} == {"complex": secret, "simple": secret}
    assert configs[0]["settings"]["headers"] == {"Authorization": f"Bearer {secret}"}


def test_the_cli_shows_secrets_redacted_and_a_wrong_key_is_one_clear_line(
        db_dsn: str, genesis_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    key, other = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    secret = "sk-cli-" + uuid.uuid4().hex
    with Database(db_dsn) as db:
        db.open()
        PgStateStore(db, SecretCipher(key)).apply_llm_config(
            LlmConfig("claude", "simple", ["haiku"], [], {"api_key": secret}), str(uuid.uuid4()))
    monkeypatch.setenv("GENESIS_HOME", str(genesis_home))
    monkeypatch.setenv("GENESIS_SECRET_KEY", key)
    assert admin_main(["--dsn", db_dsn, "llm-config", "show", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)[0]["settings"] == {"api_key": "[redacted]"} and secret not in out.out + out.err

    monkeypatch.setenv("GENESIS_SECRET_KEY", other)
    assert admin_main(["--dsn", db_dsn, "llm-config", "show"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1, out.err
    assert "cannot be decrypted with the configured key" in out.err and "Traceback" not in out.err
    assert secret not in out.err and key not in out.err and other not in out.err

    monkeypatch.setenv("GENESIS_SECRET_KEY", "not-a-key," + key)
    assert admin_main(["--dsn", db_dsn, "llm-config", "show"]) == 2
    err = capsys.readouterr().err
    assert "GENESIS_SECRET_KEY: key 1 is not a Fernet key" in err and "not-a-key" not in err


def test_rotation_with_two_keys_and_plain_rows_from_before(db_dsn: str, genesis_home: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    secret, legacy = "sk-old-" + uuid.uuid4().hex, "sk-plain-" + uuid.uuid4().hex
    with Database(db_dsn) as db:
        db.open()
        PgStateStore(db, SecretCipher(old)).apply_llm_config(
            LlmConfig("openai", "medium", ["gpt"], [], {"api_key": secret}), str(uuid.uuid4()))
    # a row stored in plain text before secrets were sealed
    query(db_dsn, """INSERT INTO genesis.llm_config_versions (provider, complexity, version, models, settings)
                     VALUES ('gemini', 'simple', 1, '["flash"]', %s::jsonb)""", (json.dumps({"token": legacy}),))
    assert tables_holding(db_dsn, legacy) == ['genesis."llm_config_versions"']
    # a dead letter sealed with the old key
    letter = SecretCipher(old).seal_dead_letter(LLM, llm_update(secret, complexity="simple"))
    query(db_dsn, "SELECT pgmq.send(%s, %s::jsonb)", (LLM_DLQ, json.dumps(letter)))

    monkeypatch.setenv("GENESIS_HOME", str(genesis_home))
    monkeypatch.setenv("GENESIS_SECRET_KEY", f"{new},{old}")
    assert admin_main(["--dsn", db_dsn, "secrets", "rotate"]) == 0
    assert "the secrets of 2 stored LLM configuration(s) and 1 dead letter(s)" in capsys.readouterr().out
    assert tables_holding(db_dsn, legacy) == []
    [resealed] = query(db_dsn, f"SELECT message FROM pgmq.q_{LLM_DLQ}")
    assert SecretCipher(new).open_secrets(resealed["message"]) == llm_update(secret, complexity="simple")
    with pytest.raises(SecretKeyError):
        SecretCipher(old).open_secrets(resealed["message"])

    with Database(db_dsn) as db:
        db.open()
        only_new = {c["provider"]: c["settings"] for c in PgStateStore(db, SecretCipher(new)).llm_configs()}
        assert only_new == {"openai": {"api_key": secret}, "gemini": {"token": legacy}}
        with pytest.raises(SecretKeyError) as caught:
            PgStateStore(db, SecretCipher(old)).llm_configs()
    assert secret not in str(caught.value) and caught.value.__cause__ is None and caught.value.__suppress_context__


def test_without_a_configured_key_one_is_made_in_the_home_and_kept(genesis_home: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    home = genesis_home / "fresh"
    cipher = Settings(home=home).secret_cipher()
    assert not (home / "secret.key").exists(), "made on first use, not before"
    with caplog.at_level(logging.WARNING, logger="genesis_pgflow.cipher"):
        sealed = cipher.seal({"k": 1})
    key_file = home / "secret.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert str(key_file) in caplog.text and key_file.read_text().strip() not in caplog.text
    assert Settings(home=home).secret_cipher().open(sealed) == {"k": 1}, "the next process reads the same key"
    other_host = Settings(home=genesis_home / "other-host").secret_cipher()
    with pytest.raises(SecretKeyError, match="another host's key file.*same GENESIS_SECRET_KEY"):
        other_host.open(sealed)
    configured = Fernet.generate_key().decode()
    assert "hidden" in repr(cipher) and configured not in repr(Settings(home=home, secret_key=configured))
    with pytest.raises(SecretKeyError, match="GENESIS_SECRET_KEY: key 2 is not a Fernet key") as caught:
        Settings(home=home, secret_key=f"{configured},short")
    assert "short" not in str(caught.value) and configured not in str(caught.value)


def test_the_sql_redaction_agrees_with_messages_redact(db_dsn: str) -> None:
    bodies = [
        {"api_key": "a", "API-KEY": "b", "apikey": "c", "my_token": "d", "Secret": {"x": 1}, "password": [1],
         "passwd": "e", "credentials": "f", "Authorization": "g", "keys": "stay", "tokenizer": "h",
         "nested": [{"access_token": "i", "plain": "j"}, [{"client_secret": "k"}]], "n": 1, "s": "api_key"},
        [{"password": "x"}, 1, "token", None],
        "api_key",
        {},
    ]
    for body in bodies:
        got = query(db_dsn, "SELECT genesis.redact(%s::jsonb) AS r", (json.dumps(body),))[0]["r"]
        assert got == redact(body), body


def test_a_body_of_any_depth_is_archived(db_dsn: str) -> None:
    deep = "[" * 5000 + "]" * 5000
    msg_id = query(db_dsn, "SELECT pgmq.send(%s, %s::jsonb) AS id", (LLM, '{"settings": {"x": ' + deep + "}}"))[0]["id"]
    assert query(db_dsn, "SELECT pgmq.archive(%s, %s::bigint) AS ok", (LLM, msg_id))[0]["ok"]
    assert query(db_dsn, f"SELECT message FROM pgmq.a_{LLM}")[0]["message"]["settings"]["x"][0]


def test_a_recreated_queue_gets_its_archive_scrubbed_again_by_db_upgrade(db_dsn: str) -> None:
    """A DBA drops the LLM queue; until `genesis db upgrade` the new archive has no scrub trigger
    (the migration ran once) and the database reads as behind; the upgrade puts the trigger back
    and scrubs what was archived meanwhile."""
    secret = "sk-live-" + uuid.uuid4().hex
    query(db_dsn, "SELECT pgmq.drop_queue(%s)", (LLM,))
    query(db_dsn, "SELECT pgmq.create(%s)", (LLM,))
    before = send(db_dsn, llm_update(secret))
    query(db_dsn, "SELECT pgmq.archive(%s, %s::bigint)", (LLM, before))
    assert tables_holding(db_dsn, secret) == [f'pgmq."a_{LLM}"']
    assert any("scrub" in problem for problem in schema.problems(db_dsn))

    assert admin_main(["db", "upgrade", "--dsn", db_dsn]) == 0
    assert tables_holding(db_dsn, secret) == []
    after = send(db_dsn, llm_update(secret))
    query(db_dsn, "SELECT pgmq.archive(%s, %s::bigint)", (LLM, after))
    assert tables_holding(db_dsn, secret) == []
    assert schema.problems(db_dsn) == []
