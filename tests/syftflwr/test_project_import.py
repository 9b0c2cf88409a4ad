"""`init --from-syft-flwr` against real Flower ServerApps (runs in the syft-flwr environment).

Three projects of the shapes syft-flwr's examples take: a ``server_fn`` ServerApp with
syft-flwr's FedAvgWithModelSaving, initial parameters and a metrics callback (the shape of
fl-diabetes-prediction); a ``@app.main()`` ServerApp calling ``strategy.start`` (the test
app template, unchanged); and a custom loop, which is refused.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("syft_flwr")

from fl_orchestrator.cli.init_syft_flwr import report, write_from_project
from fl_orchestrator.config import load_config
from fl_orchestrator.protocols.syft_flwr.project_import import ImportRefused, read_project

TEMPLATE = Path(__file__).parent / "app_template"
SYFT = """
[tool.syft_flwr]
app_name = "agg@example.org_proj_1700000000"
datasites = ["do1@example.org", "do2@example.org", "do3@example.org"]
aggregator = "agg@example.org"
transport = "syftbox"
"""


def _project(tmp: Path, name: str, server_app: str, config: str) -> Path:
    folder = tmp / name
    package = folder / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "server_app.py").write_text(textwrap.dedent(server_app))
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "1.0"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "{name}.server_app:app"\n\n[tool.flwr.app.config]\n{config}\n{SYFT}'
    )
    return folder


def _args(project: Path, tmp: Path) -> argparse.Namespace:
    return argparse.Namespace(
        from_syft_flwr=project,
        out=tmp / "job" / "job.toml",
        name=None,
        syftbox_root=tmp / "SyftBox",
        state_dir=None,
        force=False,
    )


LEGACY = """
    import numpy as np
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from syft_flwr.strategy import FedAvgWithModelSaving


    def weighted_average(metrics):
        examples = [n for n, _ in metrics]
        return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / sum(examples)}


    def server_fn(context: Context) -> ServerAppComponents:
        params = ndarrays_to_parameters([np.full((4, 3), 0.5, np.float32), np.zeros(3, np.float32)])
        strategy = FedAvgWithModelSaving(
            save_path=context.run_config["save-path"],
            fraction_fit=context.run_config["fraction-fit"],
            fraction_evaluate=0.0,
            min_available_clients=3,
            min_fit_clients=2,
            initial_parameters=params,
            evaluate_metrics_aggregation_fn=weighted_average,
            on_fit_config_fn=lambda rnd: {"lr": 0.01, "local-epochs": 2},
        )
        rounds = context.run_config["num-server-rounds"]
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))


    app = ServerApp(server_fn=server_fn)
"""


def test_a_server_fn_project_with_syft_flwrs_strategy_becomes_a_job(tmp_path: Path) -> None:
    config = f'num-server-rounds = 4\nfraction-fit = 1.0\nsave-path = "{tmp_path / "weights"}"'
    project = _project(tmp_path, "legacyapp", LEGACY, config)
    out, translation = write_from_project(_args(project, tmp_path))
    table = tomllib.loads(out.read_text())
    assert table["job"]["protocol"] == "syft-flwr" and table["job"]["num_rounds"] == 4
    assert table["job"]["min_train_nodes"] == 2 and table["job"]["min_available_nodes"] == 3
    assert table["job"]["fraction_evaluate"] == 0.0
    assert table["job"]["train_config"] == {"lr": 0.01, "local-epochs": 2}
    assert table["strategy"] == {"name": "fedavg"}
    assert table["syftbox"]["datasites"] == ["do1@example.org", "do2@example.org", "do3@example.org"]
    assert table["syft_flwr"] == {"app_name": "agg@example.org_proj_1700000000", "content_format": "legacy"}
    loaded = load_config(out)  # the daemon's own loader takes it as written
    assert loaded.model.checkpoint_path == out.parent / "initial.npz"
    with np.load(out.parent / "initial.npz") as saved:
        np.testing.assert_array_equal(saved["layer_0"], np.full((4, 3), 0.5, np.float32))
    what_by_hand = [what for what, _ in translation.by_hand]
    assert any(w.startswith("evaluate_metrics_aggregation_fn=weighted_average") for w in what_by_hand)
    assert any(w.startswith("what FedAvgWithModelSaving adds") for w in what_by_hand)
    text = report(out, translation)
    assert "FedAvgWithModelSaving" in text and "[job] metrics_aggregation" in text
    with pytest.raises(FileExistsError):
        write_from_project(_args(project, tmp_path))  # never overwritten without --force


def test_the_message_api_template_unchanged_becomes_a_job(tmp_path: Path) -> None:
    project = tmp_path / "fltapp"
    shutil.copytree(TEMPLATE, project)
    (project / "pyproject.toml").write_text((project / "pyproject.toml").read_text() + SYFT)
    translation = read_project(project)
    assert translation.strategy == "fedavg"
    assert translation.job["num_rounds"] == 3 and translation.job["round_timeout_seconds"] == 60.0
    assert translation.job["min_train_nodes"] == 2 and translation.job["fraction_train"] == 1.0
    assert translation.train_config == {"lr": 0.1}
    assert [a.shape for a in translation.arrays.values()] == [(4, 3), (3,)]
    assert [what for what, _ in translation.by_hand] == ["strategy.start(evaluate_fn=...)"]
    # Its owners run @app.train() handlers: the Message API's arrays/config records.
    assert translation.content_format == "message"
    assert (
        "the owners' ClientApp",
        "[syft_flwr] content_format = 'message' (flt_app.client_app:app has @app handlers)",
    ) in translation.translated


CUSTOM = """
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()


    @app.main()
    def main(grid: Grid, context) -> None:
        for node in grid.get_node_ids():
            print(node)
"""


def test_a_custom_loop_is_refused_with_the_reason(tmp_path: Path) -> None:
    project = _project(tmp_path, "loopapp", CUSTOM, "num-server-rounds = 1")
    with pytest.raises(ImportRefused, match="runs a loop of its own"):
        read_project(project)
    assert not (tmp_path / "job").exists()


def test_a_project_that_was_never_bootstrapped_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path, "plainapp", CUSTOM, "num-server-rounds = 1")
    text = (project / "pyproject.toml").read_text().split("[tool.syft_flwr]")[0]
    (project / "pyproject.toml").write_text(text)
    with pytest.raises(ImportRefused, match=r"syft_flwr\.bootstrap"):
        read_project(project)
