"""Assemble the syft-flwr edge for one job: the publisher the round work writes through, and the wire."""

from __future__ import annotations

from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.protocols.syft_flwr.keys import AggregatorKeys
from fl_orchestrator.protocols.syft_flwr.layout import SyftFlwrLayout
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import ReplyTranslator, SyftFlwrState
from fl_orchestrator.protocols.syft_flwr.wire import SyftFlwrWire


class SyftFlwrTransport:
    """The pieces the daemon wires in when ``job.protocol = "syft-flwr"``."""

    def __init__(self, config: JobConfig) -> None:
        assert config.syft_flwr.app_name is not None, "the loader requires app_name"
        owners = config.syftbox.datasites
        self.target = SyftFlwrLayout(
            config.syftbox.root, config.syft_flwr.app_name, config.syftbox.aggregator_email
        )
        self.state = SyftFlwrState()
        keys = None
        if config.syft_flwr.encryption:
            keys = AggregatorKeys(
                email=config.syftbox.aggregator_email,
                datasites_dir=self.target.datasites_dir,
                state_dir=config.state.state_dir,
                server_url=config.syft_flwr.server_url,
            )
        self.publisher = SyftFlwrPublisher(
            owners,
            target=self.target,
            state=self.state,
            run_id=config.job.name,
            expiry_margin_seconds=config.syft_flwr.request_expiry_margin_seconds,
            keys=keys,
            content_format=config.syft_flwr.content_format,
        )
        translator = ReplyTranslator(
            self.target, config.job.name, self.state, max_file_bytes=config.limits.max_file_bytes, keys=keys
        )
        self.wire = SyftFlwrWire(self.target, owners, self.state, self.publisher, translator)
