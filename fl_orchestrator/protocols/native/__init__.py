"""The native protocol: msgpack tasks, models and results in the job's own folders."""

from fl_orchestrator.protocols.contract import Broadcast
from fl_orchestrator.protocols.native.publisher import Publisher
from fl_orchestrator.protocols.native.wire import NativeWire

__all__ = ["Broadcast", "NativeWire", "Publisher"]
