"""``hermes-py rules check`` and ``rules test FILE...``: what rules.toml says, and does to files.

``rules test`` evaluates the files exactly as the router would (the same header
read, the same receive facts from a spool sidecar beside the file, the same
``rules.evaluate``), so its answer is the router's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hermes_py import destinations, dicomfile, rules
from hermes_py.admin import Result, alerts
from hermes_py.config import Settings
from hermes_py.destinations.dicom import DicomSettings
from hermes_py.spool import JSON, Spool, carried


@dataclass
class Checked(Result):
    config: str
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)


def check(cfg: Settings) -> Checked:
    """The file validated (cli.main loaded it); say what it does."""
    r = cfg.receiver
    out = [f"{cfg.path}: OK", f"receiver: {r.ae_title} on {r.bind}:{r.port}",
           f"spool: {cfg.spool.path}", f"destinations ({len(cfg.destinations)}):"]
    width = max((len(n) for n in cfg.destinations), default=0)
    out += [f"  {name:<{width}}  {destinations.describe(d)}"
            for name, d in cfg.destinations.items()]
    out.append(f"rules ({len(cfg.rules)}):")
    out += [f"  {i}. {rule.name}: {rules.describe_rule(rule)}"
            for i, rule in enumerate(cfg.rules, 1)]
    out += alerts.describe(cfg)
    used = {d for rule in cfg.rules for d in rule.to}
    out += [f"note: no rule sends to destination {name!r}"
            for name in cfg.destinations if name not in used]
    allowed = r.allowed_calling_aets
    out += [f"warning: destination {name!r} has storage_commitment = "
            f"\"{getattr(d, 'storage_commitment', 'off')}\" but [receiver] "
            f"allowed_calling_aets does not include its AE title {d.ae_title!r}: the receiver "
            "will refuse the association carrying its commitment report"
            for name, d in cfg.destinations.items()
            if allowed and getattr(d, "storage_commitment", "off") != "off"
            and isinstance(d, DicomSettings) and d.ae_title not in allowed]
    if not any(rule.action == "route" for rule in cfg.rules):
        out.append("note: no routing rule: every instance will go to discard/")
    return Checked(str(cfg.path), out)


def _facts_for_file(path: Path) -> tuple[dict[str, str | None], str]:
    """Receive facts from the spool sidecar beside (or carried by) the file, else those of a
    dropped file."""
    sidecar = path.with_suffix(JSON)
    if path.suffix.lower() == ".dcm":
        beside = sidecar.is_file()
        data = Spool.read_json(sidecar) if beside else carried.carried(path)
        if data.get("source") or data.get("sop_instance_uid"):
            facts = rules.receive_facts(data)
            shown = ", ".join(f"{k}={v}" for k, v in facts.items() if v is not None)
            where = sidecar.name if beside else f"the sidecar {path.name} carries"
            return facts, f"receive facts from {where}: {shown or 'none'}"
    return ({"CallingAE": None, "CalledAE": None, "PeerAddress": None, "Source": "drop"},
            "no sidecar: tested as a dropped file: Source=drop, no AE titles or address")


@dataclass
class Tested(Result):
    """The dry-run report: per file, which rules matched and what the router would do."""

    lines: list[str] = field(default_factory=list)
    failures: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def text(self) -> str:
        return "\n".join(self.lines)


def dry_run(cfg: Settings, paths: Sequence[Path]) -> Tested:
    """What the router would do with each file, and why; exit 1 when some were unreadable."""
    keywords = rules.keywords_for(cfg.rules)
    out = Tested()
    with dicomfile.lenient():
        for path in paths:
            try:
                values = dicomfile.read_header(path, keywords)
            except dicomfile.UnreadableError as e:
                out.lines.append(f"{path}:\n  => error: {e} (the router would move it to error/)")
                out.failures += 1
                continue
            except OSError as e:
                out.lines.append(f"{path}:\n  => cannot read: {e.strerror or e}")
                out.failures += 1
                continue
            facts, note = _facts_for_file(Path(path))
            decision = rules.evaluate(cfg.rules, {**values, **facts})
            out.lines.append(f"{path}: sop={values.get('SOPInstanceUID')}  ({note})")
            out.lines += rules.explain(decision)
    return out
