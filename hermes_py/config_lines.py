"""Where in rules.toml a key was written: tomllib keeps no positions, so we find the line.

Every configuration error names ``file:line: key``; this is the part that finds
the line, by matching table headers and ``key =`` lines in the text. It is a
best effort: a key it cannot place is reported with its table's line.
"""

from __future__ import annotations

import re


class Locator:
    """Finds the line of a key in the TOML text; tomllib keeps no positions."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def _header_line(self, table: tuple[str | int, ...]) -> int | None:
        if not table:
            return 0
        if table[0] == "rules" and len(table) >= 2 and isinstance(table[1], int):
            seen = -1
            for i, raw in enumerate(self.lines):
                if re.match(r"^\s*\[\[\s*rules\s*\]\]", raw):
                    seen += 1
                    if seen == table[1]:
                        return i
            return None
        pat = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(
            r'"?' + re.escape(str(t)) + r'"?' for t in table) + r"\s*\]")
        for i, raw in enumerate(self.lines):
            if pat.match(raw):
                return i
        return None  # a dotted key inside a parent table, e.g. destinations = { ... }

    def line(self, table: tuple[str | int, ...], key: str | None = None) -> int | None:
        start = self._header_line(table)
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
        inline_re = re.compile(r'[{,]\s*"?' + re.escape(key) + r'"?\s*=')
        if not table:
            # A top-level key is either written before the first table or is a table.
            head_re = re.compile(r'^\s*\[\[?\s*"?' + re.escape(key) + r'"?\s*[\].]')
            in_root = True
            for i, raw in enumerate(self.lines):
                if re.match(r"^\s*\[", raw):
                    in_root = False
                    if head_re.match(raw):
                        return i + 1
                elif in_root and key_re.match(raw):
                    return i + 1
            return None
        for i in range(start + 1, len(self.lines)):
            raw = self.lines[i]
            if re.match(r"^\s*\[", raw):
                break
            if key_re.match(raw) or inline_re.search(raw):
                return i + 1
        return start + 1

    def rule_line(self, index: int, section: str, key: str | None = None) -> int | None:
        """Line of ``section`` (``match``/``exclude``) of rule ``index``, or of one of its keys.

        Handles both spellings: ``match = { Modality = "CT" }`` on the rule's
        own lines, and a ``[rules.match]`` sub-table below the ``[[rules]]``.
        """
        start = self._header_line(("rules", index))
        if start is None:
            return None
        q = r'\s*"?'
        sec = re.escape(section)
        inline_re = re.compile(rf'^{q}{sec}"?\s*=')
        dotted_re = re.compile(rf'^{q}{sec}"?\s*\.{q}{re.escape(key or "")}"?\s*=')
        sub_re = re.compile(rf'^\s*\[{q}rules"?\s*\.{q}{sec}"?\s*\]')
        key_re = re.compile(rf'^{q}{re.escape(key or "")}"?\s*=')
        in_sub = False
        sub_line: int | None = None
        for i in range(start + 1, len(self.lines)):
            raw = self.lines[i]
            if re.match(r"^\s*\[", raw):
                if re.match(r"^\s*\[\[", raw) or not re.match(r'^\s*\[\s*"?rules"?\s*\.', raw):
                    break  # the next rule or another table: this rule ends here
                in_sub = bool(sub_re.match(raw))
                if in_sub:
                    sub_line = i + 1
                continue
            if in_sub:
                if key is None or key_re.match(raw):
                    return i + 1 if key else sub_line
            elif inline_re.match(raw) or (key and dotted_re.match(raw)):
                return i + 1
        return sub_line or start + 1
