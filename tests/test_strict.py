"""The skip rules of conftest.py: a test the machine cannot run skips, or fails in CI."""

from __future__ import annotations

import pytest

from . import conftest


class FakeItem:
    """Just enough of a pytest item for the skip rules: its markers."""

    def __init__(self, *markers: pytest.MarkDecorator) -> None:
        self.markers = [decorator.mark for decorator in markers]

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return next(self.iter_markers(name), None)

    def iter_markers(self, name: str):  # type: ignore[no-untyped-def]
        return (mark for mark in self.markers if mark.name == name)


NOT_HERE = FakeItem(pytest.mark.needs("no-such-tool-on-any-path"))


def test_a_test_this_machine_cannot_run_skips_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "STRICT", False)
    with pytest.raises(pytest.skip.Exception, match="needs no-such-tool-on-any-path"):
        conftest.pytest_runtest_setup(NOT_HERE)  # type: ignore[arg-type]


def test_strict_mode_turns_that_skip_into_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="UDPTUNNEL_STRICT_TESTS=1 but this test"):
        conftest.pytest_runtest_setup(NOT_HERE)  # type: ignore[arg-type]


def test_a_test_the_machine_can_run_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "STRICT", True)
    conftest.pytest_runtest_setup(FakeItem(pytest.mark.needs("sh")))  # type: ignore[arg-type]


def test_a_test_that_finds_out_as_it_runs_follows_the_same_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "STRICT", False)
    with pytest.raises(pytest.skip.Exception, match=r"^needs root, for this$"):
        conftest.unable("needs root, for this")
    monkeypatch.setattr(conftest, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="but this test needs root, for this"):
        conftest.unable("needs root, for this")
