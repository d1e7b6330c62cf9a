"""Real DICOM peers for tests and the benchmark: never mocks.

- ``ScriptedSCP``: a pynetdicom C-STORE SCP in this process whose answers a test
  scripts (statuses in order, association rejection, abort, slow replies, only
  some transfer syntaxes or SOP classes). It records every instance it stored.
- ``Storescp``: DCMTK's storescp as a subprocess writing into a folder.
- ``Orthanc``: the Debian Orthanc server with its own config on free ports.
- ``dcmsend``/``storescu``/``echoscu``: DCMTK's SCU tools as a modality would use
  them; ``Modality`` is dcmsend in the background with its per-instance report.

Every peer binds or talks to 127.0.0.1 only, on ports picked free, and stops
what it started. DCMTK and Orthanc keep Nagle on unless TCP_NODELAY=1 is in the
environment; ``peer_env()`` sets it, or each small C-STORE stalls ~90 ms.

No pytest here (the benchmark imports this module without it): a wait that runs
out raises ``WaitTimeout`` (an AssertionError, so a test reports it as a failure),
a peer binary that is not installed raises ``ToolMissing``, which the test suite
turns into a skip, or a failure in CI (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt, register_uid
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification

from tests.support.dicomgen import PRIVATE_SOP_CLASS, dataset_bytes, uid_of

# A scripted destination must store our private test class like any other storage class.
register_uid(PRIVATE_SOP_CLASS, "HermesTestPrivateStorage", StorageServiceClass)

LOOPBACK = "127.0.0.1"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class WaitTimeout(AssertionError):
    """A condition a test or the benchmark waited for did not come true in time."""


class ToolMissing(Exception):
    """A peer binary (DCMTK, Orthanc) is not installed."""


class PeerError(Exception):
    """A peer did not do what it was started for (dcmsend hung, ...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``cond`` until truthy and return its value; WaitTimeout naming ``what`` at
    the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 20.0) -> None:
    def up() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((LOOPBACK, port)) == 0
    wait_for(up, timeout, what=f"port {port} to listen")


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of a peer binary; ToolMissing where it is not installed (the suite skips the
    test, or fails it in CI, where a missing peer is a bug of the CI image)."""
    # The system's DCMTK/Orthanc first: an activated venv puts pynetdicom's own
    # storescp/storescu/echoscu (other options) earlier on PATH.
    system = [p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.path.exists(p)]
    path = system[0] if system else shutil.which(name)
    if path:
        return path
    raise ToolMissing(f"{name} not installed "
                      f"(apt-get install {'orthanc' if name == 'Orthanc' else 'dcmtk'})")


# ---------------------------------------------------------------- scripted pynetdicom SCP


@dataclass
class Received:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae: str
    data: bytes  # the encoded dataset as received (no file meta)


@dataclass
class Script:
    """What the scripted destination answers.

    ``statuses`` are used in order, one per C-STORE (then ``default_status``);
    ``reject`` = (result, source, reason) rejects every association (e.g. (1,1,7)
    permanent "called AE not recognised", (2,3,2) transient);
    ``abort_after`` aborts the association when that many stores arrived on it;
    ``abort_on`` aborts it whenever one of these SOP Instance UIDs arrives (a data set
    the peer chokes on);
    ``delay`` sleeps before answering; ``transfer_syntaxes``/``sop_classes`` limit
    what is accepted (None = everything).
    """

    statuses: list[int] = field(default_factory=list)
    default_status: int = 0x0000  # what is answered once ``statuses`` is used up
    reject: tuple[int, int, int] | None = None
    abort_after: int | None = None
    abort_on: frozenset[str] = frozenset()
    delay: float = 0.0
    transfer_syntaxes: Sequence[str] | None = None
    sop_classes: Sequence[str] | None = None


# What a Storage SCP answers when it HAS stored the instance (PS3.4 B.2.3): Success and
# the warnings (0x0001, 0x0107 Attribute List Error, 0x0116 Attribute Value Out of
# Range, 0xB000-0xBFFF coercion and the like). Everything else is a failure, the
# 0x01xx/0x02xx ones included (0x0110 Processing Failure, 0x0210 Duplicate
# Invocation, 0x0213 Resource Limitation ... are below 0xA000 but failures all the
# same): the instance was not stored, so it is not in ``received``.
# Written out here rather than taken from hermes_py.outcomes: the peer must not
# share a bug with the router it judges.
STORED_STATUSES = frozenset({0x0000, 0x0001, 0x0107, 0x0116})


def stored(status: int) -> bool:
    """Whether an SCP answering ``status`` has the instance."""
    return status in STORED_STATUSES or 0xB000 <= status <= 0xBFFF


def _received_bytes(event: evt.Event) -> bytes:
    """The encoded dataset, whichever receive mode pynetdicom is in.

    An in-process hermes Receiver switches pynetdicom to chunked receive for the
    whole process; then the request's DataSet is empty and the data is in a file.
    """
    data = event.request.DataSet.getvalue()
    if data:
        return bytes(data)
    try:
        path = event.dataset_path
    except Exception:
        return b""
    return dataset_bytes(path)


class ScriptedSCP:
    """A pynetdicom Storage SCP on 127.0.0.1 whose behaviour the test scripts.

    ``answers`` is every status it answered, in order; ``received`` only the
    instances it stored (see ``stored``).
    """

    def __init__(self, ae_title: str = "DEST", port: int | None = None,
                 script: Script | None = None):
        self.ae_title = ae_title
        self.port = port or free_port()
        self.script = script or Script()
        self.received: list[Received] = []
        self.answers: list[int] = []
        self.associations = 0
        self._lock = threading.Lock()
        self._server: Any = None
        self._per_assoc: dict[int, int] = {}

    # what a test reads
    @property
    def uids(self) -> set[str]:
        with self._lock:
            return {r.sop_instance_uid for r in self.received}

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 262144
        ae.maximum_associations = 20
        ts = list(self.script.transfer_syntaxes or ALL_TRANSFER_SYNTAXES)
        if self.script.sop_classes is not None:
            for uid in self.script.sop_classes:
                ae.add_supported_context(uid, ts)
        else:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ts)
            ae.add_supported_context(PRIVATE_SOP_CLASS, ts)
        ae.add_supported_context(Verification)
        return ae

    def _on_requested(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
        if self.script.reject:
            event.assoc.acse.send_reject(*self.script.reject)
            # As pynetdicom's own rejection does (acse.negotiate_association): wait for the
            # DUL to send the RJ before the server closes the socket, or the requestor
            # usually sees a bare abort instead of the rejection.
            event.assoc.kill()

    def _on_store(self, event: evt.Event) -> int:
        if self.script.delay:
            time.sleep(self.script.delay)
        key = id(event.assoc)
        with self._lock:
            n = self._per_assoc[key] = self._per_assoc.get(key, 0) + 1
            if self.script.abort_after is not None and n > self.script.abort_after \
                    or str(event.request.AffectedSOPInstanceUID) in self.script.abort_on:
                abort = True
            else:
                abort = False
                status = (self.script.statuses.pop(0) if self.script.statuses
                          else self.script.default_status)
        if abort:
            event.assoc.abort()
            return 0xA700
        if stored(status):
            req = event.request
            with self._lock:
                self.received.append(Received(
                    sop_instance_uid=str(req.AffectedSOPInstanceUID),
                    sop_class_uid=str(req.AffectedSOPClassUID),
                    transfer_syntax=str(event.context.transfer_syntax),
                    calling_ae=event.assoc.requestor.ae_title,
                    data=_received_bytes(event),
                ))
        with self._lock:
            self.answers.append(status)
        return status

    def start(self) -> ScriptedSCP:
        ae = self._build_ae()
        self._server = ae.start_server(
            (LOOPBACK, self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                          (evt.EVT_REQUESTED, self._on_requested)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> ScriptedSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- DCMTK


class Storescp:
    """DCMTK storescp writing every received instance to ``folder``.

    By default it accepts every transfer syntax it knows (+xa) and unknown SOP
    classes (-pm); pass ``extra=()`` for storescp's own uncompressed-only default.

    storescp listens on every interface; tests only ever send it loopback traffic.
    """

    def __init__(self, folder: Path, ae_title: str = "STORESCP", port: int | None = None,
                 extra: Sequence[str] = ("+xa", "-pm")):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Storescp:
        exe = require_tool("storescp")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--aetitle", self.ae_title, "--output-directory", str(self.folder),
             "--max-pdu", "131072", *self.extra, str(self.port)],
            env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def files(self) -> list[Path]:
        return [p for p in self.folder.rglob("*") if p.is_file()]

    def uids(self) -> set[str]:
        out = set()
        for p in self.files():
            with contextlib.suppress(Exception):
                out.add(str(dcmread(p, stop_before_pixels=True,
                                    specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
        return out

    def __enter__(self) -> Storescp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dcmsend(port: int, files: Iterable[Path], called: str = "HERMES", calling: str = "MODALITY",
            timeout: float = 300.0, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Send files as a modality would, with DCMTK dcmsend.

    dcmsend proposes each file's own transfer syntax (compressed included) plus the
    uncompressed ones, never decompresses (-dn), accepts private SOP classes
    (-nuc) and opens further associations past 128 contexts (+ma).
    """
    exe = require_tool("dcmsend")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, "-dn", "-nuc", "+ma", "-nh", "+crf",
         "/dev/stdout", *extra, LOOPBACK, str(port), *[str(f) for f in files]],
        env=peer_env(), capture_output=True, text=True, timeout=timeout)


def storescu(port: int, files: Iterable[Path], called: str = "HERMES", calling: str = "MODALITY",
             timeout: float = 300.0, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Send uncompressed/lossless files with DCMTK storescu on one association."""
    exe = require_tool("storescu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, "-nh", *extra, LOOPBACK, str(port),
         *[str(f) for f in files]],
        env=peer_env(), capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, called: str = "HERMES", calling: str = "ECHOSCU",
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    return subprocess.run([exe, "-aet", calling, "-aec", called, LOOPBACK, str(port)],
                          env=peer_env(), capture_output=True, text=True, timeout=timeout)


_SENT_OK = re.compile(r"^0x(0000|b[0-9a-f]{3})$", re.I)


@dataclass
class SendResult:
    """What dcmsend was answered, per SOP Instance UID (its +crf report)."""

    returncode: int
    statuses: dict[str, str]  # uid -> "0x0000" / "0xa700" / "<not sent>" ...
    stdout: str
    stderr: str

    @property
    def acked(self) -> set[str]:
        """Instances the modality was answered Success (or Warning) for: now the router's."""
        return {u for u, s in self.statuses.items() if _SENT_OK.match(s)}

    def with_status(self, status: int) -> set[str]:
        want = f"0x{status:04x}"
        return {u for u, s in self.statuses.items() if s.lower() == want}

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for s in self.statuses.values():
            counts[s] = counts.get(s, 0) + 1
        return (f"dcmsend rc={self.returncode} statuses={counts} "
                f"stderr={self.stderr.strip()[-800:]!r}")


def parse_dcmsend_report(text: str) -> dict[str, str]:
    """``SOP Instance : uid`` ... ``DIMSE Status : 0x0000 (Success)`` blocks -> {uid: status}.

    An instance listed twice (it cannot be with one dcmsend run, but be safe) keeps its
    best answer, so a Success is never hidden by a later line.
    """
    out: dict[str, str] = {}
    uid: str | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        value = value.strip()
        if key == "SOP Instance":
            uid = value
        elif key == "DIMSE Status" and uid is not None:
            status = value.split(" ", 1)[0] if value.startswith("0x") else value
            if not (uid in out and _SENT_OK.match(out[uid])):
                out[uid] = status
            uid = None
    return out


class Modality:
    """DCMTK dcmsend as a modality, in the background: proposes each file's own syntax.

    Same options as ``dcmsend``, but asynchronous (a scenario kills the router while
    the modality is sending) and with the per-instance report in a file of its own.
    """

    def __init__(self, port: int, files: Sequence[Path], report: Path, calling: str = "MODALITY",
                 called: str = "HERMES"):
        exe = require_tool("dcmsend")
        self.files = list(files)
        self.report = report
        self.uids = {p: uid_of(p) for p in self.files}
        args = [exe, "-aet", calling, "-aec", called, "-dn", "-nuc", "+ma", "-nh",
                "-to", "10", "-ta", "30", "-td", "60", "+crf", str(report),
                LOOPBACK, str(port)]
        if self.files:  # what this run sent, beside its report (for whoever debugs it)
            report.with_suffix(".files").write_text("".join(f"{p}\n" for p in self.files))
        self.proc = subprocess.Popen(
            [*args, *[str(f) for f in self.files]], env=peer_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 300.0) -> SendResult:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise PeerError(f"dcmsend did not finish within {timeout:g}s: {err[-800:]}") \
                from None
        try:
            text = self.report.read_text()
        except FileNotFoundError:
            text = ""  # never connected: nothing was answered
        statuses = parse_dcmsend_report(text)
        for uid in self.uids.values():
            statuses.setdefault(uid, "<no answer>")
        return SendResult(self.proc.returncode, statuses, text, err)


# ---------------------------------------------------------------- Orthanc


class Orthanc:
    """The Debian Orthanc as a real PACS, on free ports, with its own storage folder.

    ``lua`` is an optional script body (the benchmark uses the canonical
    autorouting one-liner); ``modalities`` maps names to (AET, host, port).
    ``dicomweb`` loads the DICOMweb plugin (Debian ``orthanc-dicomweb``): STOW-RS at
    ``dicomweb_url``; ``users`` turns on HTTP basic auth with these user: password pairs;
    ``extra`` adds or replaces configuration keys (DICOM TLS, modality objects).
    """

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 lua: str | None = None, dicomweb: bool = False,
                 users: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        self.extra = extra or {}
        self.dicomweb = dicomweb
        self.users = users or {}
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.lua = lua
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        exe = require_tool("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": "hermes-test", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "StorageCompression": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [], "HttpServerEnabled": True, "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": True, "ConcurrentJobs": 2,
            "StableAge": 1, "SaveJobs": False,
        }
        if self.dicomweb:
            plugin = Path(DICOMWEB_PLUGIN)
            if not plugin.exists():
                raise ToolMissing(f"{plugin} not installed (apt-get install orthanc-dicomweb)")
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.users:
            cfg["AuthenticationEnabled"] = True
            cfg["RegisteredUsers"] = dict(self.users)
        if self.lua:
            (self.workdir / "route.lua").write_text(self.lua)
            cfg["LuaScripts"] = [str(self.workdir / "route.lua")]
        cfg.update(self.extra)
        (self.workdir / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        self.proc = subprocess.Popen([exe, str(self.workdir / "orthanc.json")], env=peer_env(),
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "orthanc.log", "wb"))  # noqa: SIM115
        wait_port(self.dicom_port, 60)
        wait_port(self.http_port, 60)
        return self

    @property
    def dicomweb_url(self) -> str:
        """The STOW-RS base (instances are POSTed to ``{dicomweb_url}/studies``)."""
        return f"http://{LOOPBACK}:{self.http_port}/dicom-web"

    def api(self, path: str) -> Any:
        import base64
        import urllib.request
        req = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}")
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def instance_count(self) -> int:
        return int(self.api("/statistics")["CountInstances"])

    def sop_uids(self) -> set[str]:
        out = set()
        for iid in self.api("/instances"):
            tags = self.api(f"/instances/{iid}/simplified-tags")
            out.add(tags["SOPInstanceUID"])
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pixel_bytes(ds: Dataset) -> bytes:
    return bytes(ds.PixelData) if "PixelData" in ds else b""


def loops_per_second(assoc: Any, seconds: float = 0.5) -> float:
    """How often ``assoc``'s DUL thread and reactor look for work, per second, while idle."""
    counted = [0]
    for obj, name in ((assoc.dul, "_is_transport_event"), (assoc.dimse, "get_msg")):
        original = getattr(obj, name)

        def counting(*a: Any, _original: Any = original, **k: Any) -> Any:
            counted[0] += 1
            return _original(*a, **k)

        setattr(obj, name, counting)
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:  # a measuring window, not a wait for a condition
        time.sleep(end - time.monotonic())
    return counted[0] / (time.monotonic() - t0)
