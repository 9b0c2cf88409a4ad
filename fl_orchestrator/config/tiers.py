"""What a tiered job (docs/TIERS.md) may and may not combine, checked at load and --check.

A region answers its root with one partial aggregate: the num_examples-weighted
mean of its datasites' results and their total num_examples. The root folds
these pairs as it folds single results, which equals the flat weighted mean
exactly; every strategy whose server step starts from that mean gives the flat
run's model. Robust strategies and DP clip or rank single results, which a
mean hides, so a root refuses them rather than compute something else.
"""

from __future__ import annotations

from fl_orchestrator.config.schema import JobConfig

# The strategies whose server step reads only the weighted mean of the round's results.
DECOMPOSABLE = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

Problem = tuple[str, object, str]


def region_email(config: JobConfig) -> str:
    """The region's datasite email in its root job."""
    return config.region.email or config.syftbox.aggregator_email


def check_tiers(config: JobConfig) -> Problem | None:
    """The first combination a tiered job cannot run, as (key, value, expected); None if fine."""
    role, region = config.job.role, config.region
    if role == "region":
        return _check_region(config)
    for key in ("root_aggregator_email", "root_job", "email"):
        if getattr(region, key) is not None:
            return f"region.{key}", getattr(region, key), "no [region] keys unless job.role = 'region'"
    if role == "root":
        if config.strategy.name not in DECOMPOSABLE:
            return (
                "strategy.name",
                config.strategy.name,
                f"one of {', '.join(DECOMPOSABLE)} with job.role = 'root': a region's partial aggregate"
                " folds exactly only into these (robust and DP strategies need single results;"
                " docs/TIERS.md)",
            )
        if config.job.protocol != "native":
            return "job.protocol", config.job.protocol, "'native' with job.role = 'root': regions speak it"
        return _check_tiered_job(config)
    return None


def _check_tiered_job(config: JobConfig) -> Problem | None:
    """What breaks the flat weighted mean at either tier."""
    role = config.job.role
    if config.job.fraction_evaluate > 0:
        return (
            "job.fraction_evaluate",
            config.job.fraction_evaluate,
            f"0 with job.role = {role!r}: federated evaluation is not passed through regions",
        )
    if config.limits.max_weight_share > 0:
        return (
            "limits.max_weight_share",
            config.limits.max_weight_share,
            f"0 with job.role = {role!r}: capping a share changes the weights, so the tiers"
            " would not give the flat weighted mean",
        )
    return None


def _check_region(config: JobConfig) -> Problem | None:
    region = config.region
    if region.root_aggregator_email is None:
        return "region.root_aggregator_email", None, "the root job's aggregator email (job.role = 'region')"
    if region.root_job is None:
        return "region.root_job", None, "the root job's name (job.role = 'region')"
    if config.job.protocol != "native":
        return "job.protocol", config.job.protocol, "'native' with job.role = 'region'"
    if config.strategy.name != "fedavg":
        return (
            "strategy.name",
            config.strategy.name,
            "'fedavg' with job.role = 'region': a region sends its root the weighted mean, and the"
            " root's own strategy takes it from there",
        )
    if config.job.metrics_aggregation is not None:
        return (
            "job.metrics_aggregation",
            config.job.metrics_aggregation,
            "unset with job.role = 'region': the root's metrics_aggregation merges the regions'"
            " num_examples-weighted metrics",
        )
    if region.deadline_margin_seconds >= config.job.round_timeout_seconds:
        return (
            "region.deadline_margin_seconds",
            region.deadline_margin_seconds,
            f"less than job.round_timeout_seconds ({config.job.round_timeout_seconds:g}), or no round"
            " would have time left",
        )
    problem = _check_tiered_job(config)
    if problem is not None:
        return problem
    email = region_email(config)
    if email in config.syftbox.datasites:
        return "region.email", email, "an email not among this region's own datasites"
    if email == config.syftbox.aggregator_email and region.root_job == config.job.name:
        return (
            "region.root_job",
            region.root_job,
            f"a name other than job.name ({config.job.name!r}): both jobs would share one folder",
        )
    return None
