"""A sidecar carried by the instance file itself, in an extended attribute, until a stage
writes the .json beside it.

Why: publishing into incoming/ must make the data and the receive facts durable
before the rename, and the rename durable before Success. As two files that is an
fsync for the data, one for the sidecar and one for the folder, and on this
hardware every fsync is a cache flush of its own. An xattr is inode metadata: the
data's fsync carries it, so the same promise costs two fsyncs. The router reads it
through :meth:`Spool.read_sidecar` like any sidecar and writes real .json files for
every place it links the instance into (it always did), so only incoming/ holds
instances without a .json beside them.

The attribute takes a block of its own on ext4 (4 KiB per instance, for as long as the
inode lives, success/ included), so the router takes it off (:func:`drop`) once its
decision, a .json holding every receive fact, is durable: before linking anywhere.

Filesystems without user xattrs (some NFS and FUSE mounts, tmpfs before Linux 6.6)
refuse with ENOTSUP: then publishing writes the .json as before. A .json beside a
file always wins over what it carries.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

ATTRIBUTE = "user.hermes.sidecar"
# The filesystem cannot hold it (no user xattrs, no room in the inode or its xattr
# block, a value over its limit): the caller writes a .json instead.
_CANNOT_CARRY = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ERANGE,
                           errno.ENOSPC, errno.EPERM, errno.EACCES})


def attach(path: Path, data: Any) -> bool:
    """Put ``data`` on ``path`` (not yet durable: the caller fsyncs the file); False when
    this filesystem cannot carry it."""
    value = json.dumps(data, separators=(",", ":"), default=str).encode()
    try:
        os.setxattr(path, ATTRIBUTE, value)
    except OSError as e:
        if e.errno in _CANNOT_CARRY:
            return False
        raise
    return True


def carried(path: Path) -> dict[str, Any]:
    """The sidecar ``path`` carries, or {} (none, unreadable, or no xattrs here)."""
    try:
        data = json.loads(os.getxattr(path, ATTRIBUTE))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def drop(path: Path) -> None:
    """Take the carried sidecar off ``path`` once a .json beside it says everything.

    Not made durable: a crash that undoes it leaves only the attribute's block.
    """
    try:
        os.removexattr(path, ATTRIBUTE)
    except OSError:
        pass  # none there (the usual case), the file gone, or no xattrs here
