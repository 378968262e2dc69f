"""Settings: every field is a flag and an environment variable, and documented."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from config_reference import PATH as REFERENCE
from config_reference import render as render_reference
from learners.config import LearnerConfig
from learners.errors import ConfigError
from stream.cli import main
from stream.config import LEARNER_SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


def test_every_setting_is_a_worker_flag_and_documented():
    help_text = CliRunner().invoke(main, ["worker", "--help"], terminal_width=200).output
    reference = REFERENCE.read_text()
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}`" in reference and f"`RECSTREAM_{name.upper()}`" in reference, name
    assert reference == render_reference(), "docs/configuration.md is stale: run python tests/config_reference.py"
    assert "docs/configuration.md" in README.read_text()


def test_invalid_flag_value_names_the_flag_and_variable():
    result = CliRunner().invoke(main, ["worker", "--bootstrap-servers", "nohost"])
    assert result.exit_code != 0
    assert "--bootstrap-servers / RECSTREAM_BOOTSTRAP_SERVERS" in result.output


def test_every_learner_default_is_defined_once_in_learner_config():
    """Settings derives its learner fields from LearnerConfig: each default, help text and bound is
    written once, so the worker, evaluate and bench cannot run different learners by default."""
    learner = {spec.name: spec for spec in dataclasses.fields(LearnerConfig)}
    shared = [name for name in Settings.model_fields if name in learner]
    assert sorted(shared) == sorted(LEARNER_SETTINGS)
    for name in shared:
        field = Settings.model_fields[name]
        assert field.default == learner[name].default, name
        assert field.description == learner[name].metadata["help"], name
    for cls in ast.walk(ast.parse((ROOT / "stream" / "config.py").read_text())):
        if isinstance(cls, ast.ClassDef):
            written = {node.target.id for node in cls.body if isinstance(node, ast.AnnAssign)}
            assert not written & set(learner), f"{cls.name} writes learner fields again: {written & set(learner)}"
    for spec in learner.values():
        assert spec.metadata.get("help"), f"LearnerConfig.{spec.name} has no help text"


def test_the_worker_and_evaluate_build_the_default_learner_config():
    from stream.learner_setup import learner_config

    settings = Settings()
    assert learner_config(settings) == LearnerConfig(model_path=settings.model_path())
    help_text = CliRunner().invoke(main, ["evaluate", "--help"], terminal_width=200).output
    for name in LEARNER_SETTINGS:
        default = Settings.model_fields[name].default
        assert f"--{name.replace('_', '-')}" in help_text and f"default {default!r}]" in help_text, name


def test_learner_settings_are_read_from_flags_and_variables(monkeypatch):
    from stream.learner_setup import learner_config

    monkeypatch.setenv("RECSTREAM_TEXT_BATCH", "7")
    monkeypatch.setenv("RECSTREAM_LORA_TARGETS", "q_proj, v_proj")
    config = learner_config(Settings(refresh_per_update=3))
    assert (config.text_batch, config.refresh_per_update, config.lora_targets) == (7, 3, ("q_proj", "v_proj"))
    with pytest.raises(ValueError):
        Settings(popularity_weight=1.0)  # LearnerConfig's bound, checked where settings are read


def test_help_answers_without_importing_torch():
    code = "import sys, stream.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_learners_never_import_stream():
    for path in (ROOT / "learners").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "stream" or n.startswith("stream.") for n in names), path
