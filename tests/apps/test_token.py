"""`cogenesis token`: tokens made on the command line verify with the cluster key; clear errors otherwise."""

import pytest

from cogenesis.apps.cli import main
from cogenesis.apps.commands.token import parse_ttl
from cogenesis.core.auth import verify
from cogenesis.core.errors import AuthError, ConfigError
from cogenesis.core.secrets import SecretsDir


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    """No `cogenesis up` cluster (an empty COGENESIS_HOME) and no $COGENESIS_SECRETS_DIR."""
    monkeypatch.setenv("COGENESIS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COGENESIS_SECRETS_DIR", raising=False)
    return tmp_path


def test_create_prints_only_a_token_that_verifies(no_cluster, capsys):
    secrets = no_cluster / "secrets"
    assert main(["token", "secret", "--secrets-dir", str(secrets)]) == 0
    capsys.readouterr()
    assert main(["token", "create", "--device", "phone-1", "--ttl", "2h", "--secrets-dir", str(secrets)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert out.out == token + "\n" and token.startswith("cgt1.")
    claims = verify(SecretsDir(secrets).cluster_key(), token)
    assert (claims.sub, claims.role, claims.exp - claims.iat) == ("phone-1", "device", 7200)
    assert token not in out.err


def test_the_secrets_dir_comes_from_the_environment_and_rotation_invalidates_tokens(no_cluster, capsys, monkeypatch):
    secrets = SecretsDir.create(no_cluster / "s")
    monkeypatch.setenv("COGENESIS_SECRETS_DIR", str(secrets.path))
    assert main(["token", "create", "--device", "ops", "--role", "admin", "--ttl", "1d"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify(secrets.cluster_key(), token).role == "admin"
    old_admin = secrets.token("admin")
    assert main(["token", "secret", "--rotate"]) == 0
    assert "every token signed with the old key is now invalid" in capsys.readouterr().out
    for stale in (token, old_admin):
        with pytest.raises(AuthError, match="signature is invalid"):
            verify(secrets.cluster_key(), stale)
    assert verify(secrets.cluster_key(), secrets.token("admin")).role == "admin"  # re-made with the new key


@pytest.mark.parametrize("text, seconds", [("30", 30), ("45s", 45), ("90m", 5400), ("24h", 86400), ("1.5d", 129600)])
def test_ttl_units(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0h", "-1h", "5y", "h", "1 2h"])
def test_a_bad_ttl_is_a_clear_error(text, no_cluster, capsys):
    with pytest.raises(ConfigError, match="invalid --ttl"):
        parse_ttl(text)
    SecretsDir.create(no_cluster / "s")
    assert main(["token", "create", "--device", "d", f"--ttl={text}", "--secrets-dir", str(no_cluster / "s")]) == 2
    assert "invalid --ttl" in capsys.readouterr().err


def test_no_secrets_dir_is_a_clear_error(no_cluster, capsys):
    assert main(["token", "create", "--device", "d"]) == 2
    err = capsys.readouterr().err
    assert "no secrets directory" in err and "--secrets-dir" in err
    assert main(["token", "create", "--device", "d", "--secrets-dir", str(no_cluster / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_explains_roles_and_the_secrets_dir(capsys):
    with pytest.raises(SystemExit):
        main(["token", "create", "--help"])
    out = capsys.readouterr().out
    assert "--ttl" in out and "worker" in out and "COGENESIS_SECRETS_DIR" in out
