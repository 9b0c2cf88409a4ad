"""Where syft-flwr (syft-rpc 0.4) puts its files, and what a path under datasites/ means.

datasites/<owner>/app_data/flwr/<app_name>/rpc/
    rpc.schema.json, syft.pub.yaml            written by the owner when it starts
    messages/<aggregator>/<uuid>.request      written by the aggregator
    messages/<aggregator>/<uuid>.response     written by the owner
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

ENDPOINT = "messages"
SCHEMA_FILE = "rpc.schema.json"
PERMISSION_FILE = "syft.pub.yaml"
REFUSED_SUFFIX = ".syftrejected.request"
# How often a request an owner read half-downloaded is sent again (under a new name).
MAX_RESENDS = 2
_RESEND_NAMESPACE = uuid.UUID("0b9f3c8e-2f4e-4a8e-9d43-52a1f4f1c0aa")


class SyftFlwrKind(Enum):
    """What a path under an owner's syft-flwr app folder is."""

    RESPONSE = "response"
    PRESENCE = "presence"
    # The aggregator's SyftBox client renames a request the server refused to upload.
    REFUSED_UPLOAD = "refused_upload"
    IGNORED = "ignored"


@dataclass(frozen=True)
class SyftFlwrPath:
    """A classified path: whose it is, what it is, and (for responses) which request it answers."""

    owner: str
    kind: SyftFlwrKind
    request_id: uuid.UUID | None = None


@dataclass(frozen=True)
class SyftFlwrLayout:
    """Paths of one syft-flwr app under one SyftBox root, seen from the aggregator."""

    root: Path
    app_name: str
    aggregator: str

    @property
    def datasites_dir(self) -> Path:
        """The folder that holds every datasite."""
        return self.root / "datasites"

    def rpc_dir(self, owner: str) -> Path:
        """An owner's rpc folder for this app."""
        return self.datasites_dir / owner / "app_data" / "flwr" / self.app_name / "rpc"

    def messages_dir(self, owner: str) -> Path:
        """Where this aggregator's requests to ``owner`` and their responses lie."""
        return self.rpc_dir(owner) / ENDPOINT / self.aggregator

    def request_path(self, owner: str, request_id: uuid.UUID) -> Path:
        """One request file."""
        return self.messages_dir(owner) / f"{request_id}.request"

    def response_path(self, owner: str, request_id: uuid.UUID) -> Path:
        """The owner's answer to one request."""
        return self.messages_dir(owner) / f"{request_id}.response"

    def schema_path(self, owner: str) -> Path:
        """The file an owner publishes when its handler is up: our presence signal."""
        return self.rpc_dir(owner) / SCHEMA_FILE

    def url(self, owner: str) -> str:
        """The syft:// URL of an owner's endpoint, as syft-rpc writes it in envelopes."""
        return f"syft://{owner}/app_data/flwr/{self.app_name}/rpc/{ENDPOINT}"

    @property
    def marker(self) -> str:
        """A substring every path of this app contains (for the watch filter)."""
        return f"/app_data/flwr/{self.app_name}/rpc/"

    def classify(self, path: Path) -> SyftFlwrPath | None:
        """Read a path under datasites/; None for anything outside an owner's app folder."""
        try:
            rel = path.relative_to(self.datasites_dir)
        except ValueError:
            return None
        parts = rel.parts
        if any(part in ("", ".", "..") for part in parts):
            return None
        if len(parts) < 6 or parts[1:5] != ("app_data", "flwr", self.app_name, "rpc"):
            return None
        owner, rest = parts[0], parts[5:]
        if rest in ((SCHEMA_FILE,), (PERMISSION_FILE,)):
            return SyftFlwrPath(owner, SyftFlwrKind.PRESENCE)
        if len(rest) == 3 and rest[:2] == (ENDPOINT, self.aggregator):
            for suffix, kind in (
                (".response", SyftFlwrKind.RESPONSE),
                (REFUSED_SUFFIX, SyftFlwrKind.REFUSED_UPLOAD),
            ):
                if rest[2].endswith(suffix):
                    try:
                        request_id = uuid.UUID(rest[2][: -len(suffix)])
                    except ValueError:
                        break
                    return SyftFlwrPath(owner, kind, request_id)
        return SyftFlwrPath(owner, SyftFlwrKind.IGNORED)


def request_id_for_task(task_id: str) -> uuid.UUID:
    """The request id of a native task: the task id (32 hex digits) read as a UUID."""
    return uuid.UUID(hex=task_id)


def task_id_for_request(request_id: uuid.UUID) -> str:
    """The native task id a request id stands for (a first send; resends: ``resend_ids``)."""
    return request_id.hex


def resend_ids(task_id: str) -> list[uuid.UUID]:
    """The names a request is sent again under, in order: stable, so a restart knows them.

    A new name, because syft-rpc's owner ignores a request that already has a response
    and never looks at a request file again once it has read it.
    """
    return [uuid.uuid5(_RESEND_NAMESPACE, f"{task_id}|{k}") for k in range(1, MAX_RESENDS + 1)]


def first_link_below(root: Path, path: Path) -> Path | None:
    """The first existing folder between root and path (exclusive) that is a symlink, if any.

    Requests are written into, and deleted from, folders the data owners control: a link
    there would send the write or the delete somewhere else.
    """
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        if current.is_symlink():
            return current
        if not current.exists():
            return None
    return None


@dataclass(frozen=True)
class SyftFlwrTree:
    """What the shared watcher follows for a syft-flwr app (intake/adapter.py's WatchedTree)."""

    target: SyftFlwrLayout

    @property
    def datasites_dir(self) -> Path:
        """The folder that holds every datasite."""
        return self.target.datasites_dir

    @property
    def aggregator(self) -> str:
        """The aggregator's email."""
        return self.target.aggregator

    @property
    def marker(self) -> str:
        """Every file of this app lies below its rpc folder."""
        return self.target.marker

    def folders_on_the_way(self, datasite: str) -> list[Path]:
        """datasites/<owner> down to rpc/messages/<aggregator>/, where the responses land."""
        rpc = self.target.rpc_dir(datasite)
        app = rpc.parent
        return [
            app.parent.parent.parent,
            app.parent.parent,
            app.parent,
            app,
            rpc,
            rpc / ENDPOINT,
            self.target.messages_dir(datasite),
        ]

    def scan(self, datasites: tuple[str, ...]) -> Iterator[Path]:
        """Every owner's rpc.schema.json, responses and refused uploads present now."""
        for owner in datasites:
            schema = self.target.schema_path(owner)
            if os.path.lexists(schema):
                yield schema
            try:
                entries = list(os.scandir(self.target.messages_dir(owner)))
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith((".response", REFUSED_SUFFIX)):
                    yield Path(entry.path)
