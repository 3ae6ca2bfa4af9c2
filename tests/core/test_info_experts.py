"""`medplib info CHECKPOINT` shows the checkpoint's own experts, not those installed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core.hookspecs import hookimpl
from medplib.router.moe import MOE_FILE

runner = CliRunner()
LATERALITY = {
    "name": "laterality",
    "version": "0.2.0",
    "capabilities": ["laterality_vqa"],
    "special_tokens": ["<LAT>"],
    "adapter": {"r": 4, "alpha": 8},
    "source": "medplib-expert-laterality 0.2.0",
}


class Installed:
    """An expert installed here that no checkpoint below holds."""

    @hookimpl
    def medplib_register_experts(self, register) -> None:
        register({"name": "installed_only", "capabilities": ["vqa"]})


def info(location: Path | str) -> tuple[dict, str]:
    shown = runner.invoke(app, ["info", str(location), "--json"])
    assert shown.exit_code == 0, shown.output
    text = runner.invoke(app, ["info", str(location)])
    assert text.exit_code == 0, text.output
    return json.loads(shown.stdout), text.stdout


def experts_of(described: dict) -> list[tuple[str, str, bool]]:
    return [(e["name"], e["role"], e["installed"]) for e in described["experts"]]


@pytest.fixture
def stage_folders(tiny_moe_checkpoint: Path, tmp_path: Path) -> dict[str, Path]:
    """A stage IV folder (its model the composed checkpoint) and an expert stage's folder (a trunk, and
    the adapters it carries: a built-in's and a plugin's not installed here, the latter active)."""
    moe = tmp_path / "stage4"
    shutil.copytree(tiny_moe_checkpoint, moe / "model")
    (moe / "stage.json").write_text(json.dumps({"stage": "4", "adapters": {}, "specs": {}, "active": "moe"}))
    expert = tmp_path / "expert"
    shutil.copytree(tiny_moe_checkpoint, expert / "model", ignore=shutil.ignore_patterns(MOE_FILE))
    from medplib.core.plugins import get_experts

    vision_language = get_experts()["vision_language"].model_dump(mode="json")
    record = {
        "stage": "3",
        "adapters": {"vision_language": "adapters/vision_language", "laterality": "adapters/laterality"},
        "specs": {"vision_language": vision_language, "laterality": LATERALITY},
        "active": "laterality",
    }
    (expert / "stage.json").write_text(json.dumps(record))
    return {"moe": moe, "expert": expert, "trunk": expert / "model", "checkpoint": tiny_moe_checkpoint}


def test_info_shows_each_checkpoints_own_experts(stage_folders: dict[str, Path], register_plugin) -> None:
    register_plugin(Installed(), "installed_only")
    routed = [("vision_language", "routed", True), ("pixel_grounding", "routed", True)]
    assert experts_of(info(stage_folders["checkpoint"])[0]) == routed
    assert experts_of(info(stage_folders["moe"])[0]) == routed

    described, text = info(stage_folders["expert"])
    assert experts_of(described) == [
        ("vision_language", "adapter", True),
        ("laterality", "active adapter", False),
    ]
    assert described["experts"][1]["adapter"] == "LoRA r4/alpha 8 on gate_proj, up_proj, down_proj"
    (line,) = [line for line in text.splitlines() if line.startswith("laterality")]
    assert "laterality_vqa" in line and "active adapter, NOT INSTALLED here" in line

    described, text = info(stage_folders["trunk"])  # a plain checkpoint: the experts its config holds
    assert experts_of(described) == [("vision_language", "held", True), ("pixel_grounding", "held", True)]

    preset = [name for name, role, _ in experts_of(info("tiny")[0]) if role == "registered"]
    assert preset[:2] == ["vision_language", "pixel_grounding"] and "installed_only" in preset
