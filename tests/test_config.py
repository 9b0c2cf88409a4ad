"""Job-file validation: every defect is one ConfigError naming the key, the value and what was expected."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from fl_orchestrator.cli import daemon_main
from fl_orchestrator.config import EX_CONFIG, ConfigError, JobConfig, config_from_table, load_config
from fl_orchestrator.config.loader import check_config_value
from fl_orchestrator.config.render import config_to_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "example.toml"
DEMO = REPO / "config" / "demo.toml"

DROP = object()  # marks a key to remove in `variant`

BASE: dict[str, Any] = {
    "job": {"name": "mnist-cnn", "min_train_nodes": 1, "min_available_nodes": 2},
    "syftbox": {
        "root": "syftbox",
        "aggregator_email": "agg@example.org",
        "datasites": ["a@example.org", "b@example.org"],
    },
    "model": {"source": "random", "arrays": {"w": {"shape": [2, 3]}}},
    "state": {"state_dir": "state"},
}


def variant(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of BASE with dotted keys set (or removed with DROP)."""
    table = copy.deepcopy(BASE if base is None else base)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = table
        for part in parents:
            node = node.setdefault(part, {})
        if value is DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return table


def write(tmp_path: Path, table: dict[str, Any], name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(tomli_w.dumps(table), encoding="utf-8")
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def table_error(tmp_path: Path, changes: dict[str, Any]) -> ConfigError:
    return load_error(write(tmp_path, variant(changes)))


def assert_line(err: ConfigError, key: str, value_text: str | None, *expected: str) -> str:
    """The line names the key, the value (as its repr, or '(missing)') and what was expected."""
    line = err.line()
    assert err.key == key, line
    shown = key if key.isprintable() else repr(key)
    assert line.startswith(f"config error: {shown} = "), line
    assert "\n" not in line
    if value_text is not None:
        assert line.startswith(f"config error: {shown} = {value_text}: expected "), line
    assert ": expected " in line
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert str(err) == line
    return line


# ---- the baseline -------------------------------------------------------------------------------


def test_base_table_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_config(path)
    assert isinstance(config, JobConfig)
    assert config.job.name == "mnist-cnn"
    assert config.job.num_rounds == 3
    assert config.job.round_timeout_seconds == 600.0
    assert config.job.train_config == {}
    assert config.syftbox.datasites == ("a@example.org", "b@example.org")
    assert config.model.arrays["w"].shape == (2, 3)
    assert config.model.arrays["w"].dtype == "float32"
    assert config.strategy.name == "fedavg"
    assert config.evaluate.global_evaluate is None
    assert config.daemon.watch_debounce_milliseconds == 5
    assert config.limits.max_metrics == 256
    assert config.logging.level == "info"
    assert config.source_path == path.resolve()


def test_int_given_for_float_becomes_float(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, variant({"job.round_timeout_seconds": 5, "job.fraction_train": 1})))
    assert config.job.round_timeout_seconds == 5.0
    assert type(config.job.round_timeout_seconds) is float
    assert type(config.job.fraction_train) is float


def test_boundary_values_accepted(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            variant(
                {
                    "job.num_rounds": 1,
                    "job.fraction_train": 0.0,
                    "job.max_round_retries": 0,
                    "job.min_available_nodes": 2,
                    "job.min_train_nodes": 2,
                    "job.selection_seed": -7,
                    "daemon.watch_debounce_milliseconds": 10_000,
                    "limits.max_header_bytes": 64,
                    "limits.max_metrics": 0,
                    "model.arrays.w.shape": [],
                    "model.arrays.w.scale": 0.0,
                }
            ),
        )
    )
    assert config.job.fraction_train == 0.0
    assert config.model.arrays["w"].shape == ()


# ---- unknown keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "suggestion"),
    [
        ({"jobs": {"name": "x"}}, "jobs", "job"),
        ({"job.round_timeout": 60}, "job.round_timeout", "round_timeout_seconds"),
        ({"job.num_round": 3}, "job.num_round", "num_rounds"),
        ({"syftbox.datasite": ["c@example.org"]}, "syftbox.datasite", "datasites"),
        ({"model.arrays.w.shap": [1]}, "model.arrays.w.shap", "shape"),
        ({"daemon.rescan_interval": 3.0}, "daemon.rescan_interval", "rescan_interval_seconds"),
        ({"limits.max_file_byte": 10}, "limits.max_file_byte", "max_file_bytes"),
    ],
)
def test_unknown_key_near_miss_suggests(
    tmp_path: Path, changes: dict[str, Any], key: str, suggestion: str
) -> None:
    err = table_error(tmp_path, changes)
    assert_line(err, key, None, "no such key; known keys: ", f"(did you mean '{suggestion}'?)")


def test_unknown_key_lists_known_keys_without_wild_guess(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"syftbox.zzzzzz": 1})
    line = assert_line(err, "syftbox.zzzzzz", "1", "known keys: root, aggregator_email, datasites")
    assert "did you mean" not in line


def test_unknown_top_level_key_without_suggestion(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"qqqq": 1})
    line = assert_line(err, "qqqq", "1", "no such key; known keys: job, syftbox, model, state")
    assert "did you mean" not in line


def test_keys_with_control_characters_stay_on_one_line(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"job": {**BASE["job"], "round\ntimeout": 5}})
    line = assert_line(err, "job.round\ntimeout", "5", "no such key")
    assert line.startswith("config error: 'job.round\\ntimeout' = 5: expected no such key")
    err = table_error(tmp_path, {"job.train_config": {"a\tb": {"x": 1}}})
    assert_line(err, "job.train_config.a\tb", "{'x': 1}", "an int, float, str, bool, bytes")


def test_source_path_cannot_be_set(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"source_path": "/etc/passwd"})
    assert_line(err, "source_path", "'/etc/passwd'", "no such key (it is set by the loader)")


# ---- missing keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dropped", "key", "doc"),
    [
        ("job.name", "job.name", "job name"),
        ("syftbox.root", "syftbox.root", "SyftBox folder"),
        ("syftbox.aggregator_email", "syftbox.aggregator_email", "the aggregator's datasite email"),
        ("syftbox.datasites", "syftbox.datasites", "emails of the targeted datasites"),
        ("state.state_dir", "state.state_dir", "state directory"),
        ("model.arrays.w.shape", "model.arrays.w.shape", "array shape"),
        ("job", "job.name", "job name"),
        ("syftbox", "syftbox.root", "SyftBox folder"),
        ("state", "state.state_dir", "state directory"),
    ],
)
def test_missing_required_key(tmp_path: Path, dropped: str, key: str, doc: str) -> None:
    err = table_error(tmp_path, {dropped: DROP})
    assert_line(err, key, "(missing)", "expected a value: ", doc)


def test_missing_model_section_means_random_without_arrays(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"model": DROP})
    assert_line(err, "model.arrays", "{}", "at least one array when model.source = 'random'")


# ---- wrong types -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "value_text", "expected"),
    [
        ({"job.num_rounds": True}, "job.num_rounds", "True", "an integer (number of rounds)"),
        ({"job.num_rounds": 2.0}, "job.num_rounds", "2.0", "an integer (number of rounds)"),
        ({"job.num_rounds": "3"}, "job.num_rounds", "'3'", "an integer"),
        ({"job.selection_seed": 1.5}, "job.selection_seed", "1.5", "an integer"),
        ({"job.fraction_train": "0.5"}, "job.fraction_train", "'0.5'", "a number (share of available"),
        ({"job.round_timeout_seconds": True}, "job.round_timeout_seconds", "True", "a number"),
        ({"job.round_timeout_seconds": [1.0]}, "job.round_timeout_seconds", "[1.0]", "a number"),
        ({"job.name": 7}, "job.name", "7", "a string"),
        ({"job": [1, 2]}, "job", "[1, 2]", "a table"),
        ({"daemon": "fast"}, "daemon", "'fast'", "a table"),
        ({"job.train_config": [1]}, "job.train_config", "[1]", "a table (values sent to every datasite"),
        ({"model.arrays": [1]}, "model.arrays", "[1]", "a table"),
        ({"model.arrays.w": 5}, "model.arrays.w", "5", "a table"),
        ({"model.arrays.w.shape": 4}, "model.arrays.w.shape", "4", "a list (array shape"),
        ({"model.arrays.w.shape": [2, 2.5]}, "model.arrays.w.shape[1]", "2.5", "an integer"),
        ({"model.arrays.w.shape": [True]}, "model.arrays.w.shape[0]", "True", "an integer"),
        ({"model.seed": "0"}, "model.seed", "'0'", "an integer"),
        ({"syftbox.datasites": "a@example.org"}, "syftbox.datasites", "'a@example.org'", "a list"),
        ({"syftbox.datasites": [["a@example.org"]]}, "syftbox.datasites[0]", None, "a string"),
        ({"syftbox.root": 5}, "syftbox.root", "5", "a path string"),
        ({"syftbox.root": ""}, "syftbox.root", "''", "a path string"),
        ({"state.state_dir": ["a"]}, "state.state_dir", "['a']", "a path string"),
        ({"evaluate.global_evaluate": 5}, "evaluate.global_evaluate", "5", "a string"),
        ({"limits.max_file_bytes": 1e9}, "limits.max_file_bytes", "1000000000.0", "an integer"),
        ({"logging.level": 1}, "logging.level", "1", "a string"),
    ],
)
def test_wrong_type(
    tmp_path: Path, changes: dict[str, Any], key: str, value_text: str | None, expected: str
) -> None:
    assert_line(table_error(tmp_path, changes), key, value_text, expected)


@pytest.mark.parametrize(
    ("changes", "key", "value_text", "expected"),
    [
        ({"logging.level": "INFO"}, "logging.level", "'INFO'", "one of 'debug', 'info', 'warning', 'error'"),
        ({"logging.format": "xml"}, "logging.format", "'xml'", "one of 'auto', 'json', 'console'"),
        ({"strategy.name": "fedprux"}, "strategy.name", "'fedprux'", "one of fedavg, fedprox"),
        ({"model.source": "hub"}, "model.source", "'hub'", "one of 'random', 'checkpoint'"),
        ({"model.arrays.w.dtype": "int8"}, "model.arrays.w.dtype", "'int8'", "one of 'float32', 'float64'"),
        ({"model.arrays.w.init": "ones"}, "model.arrays.w.init", "'ones'", "one of 'zeros', 'normal'"),
        (
            {"evaluate.global_evaluate": "pkg.mod.fn"},
            "evaluate.global_evaluate",
            "'pkg.mod.fn'",
            "an import string 'package.module:function'",
        ),
        (
            {"evaluate.global_evaluate": "pkg.mod:fn\n"},
            "evaluate.global_evaluate",
            "'pkg.mod:fn\\n'",
            "an import string",
        ),
    ],
)
def test_bad_choice_or_format(
    tmp_path: Path, changes: dict[str, Any], key: str, value_text: str, expected: str
) -> None:
    assert_line(table_error(tmp_path, changes), key, value_text, expected)


def test_valid_import_string_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, variant({"evaluate.global_evaluate": "my_pkg.sub_mod:evaluate_1"})))
    assert config.evaluate.global_evaluate == "my_pkg.sub_mod:evaluate_1"


# ---- out of range ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "value_text", "expected"),
    [
        ({"job.num_rounds": 0}, "job.num_rounds", "0", "a value >= 1 (number of rounds)"),
        ({"job.num_rounds": -3}, "job.num_rounds", "-3", "a value >= 1"),
        ({"job.fraction_train": 1.5}, "job.fraction_train", "1.5", "a value >= 0 and <= 1"),
        ({"job.fraction_train": -0.1}, "job.fraction_train", "-0.1", "a value >= 0 and <= 1"),
        ({"job.round_timeout_seconds": 0}, "job.round_timeout_seconds", "0", "a value > 0"),
        ({"job.round_timeout_seconds": -5.0}, "job.round_timeout_seconds", "-5.0", "a value > 0"),
        ({"job.available_timeout_seconds": -1}, "job.available_timeout_seconds", "-1", "a value > 0"),
        ({"job.max_round_retries": -1}, "job.max_round_retries", "-1", "a value >= 0"),
        ({"job.min_train_nodes": 0}, "job.min_train_nodes", "0", "a value >= 1"),
        ({"syftbox.presence_ttl_seconds": 0.0}, "syftbox.presence_ttl_seconds", "0.0", "a value > 0"),
        ({"evaluate.timeout_seconds": -1.0}, "evaluate.timeout_seconds", "-1.0", "a value > 0"),
        ({"daemon.rescan_interval_seconds": 0}, "daemon.rescan_interval_seconds", "0", "a value > 0"),
        ({"daemon.shutdown_timeout_seconds": -0.5}, "daemon.shutdown_timeout_seconds", "-0.5", "> 0"),
        ({"daemon.aggregation_timeout_seconds": 0}, "daemon.aggregation_timeout_seconds", "0", "> 0"),
        (
            {"daemon.watch_debounce_milliseconds": 0},
            "daemon.watch_debounce_milliseconds",
            "0",
            "a value >= 1 and <= 10000",
        ),
        (
            {"daemon.watch_debounce_milliseconds": 10_001},
            "daemon.watch_debounce_milliseconds",
            "10001",
            "a value >= 1 and <= 10000",
        ),
        ({"limits.max_header_bytes": 63}, "limits.max_header_bytes", "63", "a value >= 64"),
        ({"limits.max_metrics": -1}, "limits.max_metrics", "-1", "a value >= 0"),
        ({"limits.max_file_bytes": -1}, "limits.max_file_bytes", "-1", "a value >= 0"),
        ({"limits.max_num_examples": 0}, "limits.max_num_examples", "0", "a value >= 1"),
        ({"model.arrays.w.shape": [3, 0]}, "model.arrays.w.shape[1]", "0", "a value >= 1"),
        ({"model.arrays.w.scale": -0.5}, "model.arrays.w.scale", "-0.5", "a value >= 0"),
        ({"model.seed": -1}, "model.seed", "-1", "a value >= 0 (seed of the random init)"),
    ],
)
def test_out_of_range(
    tmp_path: Path, changes: dict[str, Any], key: str, value_text: str, expected: str
) -> None:
    assert_line(table_error(tmp_path, changes), key, value_text, expected)


@pytest.mark.parametrize("literal", ["nan", "+nan", "-nan", "inf", "+inf", "-inf"])
@pytest.mark.parametrize(
    ("section", "name"),
    [
        ("job", "round_timeout_seconds"),
        ("job", "fraction_train"),
        ("syftbox", "presence_ttl_seconds"),
        ("model.arrays.w", "scale"),
    ],
)
def test_non_finite_toml_floats_rejected(tmp_path: Path, literal: str, section: str, name: str) -> None:
    text = tomli_w.dumps(variant({f"{section}.{name}": DROP}))
    text = text.replace(f"[{section}]\n", f"[{section}]\n{name} = {literal}\n", 1)
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    err = load_error(path)
    assert err.key == f"{section}.{name}"
    assert isinstance(err.value, float) and not math.isfinite(err.value)
    value_text = "nan" if "nan" in literal else repr(float(literal))
    assert_line(err, f"{section}.{name}", value_text, "a finite number")


# ---- emails, datasites and counts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "@example.org",
        "a@example",
        "a@@example.org",
        "a b@example.org",
        "a@example.org\n",
        "a@example.org ",
        "",
        "a@example.o",
    ],
)
def test_invalid_aggregator_email(tmp_path: Path, email: str) -> None:
    err = table_error(tmp_path, {"syftbox.aggregator_email": email})
    assert_line(err, "syftbox.aggregator_email", repr(email), "an email address like name@example.org")


def test_invalid_datasite_email_names_its_index(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"syftbox.datasites": ["a@example.org", "b@example.org\n", "c"]})
    assert_line(err, "syftbox.datasites[1]", "'b@example.org\\n'", "an email address")


def test_no_datasites(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"syftbox.datasites": []})
    assert_line(err, "syftbox.datasites", "[]", "at least one datasite email")


def test_duplicate_datasites(tmp_path: Path) -> None:
    err = table_error(
        tmp_path,
        {"syftbox.datasites": ["b@example.org", "a@example.org", "b@example.org", "a@example.org"]},
    )
    assert_line(err, "syftbox.datasites", "['a@example.org', 'b@example.org']", "each email listed once")


def test_aggregator_among_datasites(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"syftbox.aggregator_email": "b@example.org"})
    assert_line(err, "syftbox.aggregator_email", "'b@example.org'", "an email not among the datasites")


def test_min_available_nodes_above_datasites(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"job.min_available_nodes": 3})
    assert_line(err, "job.min_available_nodes", "3", "at most the 2 listed datasites")


def test_min_train_nodes_above_min_available_nodes(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"job.min_train_nodes": 2, "job.min_available_nodes": 1})
    assert_line(err, "job.min_train_nodes", "2", "at most job.min_available_nodes (1)")


def test_default_min_nodes_need_two_datasites(tmp_path: Path) -> None:
    err = table_error(
        tmp_path,
        {
            "job.min_train_nodes": DROP,
            "job.min_available_nodes": DROP,
            "syftbox.datasites": ["a@example.org"],
        },
    )
    assert_line(err, "job.min_available_nodes", "2", "at most the 1 listed datasites")


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "has space", "a/b", "x" * 65, "job\n", "é"])
def test_bad_job_name(tmp_path: Path, name: str) -> None:
    err = table_error(tmp_path, {"job.name": name})
    assert_line(err, "job.name", repr(name), "1-64 of letters, digits, '.', '-', '_'")


def test_longest_job_name_accepted(tmp_path: Path) -> None:
    name = "a" + "b-._" * 15 + "xyz"
    assert len(name) == 64
    assert load_config(write(tmp_path, variant({"job.name": name}))).job.name == name


# ---- train_config ----------------------------------------------------------------------------------


def test_train_config_accepts_scalars_and_homogeneous_lists(tmp_path: Path) -> None:
    values = {
        "learning_rate": 0.01,
        "batch_size": 64,
        "optimizer": "sgd",
        "augment": True,
        "layers": [128, 64],
        "rates": [0.1, 0.2],
        "tags": ["a", "b"],
        "flags": [True, False],
        "empty": [],
    }
    config = load_config(write(tmp_path, variant({"job.train_config": values})))
    assert config.job.train_config == values
    assert type(config.job.train_config["layers"]) is list


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1, "a"], "a list whose items are all int, all float, all str, all bool or all bytes"),
        ([1, 2.5], "a list whose items are all int"),
        ([1, True], "a list whose items are all int"),
        ([[1], [2]], "a list whose items are all int"),
        ([{"a": 1}], "a list whose items are all int"),
        ({"inner": 1}, "an int, float, str, bool, bytes or a homogeneous list of one"),
        (dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC), "an int, float, str, bool, bytes"),
        (dt.datetime(2024, 5, 1, 12, 0), "an int, float, str, bool, bytes"),
        (dt.date(2024, 5, 1), "an int, float, str, bool, bytes"),
        (dt.time(7, 32), "an int, float, str, bool, bytes"),
        ([dt.date(2024, 5, 1)], "a list whose items are all int"),
        (float("nan"), "a finite number"),
        (float("-inf"), "a finite number"),
        ([1.0, float("inf")], "a list of finite numbers"),
        ([float("nan")], "a list of finite numbers"),
    ],
)
def test_train_config_rejects(tmp_path: Path, value: object, expected: str) -> None:
    err = table_error(tmp_path, {"job.train_config": {"ok": 1, "bad": value}})
    assert_line(err, "job.train_config.bad", None, expected)
    if isinstance(value, float):
        assert math.isnan(value) == math.isnan(err.value)  # type: ignore[arg-type]
    elif not isinstance(value, list):
        assert err.value == value


def test_train_config_literal_toml_datetime_and_nan(tmp_path: Path) -> None:
    base = tomli_w.dumps(BASE)
    for line, key, expected in [
        ("when = 1979-05-27T07:32:00Z", "job.train_config.when", "an int, float, str, bool, bytes"),
        ("day = 1979-05-27", "job.train_config.day", "an int, float, str, bool, bytes"),
        ("lr = nan", "job.train_config.lr", "a finite number"),
        ("lrs = [0.1, -inf]", "job.train_config.lrs", "a list of finite numbers"),
        ("nested = { a = 1 }", "job.train_config.nested", "an int, float, str, bool, bytes"),
    ]:
        path = tmp_path / "job.toml"
        path.write_text(base + f"\n[job.train_config]\n{line}\n", encoding="utf-8")
        assert_line(load_error(path), key, None, expected)


def test_server_round_in_train_config_rejected(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"job.train_config": {"server-round": 3}})
    assert_line(err, "job.train_config.server-round", "3", "no such key (the server sets it each round)")


def testcheck_config_value_direct() -> None:
    assert check_config_value(b"\x00\xff", "k") == b"\x00\xff"
    assert check_config_value([b"a", b"b"], "k") == [b"a", b"b"]
    assert check_config_value([], "k") == []
    assert check_config_value(-0.0, "k") == 0.0
    original = [1, 2]
    copied = check_config_value(original, "k")
    assert copied == original and copied is not original
    cases: list[tuple[object, str]] = [
        ([b"a", "a"], "a list whose items are all int"),
        ([b"a", bytearray(b"a")], "a list whose items are all int"),
        (bytearray(b"a"), "an int, float, str, bool, bytes or a homogeneous list of one"),
        ((1, 2), "an int, float, str, bool, bytes"),
        (None, "an int, float, str, bool, bytes"),
        (object(), "an int, float, str, bool, bytes"),
        (float("nan"), "a finite number"),
        ([2.0, float("nan")], "a list of finite numbers"),
    ]
    for value, expected in cases:
        with pytest.raises(ConfigError) as info:
            check_config_value(value, "job.train_config.x")
        assert info.value.key == "job.train_config.x"
        assert expected in info.value.line(), info.value.line()


# ---- model source rules ----------------------------------------------------------------------------


def test_random_without_arrays(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"model.arrays": {}})
    assert_line(err, "model.arrays", "{}", "at least one array when model.source = 'random'")


def test_random_with_checkpoint_path(tmp_path: Path) -> None:
    (tmp_path / "init.npz").write_bytes(b"x")
    err = table_error(tmp_path, {"model.checkpoint_path": "init.npz"})
    value = repr(str(tmp_path.resolve() / "init.npz"))
    assert_line(err, "model.checkpoint_path", value, "no checkpoint_path when model.source = 'random'")


def test_checkpoint_without_path(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"model.source": "checkpoint", "model.arrays": DROP})
    assert_line(err, "model.checkpoint_path", "(missing)", "a .npz or .msgpack file (source = 'checkpoint')")


def test_checkpoint_with_arrays(tmp_path: Path) -> None:
    (tmp_path / "init.npz").write_bytes(b"x")
    err = table_error(tmp_path, {"model.source": "checkpoint", "model.checkpoint_path": "init.npz"})
    assert_line(err, "model.arrays", "['w']", "no arrays when source = 'checkpoint'")


def test_checkpoint_nonexistent(tmp_path: Path) -> None:
    changes = {"model.source": "checkpoint", "model.arrays": DROP, "model.checkpoint_path": "missing.npz"}
    err = table_error(tmp_path, changes)
    assert_line(
        err, "model.checkpoint_path", repr(str(tmp_path.resolve() / "missing.npz")), "an existing file"
    )


def test_checkpoint_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.npz").mkdir()
    changes = {"model.source": "checkpoint", "model.arrays": DROP, "model.checkpoint_path": "dir.npz"}
    assert_line(table_error(tmp_path, changes), "model.checkpoint_path", None, "an existing file")


@pytest.mark.parametrize("name", ["weights.pt", "weights.npy", "weights", "weights.NPZ", "weights.npz.bak"])
def test_checkpoint_wrong_suffix(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x")
    changes = {"model.source": "checkpoint", "model.arrays": DROP, "model.checkpoint_path": name}
    err = table_error(tmp_path, changes)
    value = repr(str(tmp_path.resolve() / name))
    assert_line(err, "model.checkpoint_path", value, "a file ending .npz or .msgpack")


@pytest.mark.parametrize("name", ["init.npz", "init.msgpack"])
def test_checkpoint_accepted(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x")  # contents are read when the daemon starts, not here
    changes = {"model.source": "checkpoint", "model.arrays": DROP, "model.checkpoint_path": name}
    config = load_config(write(tmp_path, variant(changes)))
    assert config.model.checkpoint_path == tmp_path.resolve() / name
    assert config.model.arrays == {}


@pytest.mark.parametrize("name", ["a b", "x..y", "w\n", "", "ü", "a" * 129])
def test_bad_array_name(tmp_path: Path, name: str) -> None:
    err = table_error(tmp_path, {"model.arrays": {name: {"shape": [1]}}})
    shown = repr(name) if len(repr(name)) <= 120 else None
    assert_line(err, f"model.arrays.{name}", shown, "an array name of [A-Za-z0-9_.:/-]")


def test_good_array_names(tmp_path: Path) -> None:
    arrays = {"conv1/kernel:0": {"shape": [3, 3]}, "fc.bias": {"shape": [10]}, "a" * 128: {"shape": [1]}}
    config = load_config(write(tmp_path, variant({"model.arrays": arrays})))
    assert set(config.model.arrays) == set(arrays)


# ---- paths -----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "jobs" / "mnist"
    folder.mkdir(parents=True)
    (folder / "init.npz").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    changes = {
        "syftbox.root": "../../SyftBox",
        "state.state_dir": "state/./run",
        "model.source": "checkpoint",
        "model.arrays": DROP,
        "model.checkpoint_path": "init.npz",
    }
    config = load_config(write(folder, variant(changes)))
    resolved = tmp_path.resolve()
    assert config.syftbox.root == resolved / "SyftBox"
    assert config.state.state_dir == resolved / "jobs" / "mnist" / "state" / "run"
    assert config.model.checkpoint_path == resolved / "jobs" / "mnist" / "init.npz"
    assert config.source_path == resolved / "jobs" / "mnist" / "job.toml"


def test_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, variant({"syftbox.root": "~/SyftBox", "state.state_dir": "/var/x"})))
    assert config.syftbox.root == tmp_path / "home" / "SyftBox"
    assert config.state.state_dir == Path("/var/x")


def test_unknown_home_user_is_a_config_error(tmp_path: Path) -> None:
    value = "~fl-orchestrator-no-such-user-7f3a/SyftBox"
    err = table_error(tmp_path, {"syftbox.root": value})
    assert_line(err, "syftbox.root", repr(value), "a resolvable path")


def test_nul_in_path_is_a_config_error(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"state.state_dir": "st\x00ate"})
    assert_line(err, "state.state_dir", "'st\\x00ate'", "a path string")


def test_config_from_table_uses_given_base_dir(tmp_path: Path) -> None:
    config = config_from_table(copy.deepcopy(BASE), base_dir=tmp_path)
    assert config.syftbox.root == (tmp_path / "syftbox").resolve()
    assert config.source_path is None


# ---- the file itself -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = load_error(path)
    assert_line(err, "--config", repr(str(path)), "a readable file (No such file or directory)")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    err = load_error(tmp_path)
    assert_line(err, "--config", repr(str(tmp_path)), "a readable file (Is a directory)")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b'[job]\nname = "caf\xe9"\n')
    assert_line(load_error(path), "--config", repr(str(path)), "UTF-8 text")


@pytest.mark.parametrize(
    "text",
    [
        "[job\nname = 'x'\n",
        "[job]\nname = \n",
        "[job]\nname = 'a'\nname = 'b'\n",
        "[job]\n[job]\n",
        "num_rounds = 01\n",
        "x = 'unterminated\n",
    ],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    assert_line(load_error(path), "--config", repr(str(path)), "valid TOML (")


def test_empty_file_reports_first_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("", encoding="utf-8")
    assert_line(load_error(path), "job.name", "(missing)", "a value")


def test_long_values_are_shortened(tmp_path: Path) -> None:
    err = table_error(tmp_path, {"job.name": "x" * 500})
    line = err.line()
    shown = line.split(" = ", 1)[1].split(": expected", 1)[0]
    assert len(shown) == 120 and shown.endswith("...")


# ---- the shipped configs ---------------------------------------------------------------------------


def test_example_fails_only_on_its_checkpoint() -> None:
    err = load_error(EXAMPLE)
    assert_line(err, "model.checkpoint_path", repr(str(EXAMPLE.parent.resolve() / "initial.npz")), "existing")


def test_example_loads_with_its_checkpoint_present(tmp_path: Path) -> None:
    copy_path = tmp_path / "example.toml"
    shutil.copyfile(EXAMPLE, copy_path)
    np.savez(tmp_path / "initial.npz", w=np.zeros((2, 2), np.float32))
    config = load_config(copy_path)
    assert config.job.name == "mnist-cnn"
    assert config.job.num_rounds == 50
    assert config.job.min_available_nodes == 4
    assert config.job.train_config == {
        "learning_rate": 0.01,
        "batch_size": 64,
        "augment": True,
        "layers": [128, 64],
    }
    assert len(config.syftbox.datasites) == 4
    assert config.syftbox.root == Path("/home/coordinator/SyftBox")
    assert config.model.checkpoint_path == tmp_path.resolve() / "initial.npz"
    assert config.evaluate.global_evaluate == "my_project.validation:evaluate"
    assert config.state.state_dir == Path("/var/lib/fl-orchestrator/mnist-cnn")
    assert config.limits.max_file_bytes == 0  # derived from the model


def test_example_with_random_arrays_loads(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    old = 'source = "checkpoint"              # "random" (with [model.arrays.*]) or "checkpoint"\n'
    old += 'checkpoint_path = "initial.npz"'
    assert old in text
    text = text.replace(old, 'source = "random"\n[model.arrays.dense_kernel]\nshape = [784, 10]')
    path = tmp_path / "example.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    assert config.model.source == "random"
    assert config.model.arrays["dense_kernel"].shape == (784, 10)


def test_demo_loads_as_is() -> None:
    config = load_config(DEMO)
    folder = DEMO.parent.resolve()
    assert config.job.name == "digits-demo"
    assert config.job.round_timeout_seconds == 2.5
    assert config.syftbox.root == folder / "syftbox"
    assert config.state.state_dir == folder / "state"
    assert len(config.syftbox.datasites) == 5
    assert {name: spec.shape for name, spec in config.model.arrays.items()} == {
        "weight": (64, 10),
        "bias": (10,),
    }
    assert config.model.arrays["bias"].init == "zeros"
    assert config.evaluate.global_evaluate == "fl_orchestrator.demo.digits:evaluate"


# ---- the daemon's command line ---------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FL_ORCHESTRATOR_LOG_LEVEL", raising=False)
    monkeypatch.delenv("FL_ORCHESTRATOR_LOG_FORMAT", raising=False)


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("changes", "prefix"),
    [
        ({"job.num_rounds": 0}, "config error: job.num_rounds = 0: expected a value >= 1"),
        ({"job.round_timeout": 5}, "config error: job.round_timeout = 5: expected no such key"),
        ({"syftbox.datasites": []}, "config error: syftbox.datasites = []: expected at least one"),
    ],
)
def test_cli_bad_config_exits_78_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], prefix: str
) -> None:
    path = write(tmp_path, variant(changes))
    assert daemon_main.main(["--config", str(path)]) == EX_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith(prefix), err


@pytest.mark.usefixtures("clean_env")
def test_cli_missing_and_invalid_files_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\n", encoding="utf-8")
    for path, fragment in [(tmp_path / "none.toml", "a readable file"), (bad, "valid TOML")]:
        assert daemon_main.main(["--config", str(path), "--check"]) == 78
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("config error: --config = ") and fragment in err


@pytest.mark.usefixtures("clean_env")
def test_cli_check_prints_resolved_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, variant({"job.train_config": {"lr": 0.5, "layers": [4, 2]}}))
    assert daemon_main.main(["--config", str(path), "--check"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = json.loads(out)
    assert data["job"]["name"] == "mnist-cnn"
    assert data["job"]["train_config"] == {"lr": 0.5, "layers": [4, 2]}
    assert data["syftbox"]["root"] == str(tmp_path.resolve() / "syftbox")
    assert data["syftbox"]["datasites"] == ["a@example.org", "b@example.org"]
    assert data["state"]["state_dir"] == str(tmp_path.resolve() / "state")
    assert data["model"]["arrays"] == {
        "w": {"shape": [2, 3], "dtype": "float32", "init": "normal", "scale": 0.01}
    }
    assert data["source_path"] == str(path.resolve())
    assert data["daemon"]["rescan_interval_seconds"] == 15.0
    assert set(data) == {
        "job",
        "syftbox",
        "model",
        "state",
        "strategy",
        "evaluate",
        "daemon",
        "limits",
        "logging",
        "syft_flwr",
        "region",
        "source_path",
    }


@pytest.mark.usefixtures("clean_env")
def test_cli_check_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon_main.main(["--config", str(DEMO), "--check", "--log-level", "debug"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["job"]["name"] == "digits-demo"
    assert data["syftbox"]["root"] == str(DEMO.parent.resolve() / "syftbox")


def test_config_to_table_renders_bytes_as_hex(tmp_path: Path) -> None:
    table = variant({"job.train_config": {"key": b"\x01\xab", "keys": [b"\x00"]}})
    config = config_from_table(table, base_dir=tmp_path)
    data = config_to_table(config)
    assert data["job"]["train_config"] == {"key": "01ab", "keys": ["00"]}
    json.dumps(data)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--config", "x.toml", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "one of the arguments --config --server-app is required"),
        (["--config"], "argument --config: expected one argument"),
        (["--config", "x.toml", "--log-level", "nope"], "argument --log-level: invalid choice: 'nope'"),
        (["--config", "x.toml", "--log-format", "yaml"], "argument --log-format: invalid choice: 'yaml'"),
    ],
)
def test_cli_usage_errors_exit_64(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit) as info:
        daemon_main.main(argv)
    assert info.value.code == 64
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: fl-orchestratord")
    assert f"fl-orchestratord: error: {fragment}" in err


def test_cli_bad_log_level_from_environment_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FL_ORCHESTRATOR_LOG_LEVEL", "nope")
    monkeypatch.delenv("FL_ORCHESTRATOR_LOG_FORMAT", raising=False)
    path = write(tmp_path, BASE)
    assert daemon_main.main(["--config", str(path), "--check"]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("config error: log level 'nope': expected one of debug, info, warning, error")


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        daemon_main.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("fl-orchestrator ")


@pytest.mark.parametrize(
    ("written", "built_in"),
    [
        ("FedAvg", "fedavg"),
        ("FEDPROX", "fedprox"),
        ("FedTrimmedAvg", "fedtrimmedavg"),
        ("MultiKrum", "multikrum"),
        ("DifferentialPrivacyServerSideFixedClipping", "dp_fixed_clipping"),
    ],
)
def test_flowers_strategy_names_are_accepted_in_any_case(tmp_path: Path, written: str, built_in: str) -> None:
    table = variant({"strategy.name": written})
    if built_in == "dp_fixed_clipping":
        dp = {"clipping_norm": 1.0, "noise_multiplier": 0.1, "num_sampled_clients": 2, "strategy": "FedAvg"}
        table["strategy"].update(dp)
    config = config_from_table(table, base_dir=tmp_path)
    assert config.strategy.name == built_in
    if built_in == "dp_fixed_clipping":
        assert config.strategy.params["strategy"] == "fedavg"


@pytest.mark.usefixtures("clean_env")
def test_check_imports_the_hooks_and_looks_at_the_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --check does everything but run: a typo in a hook fails now, not at round 1.
    table = variant({"evaluate.global_evaluate": "fl_orchestrator.demo.digits:evaluat"})
    (tmp_path / "blocked").write_text("a file where a folder should be")
    table["state"]["state_dir"] = str(tmp_path / "blocked" / "state")
    path = write(tmp_path, table)
    assert daemon_main.main(["--config", str(path), "--check"]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith(
        "config error: evaluate.global_evaluate = 'fl_orchestrator.demo.digits:evaluat'"
    )
    assert "has no callable 'evaluat'" in lines[0]
    blocked = tmp_path / "blocked"
    assert lines[1] == f"config error: state.state_dir = {blocked / 'state'}: {blocked} is not a folder"


def test_python_path_folders_resolve_against_the_job_file_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "jobcode").mkdir()
    path = write(tmp_path, variant({"job.python_path": ["jobcode"]}))
    assert load_config(path).job.python_path == ((tmp_path / "jobcode").resolve(),)
    error = load_error(write(tmp_path, variant({"job.python_path": ["jobcode", "missing"]})))
    assert error.key == "job.python_path[1]" and "an existing folder" in error.line()


def test_a_hook_found_only_through_python_path_passes_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The module is in a folder of its own, on no import path but the job's python_path.
    code = tmp_path / "jobcode"
    code.mkdir()
    (code / "only_here_hooks.py").write_text("def mean(results):\n    return {}\n")
    without = write(tmp_path, variant({"job.metrics_aggregation": "only_here_hooks:mean"}))
    assert daemon_main.main(["--config", str(without), "--check"]) == 78
    assert "job.metrics_aggregation" in capsys.readouterr().err
    table = variant({"job.metrics_aggregation": "only_here_hooks:mean", "job.python_path": ["jobcode"]})
    path = write(tmp_path, table)
    assert daemon_main.main(["--config", str(path), "--check"]) == 0, capsys.readouterr().err
