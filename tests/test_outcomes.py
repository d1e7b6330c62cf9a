"""The outcome table: every code the issue names lands in the class it promises."""

from __future__ import annotations

import pytest

from hermes_py.outcomes import (
    LinkKind,
    Outcome,
    classify_reject,
    classify_status,
    escalate,
    from_status,
    status_text,
)


@pytest.mark.parametrize("code", [0x0000, 0xB000, 0xB006, 0xB007])
def test_success_and_warnings_are_delivered(code: int) -> None:
    assert classify_status(code) is Outcome.SUCCESS


@pytest.mark.parametrize("code", [0xA700, 0xA701, 0xA7FF, 0x0213, 0x0110])
def test_transient_codes(code: int) -> None:
    assert classify_status(code) is Outcome.TRANSIENT


@pytest.mark.parametrize("code", [0xA900, 0xA9FF, 0xC000, 0xC0FF, 0xCFFF, 0x0122, 0x0124,
                                  0x0117, 0x0211, 0x0212])
def test_permanent_codes(code: int) -> None:
    assert classify_status(code) is Outcome.PERMANENT


def test_unknown_failure_is_permanent_so_an_admin_sees_it() -> None:
    assert classify_status(0x0999) is Outcome.PERMANENT


def test_per_destination_override_wins() -> None:
    overrides = {0xC001: "transient", 0xA700: "permanent", 0x0111: "permanent"}
    assert classify_status(0xC001, overrides) is Outcome.TRANSIENT
    assert classify_status(0xA700, overrides) is Outcome.PERMANENT
    assert classify_status(0x0111, overrides) is Outcome.PERMANENT
    assert classify_status(0xC002, overrides) is Outcome.PERMANENT  # only the listed code


def test_warning_is_kept_as_text() -> None:
    r = from_status(0xB007, error_comment="tag coerced", delivered_as="1.2.840.10008.1.2.1")
    assert r.outcome is Outcome.SUCCESS
    assert r.delivered_as == "1.2.840.10008.1.2.1"
    assert r.warnings and r.warnings[0].startswith("0xB007 ") and "tag coerced" in r.warnings[0]
    assert from_status(0x0000).warnings == []


def test_failure_result_names_code_and_meaning() -> None:
    r = from_status(0xA700)
    assert r.outcome is Outcome.TRANSIENT and r.status_hex == "0xA700"
    assert "Out of Resources" in r.reason and r.delivered_as is None
    assert status_text(0xA9FE).startswith("0xA9FE Error")
    assert status_text(0xC123) == "0xC123 Error: Cannot Understand"


def test_processing_failure_is_retried_a_few_times_then_permanent() -> None:
    assert escalate(Outcome.TRANSIENT, 0x0110, 0) is Outcome.TRANSIENT
    assert escalate(Outcome.TRANSIENT, 0x0110, 1) is Outcome.TRANSIENT
    assert escalate(Outcome.TRANSIENT, 0x0110, 2) is Outcome.PERMANENT
    # 0xA700 is never capped: only give_up_after ends it
    assert escalate(Outcome.TRANSIENT, 0xA700, 1000) is Outcome.TRANSIENT


def test_reject_permanent_is_misconfiguration_not_failure() -> None:
    f = classify_reject(1, 1, 7)
    assert f.kind is LinkKind.REJECTED_PERMANENT and f.misconfigured
    assert "called AE title not recognised" in f.detail
    t = classify_reject(2, 3, 2)
    assert t.kind is LinkKind.REJECTED_TRANSIENT and not t.misconfigured
    assert "local limit exceeded" in t.detail
