"""Parameters that reach a path are validated: no traversal through domains, dates or names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finpipe.errors import ConfigError
from finpipe.settings import Settings, redact_uri
from finpipe.storage import Storage, file_sha256
from finpipe.tracking import load_model_version

TRAVERSALS = ["../etc", "../../tmp/x", "/etc/passwd", "market/../../x", "..", "market\\..\\x"]


@pytest.mark.parametrize("domain", TRAVERSALS)
def test_domain_parameters_cannot_escape_the_root(tmp_path, domain):
    storage = Storage(tmp_path)
    with pytest.raises(ConfigError, match="invalid domain"):
        storage.partition_dir("features", domain, "2024-01-02")
    with pytest.raises(ConfigError):
        load_model_version(Settings(home=tmp_path), domain)


@pytest.mark.parametrize("day", ["../../etc", "/etc/passwd", "2024-01-02/../../x", "2024-1-2x"])
def test_date_parameters_cannot_escape_the_root(tmp_path, day):
    with pytest.raises(ConfigError, match="expected YYYY-MM-DD"):
        Storage(tmp_path).partition_dir("predictions", "market", day)


@pytest.mark.parametrize("batch", ["../x", "/abs", "b1/../../y"])
def test_batch_ids_cannot_escape_quarantine(tmp_path, batch):
    source = tmp_path / "f.csv"
    source.write_text("x\n")
    with pytest.raises(ConfigError, match="invalid batch id"):
        Storage(tmp_path / "root").quarantine_batch("market", batch, source, {})


def test_file_names_are_sanitised_inside_landing_and_quarantine(tmp_path):
    source = tmp_path / "..evil name;rm -rf.csv"
    source.write_text("date,ticker,close\n")
    storage = Storage(tmp_path / "root")
    key = storage.land_file("market", source, file_sha256(source))
    landed = storage.local_path(key)
    assert landed.parent == storage.landing_dir("market")
    assert landed.name.endswith("__evil_name_rm_-rf.csv")
    folder = storage.local_path(
        storage.quarantine_batch("market", "b1", key, {}, file_name="../../../outside.csv")
    )
    assert sorted(p.name for p in folder.iterdir()) == ["_.._.._outside.csv", "report.json"]
    assert not (tmp_path / "outside.csv").exists()


def test_cli_rejects_traversal_in_domain_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "finpipe.cli", "run", "nightly", "--domain", "../../tmp"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"FINPIPE_HOME": str(tmp_path / "home"), "PATH": ""},
    )
    assert result.returncode == 2
    assert "unknown domain '../../tmp'" in result.stderr
    assert not (tmp_path / "home" / "features").exists()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:pa55@mlflow.internal:5000", "http://***@mlflow.internal:5000"),
        ("https://tok@host/path?token=abc&x=1", "https://***@host/path?token=***&x=1"),
        ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
    ],
)
def test_uris_are_masked_before_they_are_shown(uri, shown):
    assert redact_uri(uri) == shown


@pytest.mark.parametrize(
    "url",
    [
        "host=127.0.0.1 user=finpipe password=pgSECRET42 dbname=locks",  # libpq key=value
        "postgresql://finpipe:p@sSECRET42@127.0.0.1:5432/locks",  # an unencoded @
        "mysql://finpipe:pgSECRET42@127.0.0.1/locks",
    ],
)
def test_a_lock_database_setting_whose_password_could_leak_is_refused_without_it(url, monkeypatch):
    """The key=value form once put its password into every busy-lock message and the run's
    state; an unencoded @ into a resolver error ("failed to resolve host 'sSECRET42@...'")."""
    from finpipe.settings import load_settings

    monkeypatch.setenv("FINPIPE_LOCKS_URL", url)
    with pytest.raises(ConfigError, match="FINPIPE_LOCKS_URL='\\*\\*\\*': should be a post") as e:
        load_settings()
    assert "SECRET42" not in str(e.value)
    for good in (
        "postgresql://finpipe:p%40sSECRET42@127.0.0.1:5432/locks",
        "postgres://finpipe@db.internal/locks?sslmode=require",
        "postgresql:///locks?host=/var/run/postgresql",  # a Unix socket
        "postgresql://u:p@db1:5432,db2:5432/locks?target_session_attrs=read-write",
        "postgresql://u:p@[::1]:5432/locks",
    ):
        monkeypatch.setenv("FINPIPE_LOCKS_URL", good)
        assert load_settings().locks_url.get_secret_value() == good


def test_lock_messages_name_the_database_never_its_password():
    from finpipe.pg_locks import redact, where

    url = "postgresql://finpipe:pgSECRET42@db.internal:5433/locks"
    assert where(url) == "db.internal:5433/locks"
    assert where("host=db user=x password=pgSECRET42") == "the lock database"
    leaked = "connection failed: password=pgSECRET42 for finpipe:pgSECRET42@db.internal"
    assert "SECRET42" not in redact(url, leaked)
    assert where("postgres://finpipe@db.internal/locks") == "db.internal:5432/locks"
    # A percent-encoded password is masked as written and as the server saw it.
    encoded = "postgresql://finpipe:p%40sSECRET42@db.internal/locks"
    assert "SECRET42" not in redact(encoded, "for p%40sSECRET42 and p@sSECRET42")
