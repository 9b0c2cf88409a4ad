"""The README's configuration reference names exactly the keys the loader accepts."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from fl_orchestrator.config.schema import ArraySpec, JobConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_keys() -> dict[str, set[str]]:
    text = README.read_text(encoding="utf-8")
    reference = text.split("## Configuration reference", 1)[1]
    sections: dict[str, set[str]] = {}
    for block in re.split(r"^### ", reference, flags=re.M)[1:]:
        name = re.match(r"`\[(\w+)\]`", block)
        assert name, block[:40]
        sections[name.group(1)] = set(re.findall(r"^\| `([\w.<>]+)` \|", block, flags=re.M))
    return sections


def schema_keys() -> dict[str, set[str]]:
    hints = typing.get_type_hints(JobConfig)
    sections: dict[str, set[str]] = {}
    for field in dataclasses.fields(JobConfig):
        if field.name == "source_path":
            continue
        section_type = hints[field.name]
        keys = {f.name for f in dataclasses.fields(section_type)}
        if "params" in keys:
            keys = (keys - {"params"}) | {"<parameter>"}
        if section_type.__name__ == "ModelSection":
            keys.discard("arrays")
            keys |= {f"arrays.<name>.{f.name}" for f in dataclasses.fields(ArraySpec)}
        sections[field.name] = keys
    return sections


def test_readme_config_reference_matches_the_schema() -> None:
    assert documented_keys() == schema_keys()
