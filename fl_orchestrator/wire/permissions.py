"""Permission files in both SyftBox formats, rendered without a YAML dependency.

The current client reads ``syft.pub.yaml`` from the nearest folder only (no
inheritance), so each job folder carries a complete rule set. The earlier
client reads ``syftperm.yaml``, a list of {path, user, permissions} rules in
which ``user`` is one email or "*". Emails are validated by the config loader,
so quoting them is enough to make the YAML unambiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

PUB_FILE = "syft.pub.yaml"
LEGACY_FILE = "syftperm.yaml"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def aggregator_permissions(datasites: Sequence[str]) -> dict[str, str]:
    """Rules for the aggregator's job folder: every datasite reads the models,
    each datasite reads only its own task folder."""
    readers = ", ".join(_quote(d) for d in datasites)
    pub = (
        "rules:\n"
        "  - pattern: 'models/**'\n"
        f"    access: {{read: [{readers}]}}\n"
        "  - pattern: 'tasks/{{.UserEmail}}/**'\n"
        "    access: {read: ['USER']}\n"
        "  - pattern: '**'\n"
        "    access: {read: []}\n"
    )
    legacy_rules = [f"- path: 'models/**'\n  user: {_quote(d)}\n  permissions: [read]\n" for d in datasites]
    # One explicit rule per datasite: the earlier server lists a '{useremail}' rule's
    # files to everyone and then refuses each download, so clients retry forever.
    legacy_rules.extend(
        f"- path: 'tasks/{d}/**'\n  user: {_quote(d)}\n  permissions: [read]\n" for d in datasites
    )
    return {PUB_FILE: pub, LEGACY_FILE: "".join(legacy_rules)}


def datasite_permissions(aggregator: str) -> dict[str, str]:
    """Rules for a datasite's job folder: the aggregator reads everything in it."""
    pub = f"rules:\n  - pattern: '**'\n    access: {{read: [{_quote(aggregator)}]}}\n"
    legacy = f"- path: '**'\n  user: {_quote(aggregator)}\n  permissions: [read]\n"
    return {PUB_FILE: pub, LEGACY_FILE: legacy}
