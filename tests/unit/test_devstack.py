"""`make run`'s .env (scripts/devstack.py): it holds a card key, so only its owner reads it."""

from __future__ import annotations

import os
import stat

import pytest

from scripts import devstack


@pytest.fixture
def env_file(tmp_path, monkeypatch):
    path = tmp_path / ".env"
    monkeypatch.setattr(devstack, "ENV_FILE", path)
    for name in ("GATEWAY_ENV", "GATEWAY_API_KEYS", "CARD_ENCRYPTION_KEY"):
        monkeypatch.delenv(name, raising=False)
    return path


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_env_file_is_the_owners_alone_whatever_the_umask(env_file):
    old = os.umask(0)
    try:
        settings = devstack.dev_environment()
    finally:
        os.umask(old)
    assert mode(env_file) == 0o600
    assert settings["GATEWAY_ENV"] == "development" and len(settings["CARD_ENCRYPTION_KEY"]) == 44


def test_an_env_file_others_can_read_is_made_the_owners_alone(env_file):
    env_file.write_text("GATEWAY_ENV=development\nCARD_ENCRYPTION_KEY=kept\n")
    env_file.chmod(0o644)
    assert devstack.dev_environment()["CARD_ENCRYPTION_KEY"] == "kept"
    assert mode(env_file) == 0o600
