"""The job configuration: a tree of frozen dataclasses.

Every field carries its constraint in ``metadata`` so that the loader can name
the key, the value and what was expected in one line. Units live in key names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fl_orchestrator.core.fields import ConfigScalar, ConfigValue, spec

__all__ = ["ConfigScalar", "ConfigValue", "spec"]


@dataclass(frozen=True)
class JobSection:
    """The round loop, with Flower's names where Flower has one."""

    name: str = field(metadata=spec("job name: letters, digits, '-', '_' and '.'"))
    protocol: str = field(
        default="native",
        metadata=spec(
            "wire format: 'native' (fl_orchestrator's own) or 'syft-flwr' (drive syft-flwr"
            " data owners; needs the [syft-flwr] extra and [syft_flwr] app_name)",
            choices=("native", "syft-flwr"),
        ),
    )
    role: str = field(
        default="flat",
        metadata=spec(
            "'flat' (datasites answer this job), 'root' (some datasites are regions: only strategies"
            " that fold exactly are allowed) or 'region' (answer a root job by running its rounds"
            " over this job's datasites; needs [region]); see docs/TIERS.md",
            choices=("flat", "root", "region"),
        ),
    )
    # A region (role = "region") runs the rounds its root asks for, and ends when the root does.
    num_rounds: int = field(default=3, metadata=spec("number of rounds", minimum=1))
    round_timeout_seconds: float = field(
        default=600.0,
        metadata=spec("seconds a round collects results", minimum=0, exclusive_minimum=True),
    )
    fraction_train: float = field(
        default=1.0,
        metadata=spec("share of available datasites trained per round", minimum=0, maximum=1),
    )
    min_train_nodes: int = field(
        default=2, metadata=spec("fewest successful results a round aggregates", minimum=1)
    )
    min_available_nodes: int = field(
        default=2, metadata=spec("datasites that must be present to start a round", minimum=1)
    )
    available_timeout_seconds: float = field(
        default=600.0,
        metadata=spec(
            "seconds to wait for min_available_nodes before failing",
            minimum=0,
            exclusive_minimum=True,
        ),
    )
    max_round_retries: int = field(
        default=2, metadata=spec("retries of a round that missed min_train_nodes", minimum=0)
    )
    selection_seed: int = field(default=0, metadata=spec("seed of the per-round selection"))
    fraction_evaluate: float = field(
        default=0.0,
        metadata=spec(
            "share of available datasites that evaluate each new model (0: none)", minimum=0, maximum=1
        ),
    )
    min_evaluate_nodes: int = field(
        default=1, metadata=spec("fewest datasites present for a federated evaluation to start", minimum=1)
    )
    train_config: dict[str, ConfigValue] = field(
        default_factory=dict, metadata=spec("values sent to every datasite each round")
    )
    configure_round: str | None = field(
        default=None,
        metadata=spec(
            "'package.module:function' (round, previous metrics) -> config merged over train_config",
            import_string=True,
        ),
    )
    metrics_aggregation: str | None = field(
        default=None,
        metadata=spec(
            "'package.module:function' [(num_examples, metrics), ...] -> metrics;"
            " default: mean weighted by num_examples",
            import_string=True,
        ),
    )
    python_path: tuple[Path, ...] = field(
        default=(),
        metadata=spec(
            "folders searched first for the job's own modules (hooks, a custom strategy),"
            " relative to the job file; nothing else is added to the import path",
        ),
    )


@dataclass(frozen=True)
class SyftBoxSection:
    """Where the synced tree is and who takes part."""

    root: Path = field(metadata=spec("SyftBox folder (holds datasites/)"))
    aggregator_email: str = field(metadata=spec("the aggregator's datasite email", email=True))
    datasites: tuple[str, ...] = field(metadata=spec("emails of the targeted datasites", email=True))
    part_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=spec(
            "models larger than this are written as parts of at most this size"
            " (SyftBox 0.4.0 refuses files over 10 MB); 0 never splits",
            minimum=0,
        ),
    )
    server_max_file_bytes: int = field(
        default=10 * 1024 * 1024,
        metadata=spec(
            "the largest file the SyftBox server and clients carry (syftbox 0.4.0: 10 MB); checked"
            " against the largest file the job writes or reads, at --check and at start; 0: no cap"
            " (one shared folder, no server)",
            minimum=0,
        ),
    )
    presence_ttl_seconds: float = field(
        default=60.0,
        metadata=spec(
            "a datasite counts as available this long after its last heartbeat",
            minimum=0,
            exclusive_minimum=True,
        ),
    )


@dataclass(frozen=True)
class ArraySpec:
    """One array of a randomly initialised model."""

    shape: tuple[int, ...] = field(metadata=spec("array shape, a list of positive ints", minimum=1))
    dtype: str = field(default="float32", metadata=spec("array dtype", choices=("float32", "float64")))
    init: str = field(default="normal", metadata=spec("initialiser", choices=("zeros", "normal", "uniform")))
    scale: float = field(default=0.01, metadata=spec("std (normal) or bound (uniform)", minimum=0))


@dataclass(frozen=True)
class ModelSection:
    """The initial global model: a seeded random init or a checkpoint file."""

    source: str = field(
        default="random", metadata=spec("where round 0 comes from", choices=("random", "checkpoint"))
    )
    seed: int = field(default=0, metadata=spec("seed of the random init", minimum=0))
    checkpoint_path: Path | None = field(
        default=None, metadata=spec("an .npz or .msgpack weights file (source = checkpoint)")
    )
    arrays: dict[str, ArraySpec] = field(
        default_factory=dict, metadata=spec("array name -> shape spec (source = random)")
    )


@dataclass(frozen=True)
class StrategySection:
    """How results become the next global model."""

    name: str = field(default="fedavg", metadata=spec("a built-in strategy or 'package.module:Class'"))
    params: dict[str, Any] = field(
        default_factory=dict, metadata=spec("the strategy's parameters, as flat keys of [strategy]")
    )


@dataclass(frozen=True)
class EvaluateSection:
    """Central validation, run before round 1 and after every round."""

    global_evaluate: str | None = field(
        default=None, metadata=spec("'package.module:function'", import_string=True)
    )
    timeout_seconds: float = field(
        default=300.0,
        metadata=spec("deadline of one central evaluation", minimum=0, exclusive_minimum=True),
    )


@dataclass(frozen=True)
class StateSection:
    """Where the daemon keeps models, ledgers and quarantine."""

    state_dir: Path = field(metadata=spec("state directory"))
    keep_checkpoints: int = field(
        default=3, metadata=spec("how many of the newest round checkpoints to keep", minimum=1)
    )
    write_retry_seconds: float = field(
        default=30.0,
        metadata=spec(
            "how long a failing state write is retried before the daemon exits 74",
            minimum=0,
            exclusive_minimum=True,
        ),
    )


@dataclass(frozen=True)
class DaemonSection:
    """Service behaviour: watching, deadlines and shutdown."""

    rescan_interval_seconds: float = field(
        default=15.0,
        metadata=spec("safety-net full rescan period", minimum=0, exclusive_minimum=True),
    )
    watch_debounce_milliseconds: int = field(
        default=5, metadata=spec("file-event batching window", minimum=1, maximum=10_000)
    )
    aggregation_timeout_seconds: float = field(
        default=600.0,
        metadata=spec("deadline of one aggregation", minimum=0, exclusive_minimum=True),
    )
    quarantine_mode: str = field(
        default="copy",
        metadata=spec(
            "refused files are copied to quarantine and left in place (safe under sync), or moved",
            choices=("copy", "move"),
        ),
    )
    quarantine_max_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=spec(
            "disk the kept copies of refused files may take in all, shared equally by the datasites"
            " (past a datasite's share only the records are written; 0: no copies at all)",
            minimum=0,
        ),
    )
    partial_file_settle_seconds: float = field(
        default=2.0,
        metadata=spec(
            "an empty or truncated file is refused only after staying unchanged this long", minimum=0
        ),
    )
    restart_grants_fresh_timeout: bool = field(
        default=False,
        metadata=spec("a restart mid-round restarts the round's timeout instead of keeping its deadline"),
    )
    shutdown_timeout_seconds: float = field(
        default=5.0,
        metadata=spec("drain deadline after SIGTERM", minimum=0, exclusive_minimum=True),
    )
    prometheus_textfile_path: Path | None = field(
        default=None,
        metadata=spec(
            "where the job's Prometheus metrics go, in the text format node_exporter's textfile"
            " collector reads, rewritten atomically with status.json (at most every 15 s); default"
            " <state_dir>/fl_orchestrator.prom",
        ),
    )


@dataclass(frozen=True)
class LimitsSection:
    """Bounds on what an inbound file may carry."""

    max_file_bytes: int = field(
        default=0,
        metadata=spec(
            "largest result file read; 0: the model's arrays plus max_header_bytes, which is what an"
            " honest result takes (a larger file is refused from its size, before any read)",
            minimum=0,
        ),
    )
    refuse_sparse_files: bool = field(
        default=True,
        metadata=spec(
            "refuse, before reading it, a result of 1 MiB or more with under 1/8 of its size on disk"
            " (a sparse file); turn off on a compressing filesystem if honest results are refused"
        ),
    )
    max_header_bytes: int = field(default=1024 * 1024, metadata=spec("largest message header", minimum=64))
    max_num_examples: int = field(
        default=10**8,
        metadata=spec(
            "largest num_examples a result may claim (a datasite's weight in FedAvg); raise it only"
            " for a datasite that really holds more",
            minimum=1,
        ),
    )
    max_num_examples_growth: float = field(
        default=4.0,
        metadata=spec(
            "a datasite's num_examples may grow at most this factor over its first counted claim"
            " (0: no limit)",
            minimum=0,
        ),
    )
    outlier_norm_factor: float = field(
        default=10.0,
        metadata=spec(
            "refuse (norm_outlier) a result whose update norm is over this many times the median"
            " of the datasites' update norms in the last rounds aggregated (from the round after"
            " 3 datasites have one; docs/REJECTIONS.md). 0: off",
            minimum=0,
        ),
    )
    max_weight_share: float = field(
        default=0.0,
        metadata=spec(
            "largest share of a round's total weight one datasite may have; the excess is spread"
            " over the others (docs/STRATEGIES.md). 0: off",
            minimum=0,
            maximum=1,
        ),
    )
    max_metrics: int = field(default=256, metadata=spec("most metric entries", minimum=0))
    max_arrays: int = field(default=4096, metadata=spec("most arrays in one result", minimum=1))
    max_array_dims: int = field(
        default=8, metadata=spec("most dimensions of one array", minimum=0, maximum=32)
    )
    max_array_elements: int = field(
        default=2**31, metadata=spec("most elements of one array", minimum=1, maximum=2**40)
    )
    max_msgpack_container_len: int = field(
        default=4096, metadata=spec("most entries of one msgpack array or map in a header", minimum=16)
    )
    max_msgpack_str_bytes: int = field(
        default=64 * 1024, metadata=spec("longest msgpack str or bin in a header", minimum=256)
    )
    max_msgpack_depth: int = field(
        default=16,
        metadata=spec("deepest nesting of msgpack arrays and maps in a header", minimum=4, maximum=512),
    )
    max_config_entries: int = field(
        default=256, metadata=spec("most entries of a task's config map", minimum=1)
    )
    max_update_norm: float = field(
        default=0.0, metadata=spec("bound on the L2 norm of result - global model (0: off)", minimum=0)
    )
    update_norm_action: str = field(
        default="reject",
        metadata=spec("what to do with an update over max_update_norm", choices=("reject", "clip")),
    )
    flag_after_rejections: int = field(
        default=5, metadata=spec("consecutive rejections that flag a datasite", minimum=1)
    )


@dataclass(frozen=True)
class LoggingSection:
    """Log level and format; flags and environment override these."""

    level: str = field(
        default="info", metadata=spec("log level", choices=("debug", "info", "warning", "error"))
    )
    format: str = field(default="auto", metadata=spec("log format", choices=("auto", "json", "console")))


@dataclass(frozen=True)
class SyftFlwrSection:
    """How to reach syft-flwr data owners (used only with job.protocol = 'syft-flwr')."""

    app_name: str | None = field(
        default=None,
        metadata=spec(
            "the app_name that syft_flwr.bootstrap wrote under [tool.syft_flwr] in the"
            " project's pyproject.toml: requests go to app_data/flwr/<app_name>/rpc/messages/",
        ),
    )
    encryption: bool = field(
        default=True,
        metadata=spec(
            "encrypt requests and decrypt replies with the owners' published X3DH keys, as syft-flwr"
            " 0.5.3 owners do by default; false only where every owner runs with"
            " SYFT_FLWR_ENCRYPTION_ENABLED=false",
        ),
    )
    content_format: str = field(
        default="message",
        metadata=spec(
            "what the owners' ClientApp reads: 'message' (arrays/config records, a Message-API"
            " ClientApp with @app.train()) or 'legacy' (fitins/evaluateins records, a"
            " ClientApp(client_fn=...) with a NumPyClient, as server_fn projects use); replies are"
            " read in either",
            choices=("message", "legacy"),
        ),
    )
    server_url: str = field(
        default="https://syftbox.net",
        metadata=spec(
            "the SyftBox server the owners sync with: it names the aggregator's published identity"
            " (did:web:<host>:<email>) and the file its private keys are kept in",
        ),
    )
    request_expiry_margin_seconds: float = field(
        default=300.0,
        metadata=spec(
            "a request expires this long after its round's deadline (syft-flwr uses a fixed 15 minutes)",
            minimum=0,
        ),
    )
    stop_wait_seconds: float = field(
        default=15.0,
        metadata=spec(
            "when the job ends, how long to wait for the owners to answer the stop message"
            " (over SyftBox sync a round trip takes seconds)",
            minimum=0,
        ),
    )
    heartbeat_interval_seconds: float = field(
        default=10.0,
        metadata=spec(
            "no longer used, accepted so that older job files load: a data owner is present from"
            " its rpc.schema.json (or any answer) until it misses a deadline",
            minimum=0,
            exclusive_minimum=True,
        ),
    )


@dataclass(frozen=True)
class RegionSection:
    """Where a region's root job is (used only with job.role = 'region'; docs/TIERS.md)."""

    root_aggregator_email: str | None = field(
        default=None, metadata=spec("the root job's aggregator email", email=True)
    )
    root_job: str | None = field(default=None, metadata=spec("the root job's name"))
    email: str | None = field(
        default=None,
        metadata=spec(
            "this region's datasite email in the root job (default: syftbox.aggregator_email)", email=True
        ),
    )
    deadline_margin_seconds: float = field(
        default=10.0,
        metadata=spec(
            "the region's rounds close this long before the root's deadline, so that its answer"
            " is written and synced in time",
            minimum=0,
        ),
    )
    heartbeat_interval_seconds: float = field(
        default=5.0,
        metadata=spec("how often the region tells the root it is present", minimum=0, exclusive_minimum=True),
    )


LogFormat = Literal["auto", "json", "console"]


@dataclass(frozen=True)
class JobConfig:
    """One job, as loaded from one TOML file."""

    job: JobSection
    syftbox: SyftBoxSection
    model: ModelSection
    state: StateSection
    strategy: StrategySection = field(default_factory=StrategySection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    syft_flwr: SyftFlwrSection = field(default_factory=SyftFlwrSection)
    region: RegionSection = field(default_factory=RegionSection)
    source_path: Path | None = field(default=None, metadata=spec("(set by the loader)"))
