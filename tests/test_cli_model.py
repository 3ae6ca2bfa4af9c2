"""`medplib ask`, `ground` and `info` on real images, tiny preset: each prompt kind, JSON, overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medplib.cli import app
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.core.masks import save_png
from medplib.core.results import AnswerResult, GroundingResult

runner = CliRunner()
# What the public components of the paper's model add up to: CLIP ViT-L/14-336, LLaMA-7B, SAM ViT-B
# (image encoder at 1024 px, prompt encoder, mask decoder) and MedPLIB's projector, region adapter and
# <SEG> head (tests/core/model/test_presets.py derives it).
PAPER_COMPONENTS_TOTAL = 7_178_270_184


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real DICOM (the abdomen MR with a liver lesion, 484 x 484) and a real PNG (pydicom's chest CT,
    128 x 128, written in its canonical rendering), each with a region mask of its size."""
    folder = tmp_path_factory.mktemp("cli-images")
    png = folder / "ct.png"
    save_png(load_image(dicom_file("CT_small.dcm")).pixels, png)
    files = {"dicom": dicom_file("mr_abdomen_lesion"), "png": png}
    for kind, path in files.items():
        height, width = load_image(path).size
        mask = np.zeros((height, width), dtype=bool)
        mask[height // 4 : height // 2, width // 3 : width // 2] = True
        save_png(mask, folder / f"{kind}-mask.png")
    return {**files, "dicom-mask": folder / "dicom-mask.png", "png-mask": folder / "png-mask.png"}


def prompt_args(kind: str, image: str, images: dict[str, Path]) -> list[str]:
    return {
        "point": ["--point", "60,50", "--point", "5,5,0"],
        "box": ["--box", "20,30,90,100"],
        "region": ["--region", str(images[f"{image}-mask"])],
    }[kind]


def invoke(*args: str):
    return runner.invoke(app, [*args, "--max-new-tokens", "3"])


@pytest.mark.parametrize("prompt", ["point", "box", "region"])
@pytest.mark.parametrize("image", ["dicom", "png"])
def test_ask_and_ground_with_each_prompt_kind(
    image: str, prompt: str, images: dict[str, Path], tmp_path: Path
) -> None:
    path, regions = str(images[image]), prompt_args(prompt, image, images)
    asked = invoke("ask", path, "What is in {region}?", *regions, "--json")
    assert asked.exit_code == 0, asked.output
    answer = AnswerResult.model_validate_json(asked.stdout)
    size = load_image(path).size
    assert answer.num_regions == 1 and answer.image_size == size
    assert len(answer.masks) == answer.text.count("<SEG>")
    overlay = tmp_path / "overlay.png"
    grounded = invoke("ground", path, "the lesion", *regions, "--json", "--overlay", str(overlay))
    assert grounded.exit_code == 0, grounded.output
    result = GroundingResult.model_validate_json(grounded.stdout)
    assert len(result.masks) >= 1 and result.masks[0].mask.size == size
    with Image.open(overlay) as written:
        assert written.format == "PNG" and written.size == (size[1], size[0])


def test_text_output_names_the_untrained_model_and_the_stages(images: dict[str, Path]) -> None:
    result = invoke("ground", str(images["png"]), "the heart", "--box", "10,10,60,60")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model    tiny (random weights")
    assert any(line.startswith("mask 1 ") and "forced" in line for line in lines)
    assert any(line.startswith("timings ") and "encode_sam" in line for line in lines)


BAD = {
    "box outside the image": (["ask", "{png}", "What?", "--box", "10,10,500,20"], "outside"),
    "missing region mask": (["ask", "{png}", "What?", "--region", "/no/such/mask.png"], "no such file"),
    "region mask of another size": (["ask", "{png}", "What?", "--region", "{dicom-mask}"], "484x484"),
    "bad point": (["ground", "{png}", "it", "--point", "1,2,3,4"], "point"),
    "empty question": (["ask", "{png}", " "], "empty"),
    "broken image": (["ask", "{broken}", "What?"], "png"),
    "weights that do not ship": (["ask", "{png}", "What?", "--model", "medplib-7b"], "checkpoint"),
    "unknown model": (["info", "no-such-model"], "neither a preset"),
    "unknown quantization": (["ask", "{png}", "What?", "--quantization", "int3"], "quantization"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case: str, images: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    names = {**{k: str(v) for k, v in images.items()}, "broken": str(broken)}
    args, fragment = BAD[case]
    result = runner.invoke(app, [arg.format(**names) if arg.startswith("{") else arg for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0].lower(), result.stderr


def test_max_new_tokens_over_the_limit_exits_2(images: dict[str, Path]) -> None:
    result = runner.invoke(app, ["ask", str(images["png"]), "What?", "--max-new-tokens", "100000"])
    assert result.exit_code == 2 and "limit" in result.stderr


def test_info_7b_counts_the_papers_components() -> None:
    result = runner.invoke(app, ["info", "medplib-7b", "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    total = described["parameters"]["total"]
    assert abs(total - PAPER_COMPONENTS_TOTAL) / PAPER_COMPONENTS_TOTAL < 0.02
    assert described["special_tokens"]["<SEG>"] == 32007 and described["special_tokens"]["<image>"] == 32000
    assert {"vision_language", "pixel_grounding"} <= {expert["name"] for expert in described["experts"]}
    text = runner.invoke(app, ["info", "medplib-7b"])
    assert f"total {total:>,}" in " ".join(text.stdout.split()) and "sam_mask_decoder" in text.stdout


def test_ask_with_int8_weights_and_info_counts_quantised_bytes(images: dict[str, Path]) -> None:
    result = runner.invoke(
        app, ["ask", str(images["png"]), "What?", "--quantization", "int8", "--max-new-tokens", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert AnswerResult.model_validate_json(result.stdout).new_tokens >= 1
    sizes = {}
    for mode in ("none", "int8", "int4"):
        shown = runner.invoke(
            app, ["info", "medplib-7b", "--dtype", "bfloat16", "--quantization", mode, "--json"]
        )
        assert shown.exit_code == 0, shown.output
        sizes[mode] = json.loads(shown.stdout)["bytes"]
    llm = {mode: size["language_model"] / 1e9 for mode, size in sizes.items()}
    # 6.74 B parameters: 13.5 GB in bf16; its linear layers (all but the 0.13 B embeddings) at 1 byte, or
    # at half a byte plus a bf16 scale and offset per 32 (5 bits in all).
    assert 13.4 < llm["none"] < 13.6 and 6.8 < llm["int8"] < 7.0 and 4.2 < llm["int4"] < 4.5
    assert sizes["int4"]["sam_mask_decoder"] == sizes["none"]["sam_mask_decoder"]


def test_help_lists_the_model_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert all(command in result.output for command in ("ask", "ground", "info"))


def test_quantize_writes_a_checkpoint_that_loads_as_it_was_saved(
    images: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    import medplib
    from medplib.core.model.quantization import Int4Linear, Int8Linear

    sizes = {}
    for mode, kind in (("int8", Int8Linear), ("int4", Int4Linear)):
        out = tmp_path / mode
        result = runner.invoke(app, ["quantize", "tiny", str(out), "--mode", mode])
        assert result.exit_code == 0, result.output
        assert f"at {mode}" in result.stdout and (out / "quantized.safetensors").is_file()
        sizes[mode] = (out / "quantized.safetensors").stat().st_size
        loaded = medplib.load(out, device="cpu")  # the API: no quantization to name
        assert loaded.quantization == mode
        assert isinstance(loaded.model.get_submodule("language_model.lm_head"), kind)
        direct = medplib.load("tiny", device="cpu", quantization=mode)
        saved = loaded.model.state_dict()
        for name, tensor in direct.model.state_dict().items():  # the same codes, scales and weights
            assert torch.equal(saved[name], tensor), name
        answer = ["ask", str(images["png"]), "What?", "--model", str(out), "--max-new-tokens", "3", "--json"]
        shown = runner.invoke(app, answer)
        assert shown.exit_code == 0, shown.output
        expected = direct.answer(str(images["png"]), "What?", max_new_tokens=3)
        assert AnswerResult.model_validate_json(shown.stdout).text == expected.text
    full = sum(p.numel() * p.element_size() for p in medplib.load("tiny", device="cpu").model.parameters())
    assert sizes["int4"] < sizes["int8"] < full
    refused = runner.invoke(
        app, ["ask", str(images["png"]), "What?", "--model", str(tmp_path / "int4"), "--quantization", "int8"]
    )
    assert refused.exit_code == 2 and "int4" in refused.output
