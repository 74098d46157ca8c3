"""A running hub picks up an edited policy file, and a broken edit is loud."""

from __future__ import annotations

import os

import pytest

from gpuspawner.policy import PolicyError, PolicyFile


def test_edits_are_picked_up_and_errors_raise(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("defaults: {max_gpu_equivalents: 1}\n")
    source = PolicyFile(path)
    assert source.current().for_user("ann").limits.max_gpu_equivalents == 1
    assert source.current() is source.current()  # unchanged: not re-parsed
    path.write_text("defaults: {max_gpu_equivalents: 2}\n")
    os.utime(path, (1, 1))
    assert source.current().for_user("ann").limits.max_gpu_equivalents == 2
    path.write_text("defaults: {max_gpus: 2}\n")
    os.utime(path, (2, 2))
    with pytest.raises(PolicyError, match="line 1"):
        source.current()
    assert PolicyFile(None).current().for_user("x").limits.max_gpu_equivalents == 1.0


@pytest.mark.parametrize(
    ("text", "line", "opened"),
    [
        # An unclosed [ on line 3 breaks on line 4: both are named.
        ("defaults:\n  max_gpu_equivalents: 1\n  allowed_profiles: [cpu, small\n"
         "  priority: 3\n", 4, "(the [ opened on line 3 is not closed)"),
        ("defaults: {priority: 1\n\ngroups: {}\n", 3, "(the { opened on line 1 is not closed)"),
        ('defaults:\n  gpu_hold_after_stop: "1h\n  priority: 2\n', 4,
         "(the quote opened on line 2 is not closed)"),
    ],
)
def test_a_syntax_error_names_where_the_construct_was_opened(tmp_path, text, line, opened):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        PolicyFile(path).current()
    assert info.value.line == line
    assert str(info.value).startswith(f"{path} line {line}: YAML syntax error: ")
    assert opened in str(info.value)


def test_a_syntax_error_on_one_line_names_only_that_line(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("defaults:\n  priority: 1: 2\n")
    with pytest.raises(PolicyError) as info:
        PolicyFile(path).current()
    assert info.value.line == 2 and "opened on line" not in str(info.value)
    assert "check the indentation and quoting here" in str(info.value)
