"""Presentation contexts per association, and converting what the peer won't take as is.

An instance is best sent exactly as stored (streamed from the file, never
decoded), so every association proposes each batch instance's own transfer
syntax. The uncompressed fallbacks are proposed as a *separate* context per SOP
class, because an acceptor answers each context on its own and picks one syntax
per context: mixing [JPEG, Explicit, Implicit] in one context would let it pick
Implicit and force a decompression that was never needed.

Per batch (DCMTK's ``DcmStorageSCU::addPresentationContexts`` algorithm, made
deterministic): for each (SOP class, stored syntax) one context ``[that syntax]``;
for each SOP class one context ``[Explicit LE, Implicit LE]``. The stored syntax
gets its own context even when it is Explicit or Implicit LE, because acceptors
choose within a context by *their* preference (pynetdicom's and DCMTK's do), so
an Explicit LE file offered only as [Explicit, Implicit] may be answered
"Implicit" and then has to be decoded and re-encoded for nothing.
A peer may be offered at most 128 contexts; we stop at ``MAX_CONTEXTS`` and the
instances that would need more go on the next association.

When only the fallback was accepted: Explicit <-> Implicit is re-encoded and a
deflated file inflated, file to file (``transcode``: bounded memory whatever the
size, a cap on the inflated size), and the temp file streamed like a stored one;
JPEG / JPEG-LS / JPEG 2000 / RLE are decompressed with pydicom (the pylibjpeg
plugins are the ``codecs`` extra), keeping the SOP Instance UID. Anything else
cannot be converted: that is a permanent failure for that instance at that
destination, naming the syntax.

A deflated file sent as stored must have an even-length deflate stream (PS3.5
A.5; PS3.8 Annex E wants even PDVs and DCMTK aborts on an odd one); one that
does not is sent from a padded copy.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import PresentationContext, build_context

from hermes_py.destinations import transcode
from hermes_py.destinations.base import SYSTEM_TEMP, Workspace
from hermes_py.spool.tempfiles import scratch_file

# 128 is the hard limit (context IDs 1..255, odd); keep a margin for peers that
# count differently.
MAX_CONTEXTS = 100

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# PS3.8 9.3.3.2 result/reason of a rejected context (pynetdicom PresentationContext.result).
_CX_REJECT = {1: "rejected by the user", 2: "rejected (no reason)",
              3: "abstract syntax (SOP class) not supported",
              4: "transfer syntaxes not supported"}

T = TypeVar("T")


def ts_name(uid: str) -> str:
    """``"JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)"``: both, for people and grep."""
    u = UID(uid)
    return f"{u.name} ({uid})" if u.name != uid else uid


def sop_name(uid: str) -> str:
    u = UID(uid)
    return f"{u.name} ({uid})" if u.name != uid else uid


def context_keys(sop_class: str, ts: str) -> list[tuple[str, str]]:
    """The contexts one instance needs: its own syntax, and the uncompressed fallback."""
    return [(sop_class, ts), (sop_class, "")]  # "" = the [Explicit LE, Implicit LE] fallback


def plan(items: Sequence[T], key: Callable[[T], tuple[str, str]],
         max_contexts: int = MAX_CONTEXTS) -> list[tuple[list[T], list[PresentationContext]]]:
    """Split ``items`` (in order) into associations whose contexts fit ``max_contexts``.

    ``key(item)`` gives (SOP class UID, transfer syntax UID). Order is kept
    within an association, so a batch sorted by study and series is sent so.
    Contexts are ordered per SOP class: own-syntax contexts first, then the
    fallback, which is also the order pynetdicom picks from when converting.
    """
    groups: list[tuple[list[T], dict[tuple[str, str], None]]] = []
    cur_items: list[T] = []
    cur_keys: dict[tuple[str, str], None] = {}
    for it in items:
        need = [k for k in context_keys(*key(it)) if k not in cur_keys]
        if cur_items and len(cur_keys) + len(need) > max_contexts:
            groups.append((cur_items, cur_keys))
            cur_items, cur_keys = [], {}
            need = context_keys(*key(it))
        cur_items.append(it)
        for k in need:
            cur_keys[k] = None
    if cur_items:
        groups.append((cur_items, cur_keys))
    return [(g_items, _contexts(list(g_keys))) for g_items, g_keys in groups]


def _contexts(keys: list[tuple[str, str]]) -> list[PresentationContext]:
    # Group by SOP class so a class's own-syntax contexts precede its fallback.
    by_class: dict[str, list[str]] = {}
    for sop, ts in keys:
        by_class.setdefault(sop, [])
        if ts:
            by_class[sop].append(ts)
    out: list[PresentationContext] = []
    for sop, own in by_class.items():
        for ts in own:
            out.append(build_context(sop, [ts]))
        out.append(build_context(sop, list(UNCOMPRESSED)))
    return out


# ---------------------------------------------------------------- choosing a context


class Mode(enum.Enum):
    AS_STORED = "as stored"          # stream the file's bytes after the meta
    REENCODE = "re-encode"           # uncompressed LE <-> uncompressed LE via a Dataset
    DECOMPRESS = "decompress"        # decode pixel data, then send as Explicit/Implicit LE


@dataclass
class Choice:
    mode: Mode
    context: PresentationContext

    @property
    def transfer_syntax(self) -> str:
        return str(self.context.transfer_syntax[0])


class Unsendable(Exception):
    """This instance can never be sent to this destination as things are configured."""


def choose(accepted: Sequence[PresentationContext], rejected: Sequence[PresentationContext],
           sop_class: str, ts: str) -> Choice:
    """How to send (sop_class, ts) over an association, or raise Unsendable with why.

    Mirrors pynetdicom's ``_get_valid_context`` (exact syntax first, else the
    first accepted uncompressed context of the same endianness) so that
    ``delivered_as`` tells the truth about what went on the wire, and adds the
    decompression step pynetdicom does not do.
    """
    stored = UID(ts)
    mine = [cx for cx in accepted if cx.abstract_syntax == sop_class and cx.as_scu is not False]
    for cx in mine:
        if cx.transfer_syntax[0] == stored:
            return Choice(Mode.AS_STORED, cx)
    plain = [cx for cx in mine if not UID(cx.transfer_syntax[0]).is_compressed
             and UID(cx.transfer_syntax[0]).is_little_endian]
    if not mine:
        whys = [_CX_REJECT.get(int(cx.result or 0), "rejected") for cx in rejected
                if cx.abstract_syntax == sop_class]
        raise Unsendable(f"destination does not accept SOP class {sop_name(sop_class)}"
                         + (f": {whys[0]}" if whys else ""))
    if plain and not stored.is_compressed and stored.is_little_endian:
        return Choice(Mode.REENCODE, plain[0])
    if plain and stored.is_compressed and decodable(stored):
        return Choice(Mode.DECOMPRESS, plain[0])
    offered = ", ".join(ts_name(str(cx.transfer_syntax[0])) for cx in mine)
    if stored.is_compressed:
        why = "no decoder for it is installed (pydicom pixel decoders, hermes-py[codecs])" \
            if _known_compressed(stored) else "it cannot be decompressed"
    else:
        why = "big endian cannot be converted"
    raise Unsendable(f"destination accepts {sop_name(sop_class)} only as {offered}; stored "
                     f"transfer syntax {ts_name(ts)} cannot be sent as is and {why}")


def _known_compressed(ts: UID) -> bool:
    try:
        from pydicom.pixels.decoders.base import get_decoder
        get_decoder(ts)
    except (NotImplementedError, ValueError):
        return False
    return True


def decodable(ts: str) -> bool:
    """Whether pydicom has a working pixel decoder for ``ts`` here (plugins installed)."""
    from pydicom.pixels.decoders.base import get_decoder
    try:
        return bool(get_decoder(UID(ts)).is_available)
    except (NotImplementedError, ValueError):
        return False


@contextlib.contextmanager
def prepare(path: Path, choice: Choice, workspace: Workspace = SYSTEM_TEMP
            ) -> Iterator[Path | Dataset]:
    """What to hand to ``send_c_store``: a path to stream, or (decompression) a Dataset.

    A context manager because a conversion writes a temp file, removed on exit.
    The path is the stored file itself when it can go as is. Raises Unsendable
    when the file cannot be converted (the message names the transfer syntax and
    what failed), transcode.TempSpaceError when the temp file does not fit.
    """
    with contextlib.ExitStack() as stack:
        if choice.mode is Mode.AS_STORED:   # choice's syntax is the stored one
            if choice.transfer_syntax == DeflatedExplicitVRLittleEndian \
                    and transcode.dataset_length(path)[1] % 2:
                padded = stack.enter_context(scratch_file(workspace.scratch))
                transcode.pad_to_even(path, padded)
                yield padded
            else:
                yield path
            return
        if choice.mode is Mode.REENCODE:
            out = stack.enter_context(scratch_file(workspace.scratch))
            if _stored_syntax(path) != DeflatedExplicitVRLittleEndian:
                _refusing(transcode.reencode_to_file, path, out, choice.transfer_syntax)
            elif choice.transfer_syntax == ExplicitVRLittleEndian:
                _refusing(transcode.inflate_to_file, path, out, workspace.max_inflated)
            else:   # the inflated copy goes as soon as the re-encoded one is written
                with scratch_file(workspace.scratch) as inflated:
                    _refusing(transcode.inflate_to_file, path, inflated, workspace.max_inflated)
                    _refusing(transcode.reencode_to_file, inflated, out, choice.transfer_syntax)
            yield out
            return
        yield convert(dcmread(path, force=True), choice)


@contextlib.contextmanager
def rewrite(path: Path, transfer_syntax: str, workspace: Workspace = SYSTEM_TEMP) -> Iterator[Path]:
    """A temp Part-10 copy of ``path`` (any LE uncompressed file, even without a meta)
    in ``transfer_syntax`` with a fresh file meta: the fallback for a file pynetdicom
    cannot stream as is (no preamble, meta missing UIDs, meta disagreeing)."""
    with scratch_file(workspace.scratch) as out:
        _refusing(transcode.reencode_to_file, path, out, transfer_syntax)
        yield out


def _stored_syntax(path: Path) -> str:
    try:
        meta, _ = transcode.read_meta(path)
    except Exception:  # no preamble / meta: the caller's fallback handles it
        return ""
    return str(meta.get("TransferSyntaxUID", "") or "")


def _refusing(fn: Callable[..., object], *args: object) -> None:
    """Run a transcode step; its refusals become Unsendable, naming the step."""
    try:
        fn(*args)
    except transcode.ConversionRefused as e:
        step = "inflate" if fn is transcode.inflate_to_file else "re-encode"
        raise Unsendable(f"cannot {step} for this destination: {e}") from e


def convert(ds: Dataset, choice: Choice) -> Dataset:
    """Make ``ds`` sendable on ``choice``'s context (pynetdicom re-encodes LE <-> LE itself)."""
    if choice.mode is Mode.DECOMPRESS:
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        try:
            # generate_instance_uid=False: the default would give the destination a
            # different instance than the one the modality sent.
            ds.decompress(generate_instance_uid=False)
        except Exception as e:  # any decoder error makes this instance unsendable here
            raise Unsendable(f"cannot decompress {ts_name(ts)} for a destination that "
                             f"accepts only uncompressed: {type(e).__name__}: {e}") from e
    return ds
