"""Run fl-orchestratord as an unprivileged user: load it as the caller, then drop privileges.

For tests run as root on machines whose Python lives where an unprivileged
user cannot read it: every module the daemon needs is imported first, then
the process becomes ``RUN_AS_UID`` and runs the daemon's ``main``.
"""

from __future__ import annotations

import asyncio  # noqa: F401 - anyio's backend needs it after the drop
import concurrent.futures.thread  # noqa: F401
import os
import sys

import anyio._backends._asyncio  # noqa: F401

from fl_orchestrator.cli import daemon_main

uid = int(os.environ["RUN_AS_UID"])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.exit(daemon_main.main(sys.argv[1:]))
