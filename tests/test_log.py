"""Log lines a person (and grep) can trust: one line per event, whatever the wire sent."""

from __future__ import annotations

import logging

from hermes_py import log
from hermes_py.events import Occurrence
from hermes_py.lifecycle import Event


def _line(occ: Occurrence) -> str:
    record = logging.LogRecord(occ.logger, occ.level, __file__, 1, occ.text(), None, None)
    return log.TextFormatter("dispatch:fast").format(record)


def test_a_uid_with_a_newline_cannot_forge_a_second_line() -> None:
    forged = "1.2.3\n2026-12-01 19:00:00 INFO    dispatch:fast hermes_py.dispatcher: sent sop=9"
    line = _line(Occurrence(Event.RECEIVED, forged, fields={"from": "CT1\r@10.0.0.5"}))
    assert "\n" not in line and "\r" not in line
    assert "sop=1.2.3\\n2026-12-01" in line and "CT1\\r@10.0.0.5" in line


def test_a_nul_cannot_make_the_log_binary() -> None:
    line = _line(Occurrence(Event.REFUSED, "1.2.3\x00/../y", fields={"reason": "bad\x1b[31m"}))
    assert "\x00" not in line and "\x1b" not in line
    assert "1.2.3\\x00/../y" in line


def test_serve_re_emits_a_childs_record_escaped_too() -> None:
    from hermes_py.supervisor import Supervisor
    text = Supervisor._text("receive", {"time": "2026-12-01T19:00:00.000Z", "level": "info",
                                        "logger": "hermes_py.receiver",
                                        "message": "received sop=1.2\nFAKE"})
    assert text.count("\n") == 0 and "sop=1.2\\nFAKE" in text
