"""The command group: version, help, exit codes and config errors."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_cli, write_config

from tagcli import __version__


def test_version_option():
    result = run_cli("--version")
    assert result.exit_code == 0
    assert __version__ in result.output


def test_python_dash_m_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "tagcli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert __version__ in completed.stdout


def test_help_lists_commands_and_exit_codes():
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in ("train", "tag", "eval"):
        assert command in result.output
    assert "Exit codes" in result.output


def test_unknown_config_key_is_usage_error(tmp_path):
    config = write_config(tmp_path, train={"sed": 3})
    result = run_cli("eval", config=config)
    assert result.exit_code == 2
    assert str(config) in result.output
    assert "'sed'" in result.output
    assert "seed" in result.output


def test_config_value_of_wrong_type(tmp_path):
    config = write_config(tmp_path, train={"seed": "seven"})
    result = run_cli("eval", config=config)
    assert result.exit_code == 2
    assert "train.seed must be an integer" in result.output


def test_fallback_outside_approved_tags(tmp_path):
    config = write_config(tmp_path, tags={"approved": ["a", "b"], "fallback": "other"})
    result = run_cli("eval", config=config)
    assert result.exit_code == 2
    assert "fallback 'other' is not in approved" in result.output


def test_missing_config_file(tmp_path):
    result = run_cli("--config", tmp_path / "nope.toml", "eval")
    assert result.exit_code == 2
    assert "nope.toml" in result.output


def test_eval_without_any_model(tmp_path):
    config = write_config(tmp_path, paths={"models_dir": "models"})
    result = run_cli("eval", config=config)
    assert result.exit_code == 3
    assert "No trained model found" in result.output
    assert f"[paths] models_dir from {config}" in result.output
    assert "tagcli train" in result.output


def test_missing_model_folder(tmp_path):
    config = write_config(tmp_path)
    source = tmp_path / "in.csv"
    source.write_text("id,title,description\n1,a,b\n")

    result = run_cli(
        "tag", source, "-o", tmp_path / "out.csv", "--model", tmp_path / "nope",
        config=config,
    )

    assert result.exit_code == 3
    assert "model folder not found" in result.output
    assert "manifest.json" not in result.output


def test_range_error_names_file_key_value(tmp_path):
    config = write_config(tmp_path, ray={"batch_size": -5})
    result = run_cli("eval", config=config)
    assert result.exit_code == 2
    assert str(config) in result.output
    assert "[ray] batch_size must be a positive integer, got -5" in result.output
