"""Assemble the syft-flwr edge for one job: the publisher the round work writes through, and the bridge."""

from __future__ import annotations

import time
from collections.abc import Callable

from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.protocols.syft_flwr.bridge import Bridge
from fl_orchestrator.protocols.syft_flwr.layout import SyftFlwrLayout
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import ReplyTranslator, SyftFlwrState
from fl_orchestrator.wire.layout import JobLayout


class SyftFlwrTransport:
    """The pieces the daemon wires in when ``job.protocol = "syft-flwr"``."""

    def __init__(
        self,
        config: JobConfig,
        spool: JobLayout,
        quarantine: Quarantine,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert config.syft_flwr.app_name is not None, "the loader requires app_name"
        owners = config.syftbox.datasites
        self.target = SyftFlwrLayout(
            config.syftbox.root, config.syft_flwr.app_name, config.syftbox.aggregator_email
        )
        self.state = SyftFlwrState()
        self.publisher = SyftFlwrPublisher(
            spool,
            owners,
            target=self.target,
            state=self.state,
            run_id=config.job.name,
            expiry_margin_seconds=config.syft_flwr.request_expiry_margin_seconds,
        )
        translator = ReplyTranslator(
            self.target, spool, self.state, max_file_bytes=config.limits.max_file_bytes
        )
        self.bridge = Bridge(
            target=self.target,
            spool=spool,
            owners=owners,
            state=self.state,
            publisher=self.publisher,
            translator=translator,
            quarantine=quarantine,
            settle_seconds=config.daemon.partial_file_settle_seconds,
            heartbeat_interval_seconds=config.syft_flwr.heartbeat_interval_seconds,
            rescan_interval_seconds=config.daemon.rescan_interval_seconds,
            debounce_milliseconds=config.daemon.watch_debounce_milliseconds,
            clock=clock,
        )
