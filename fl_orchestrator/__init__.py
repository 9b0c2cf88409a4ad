"""fl-orchestrator: the aggregation server for federated learning over SyftBox."""

__version__ = "0.1.0"
