"""A server-less Celery broker: kombu's filesystem transport, publishing each message atomically.

kombu's ``filesystem://`` channel creates a message file under its final name and then writes it,
so a consumer polling the folder can take the file while it is still empty or half written, and
the worker dies of a ``JSONDecodeError``. This transport writes each message under a temporary name
that no consumer matches and then renames it into place, so a message appears complete or not at
all. Names and contents are kombu's own (``<ms>_<uuid>.<queue>.msg``, JSON), so kombu's consumer
code reads them unchanged.

Importing this module registers the URL scheme ``threadline-filesystem://`` with kombu. Every
process that connects with it must import the module first: the demo's worker does so through
:mod:`threadline.demo.app`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils import json as kombu_json

SCHEME = "threadline-filesystem"
URL = f"{SCHEME}://"
PARTIAL = ".partial"
"""Suffix of a message file still being written: consumers only take names ending in ``.msg``."""

_dumps: Callable[[Any], str] = kombu_json.dumps  # kombu's JSON, which its consumer's loads() reads


def message_name(queue: str) -> str:
    """kombu's file name for a new message on ``queue``.

    kombu's consumer takes a file for ``queue`` when the part of its name after the first dot is
    ``<queue>.msg``, oldest first by sorted name.
    """
    return f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"


class AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel, whose message files appear in the folder only once complete."""

    # the signature of kombu's filesystem channel, which names AbstractChannel's ``message`` ``payload``
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Write ``payload`` under a temporary name, then rename it to its final message name."""
        final = os.path.join(self.data_folder_out, message_name(queue))
        partial = final + PARTIAL
        try:
            with open(partial, "wb") as out:
                out.write(_dumps(payload).encode())
            os.replace(partial, final)  # atomic within one folder
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):
    """The transport behind ``threadline-filesystem://``."""

    Channel = AtomicChannel


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:FilesystemTransport"


def uses_folders(broker: str) -> bool:
    """Whether ``broker`` is a filesystem URL (this transport's or kombu's), which needs folders."""
    return broker.partition("://")[0] in (SCHEME, "filesystem")


def transport_options(root: str | os.PathLike[str], *, create: bool = False) -> dict[str, Any]:
    """Transport options keeping every folder of the transport under ``root``.

    With ``create``, the folders are made (the transport does not make them). Without a
    ``control_folder`` kombu would write its exchange tables to ``./control`` in the working
    directory.
    """
    folders = {
        "data_folder_in": Path(root, "queues"),
        "data_folder_out": Path(root, "queues"),
        "processed_folder": Path(root, "processed"),
        "control_folder": Path(root, "control"),
    }
    if create:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
    return {
        **{option: str(folder) for option, folder in folders.items()},
        "store_processed": False,
        "polling_interval": 0.05,
    }
