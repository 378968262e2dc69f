"""Settings: every field is a flag and an environment variable, and documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from learners.errors import ConfigError
from stream.cli import main
from stream.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_environment_variables_fill_settings(monkeypatch):
    monkeypatch.setenv("RECSTREAM_GROUP_ID", "g-env")
    monkeypatch.setenv("RECSTREAM_METRICS_PORT", "0")
    settings = Settings(bootstrap_servers="a:1,b:2")
    assert settings.group_id == "g-env" and settings.metrics_port == 0
    kwargs = settings.consumer_kwargs()
    assert kwargs["bootstrap_servers"] == ["a:1", "b:2"]
    assert kwargs["enable_auto_commit"] is False and kwargs["group_id"] == "g-env"
    assert settings.producer_kwargs()["acks"] == "all"


def test_bad_bootstrap_is_refused_and_missing_one_says_what_to_do():
    with pytest.raises(ValueError):
        Settings(bootstrap_servers="no-port")
    with pytest.raises(ConfigError, match="--bootstrap-servers"):
        Settings().consumer_kwargs()


def test_every_setting_is_a_worker_flag_and_in_the_readme():
    help_text = CliRunner().invoke(main, ["worker", "--help"], terminal_width=200).output
    readme = README.read_text()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}`" in readme and f"`RECSTREAM_{name.upper()}`" in readme, name


def test_invalid_flag_value_names_the_flag_and_variable():
    result = CliRunner().invoke(main, ["worker", "--bootstrap-servers", "nohost"])
    assert result.exit_code != 0
    assert "--bootstrap-servers / RECSTREAM_BOOTSTRAP_SERVERS" in result.output
