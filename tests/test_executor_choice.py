"""How `--executor auto` picks in-process or Ray, and the help text that states it."""

from __future__ import annotations

import pytest
from conftest import run_cli

from tagcli.config import RayConfig
from tagcli.pipeline import choose_executor

DEFAULT_LIMIT = RayConfig().max_local_rows


@pytest.mark.parametrize(
    ("requested", "rows", "address", "expected"),
    [
        ("auto", DEFAULT_LIMIT, "", "local"),
        ("auto", DEFAULT_LIMIT + 1, "", "ray"),
        ("auto", 10, "127.0.0.1:6379", "ray"),
        ("local", DEFAULT_LIMIT * 10, "", "local"),
        ("ray", 10, "", "ray"),
    ],
)
def test_choose_executor_cases(requested, rows, address, expected):
    assert choose_executor(requested, rows, address, DEFAULT_LIMIT) == expected


def test_tag_help_states_default_limit():
    result = run_cli("tag", "--help")

    assert result.exit_code == 0
    assert f"(default {DEFAULT_LIMIT})" in result.output
    assert "local  always in-process" in result.output
    assert "ray    always on Ray" in result.output
