"""The `medplib` command line: help, inspect on real files, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core.io.registry_data import dicom_file, mni152_file

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("inspect", "demo"):
        assert command in result.output


@pytest.mark.parametrize("command", ["inspect", "demo"])
def test_every_command_has_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_console_script_is_installed_and_inspect_skips_torch() -> None:
    script = shutil.which("medplib", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "inspect" in result.stdout
    code = (
        "import sys; from medplib.cli import app\n"
        f"try:\n    app(['inspect', {str(dicom_file('ct_chest'))!r}])\n"
        "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False")


@pytest.mark.parametrize(
    ("name", "size", "modality"),
    [
        ("cr_chest", "1841 x 1955", "CR / CHEST"),
        ("ct_chest", "128 x 128", "CT"),
        ("mr_abdomen_lesion", "484 x 484", "MR / ABDOMEN"),
    ],
)
def test_inspect_real_dicom(name: str, size: str, modality: str) -> None:
    result = invoke("inspect", str(dicom_file(name)))
    assert result.exit_code == 0, result.output
    assert re.search(rf"^size +{size} \(width x height\)$", result.output, re.M)
    assert re.search(rf"^modality +{modality}$", result.output, re.M)


@pytest.mark.parametrize(
    ("axis", "width", "height"), [("axial", 197, 233), ("coronal", 197, 189), ("sagittal", 233, 189)]
)
def test_inspect_mni152_slice_json(axis: str, width: int, height: int) -> None:
    result = invoke("inspect", str(mni152_file("t1")), "--axis", axis, "--slice", "60", "--json")
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output)
    assert (meta["width"], meta["height"]) == (width, height)
    assert meta["format"] == "nifti" and meta["axis"] == axis and meta["slice_index"] == 60
    assert meta["spacing"] == [1.0, 1.0]


def test_inspect_window_preset_and_frame() -> None:
    ct = invoke("inspect", str(dicom_file("ct_chest")), "--window", "bone", "--json")
    assert ct.exit_code == 0, ct.output
    assert json.loads(ct.output)["window"] == [-500.0, 1300.0]
    frames = invoke("inspect", str(dicom_file("mr_multiframe")), "--frame", "3", "--json")
    meta = json.loads(frames.output)
    assert (meta["frame"], meta["num_frames"]) == (3, 10)


def truncated_png(tmp_path: Path) -> Path:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(buffer, "PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[:200])
    return path


def written(tmp_path: Path, name: str, data: bytes) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    return [str(path)]


def dicom_without_pixels(tmp_path: Path) -> list[str]:
    dataset = pydicom.dcmread(dicom_file("ct_chest"))
    del dataset.PixelData
    path = tmp_path / "no_pixels.dcm"
    dataset.save_as(path)
    return [str(path)]


def four_d_nifti(tmp_path: Path) -> list[str]:
    series = nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.eye(4))
    return written(tmp_path, "series.nii", series.to_bytes())


BAD_INPUTS = {
    "missing file": (lambda tmp: [str(tmp / "nope.dcm")], "no such file"),
    "directory": (lambda tmp: [str(tmp)], "directory"),
    "not an image": (lambda tmp: [str(Path(__file__))], "not"),
    "truncated png": (lambda tmp: [str(truncated_png(tmp))], "truncated"),
    "frame out of range": (lambda tmp: [str(dicom_file("mr_multiframe")), "--frame", "10"], "frame"),
    "slice out of range": (lambda tmp: [str(mni152_file("t1")), "--slice", "500"], "slice"),
    "unknown window": (lambda tmp: [str(dicom_file("ct_chest")), "--window", "spleen"], "spleen"),
    "bad window text": (lambda tmp: [str(dicom_file("ct_chest")), "--window", "1,2,3"], "window"),
    "unknown protocol": (lambda tmp: ["nosuchproto://x.png"], "nosuchproto"),
    "truncated dicom": (
        lambda tmp: written(tmp, "half.dcm", dicom_file("ct_chest").read_bytes()[:20000]),
        "pixel data",
    ),
    "dicom without pixel data": (dicom_without_pixels, "no pixel data"),
    "4-d nifti without volume": (four_d_nifti, "volume index"),
    "decompression bomb": (lambda tmp: [str(tmp / "bomb.png")], "limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, png_claiming) -> None:
    (tmp_path / "bomb.png").write_bytes(png_claiming(20_000, 20_000))  # a header claiming 400 Mpx
    make_args, fragment = BAD_INPUTS[case]
    result = runner.invoke(app, ["inspect", *make_args(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0].lower()
    assert "Traceback" not in result.output


# ---- bytes that are not UTF-8, as a shell passes them (Python holds them as lone surrogates) --------

BAD = b"caf\xe9".decode("utf-8", "surrogateescape")
CT = str(dicom_file("ct_chest"))
EVERY_COMMAND = {
    "inspect": ["inspect", BAD],
    "demo": ["demo", "--out", BAD],
    "data build": ["data", "build", BAD],
    "data stats": ["data", "stats", BAD],
    "data check": ["data", "check", BAD],
    "train": ["train", "--stage", "1", "--model", BAD, "--data", ".", "--out", "x"],
    "ask": ["ask", CT, BAD],
    "ask region": ["ask", CT, "q", "--region", BAD],
    "ground": ["ground", CT, BAD],
    "info": ["info", BAD],
    "pipeline": ["pipeline", "--data", BAD, "--out", "x"],
    "eval": ["eval", BAD, "."],
    "plot": ["plot", BAD],
    "serve": ["serve", "--model", BAD],
}


@pytest.mark.parametrize("command", sorted(EVERY_COMMAND))
def test_an_argument_that_is_not_utf8_exits_2_with_one_line(command: str, tmp_path: Path) -> None:
    result = runner.invoke(app, EVERY_COMMAND[command])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not valid UTF-8" in lines[0], lines
    assert "caf\\xe9" in lines[0]


def test_the_shells_bytes_reach_the_question_as_one_line_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "medplib.cli", "ask", CT.encode(), b"caf\xe9?"],
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.decode().strip()
        == "error: QUESTION is not valid UTF-8 text: 'caf\\xe9?'; pass text in UTF-8"
    )


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("train.json", ["data", "stats", "{path}"]),
        ("serve.yaml", ["serve", "--config", "{path}"]),
        ("metrics.jsonl", ["plot", "{path}"]),
    ],
)
def test_a_file_that_is_not_utf8_exits_2_with_one_line(name: str, args: list[str], tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(b'[{"id": "caf\xe9"}]\n')
    result = runner.invoke(app, [arg.format(path=path) for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert name in lines[0] or "UTF-8" in lines[0]


BAD_CONFIG_OPTIONS = {
    "no value": ("region_appearance", "not key=value"),
    "unknown field": ("region_apearance=true", "unknown config options"),
    "switch given text": ("region_appearance=yes", "true or false"),
}


@pytest.mark.parametrize("command", ["train", "pipeline"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIG_OPTIONS))
def test_a_bad_config_option_exits_2_with_one_line_before_training(
    command: str, case: str, tmp_path: Path
) -> None:
    option, fragment = BAD_CONFIG_OPTIONS[case]
    where = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--option", option]
    args = (
        ["train", "--stage", "1", "--model", "tiny", *where] if command == "train" else ["pipeline", *where]
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0].lower(), lines
    assert not (tmp_path / "out").exists()
