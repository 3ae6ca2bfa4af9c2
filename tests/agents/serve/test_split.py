"""The serving seam without Ray: the trunk and the grounding decoder, run apart, equal the assistant.

`Trunk` runs `MedPLIB.generate_batch` (the assistant stopped before SAM) and `GroundingDecoder` runs
`CachedGenerator.decode_masks` on a model cut down to SAM and the `<SEG>` head; their outputs merged
as the ingress merges them must be the in-process `answer_batch` results, masks to the bit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import medplib
from medplib.agents.serve.config import ServeConfig
from medplib.agents.serve.deployments import (
    GROUNDING_MODULES,
    GroundingDecoder,
    GroundingItem,
    Trunk,
    completed,
)
from medplib.core.assistant import MedPLIB
from medplib.core.errors import RegionError
from medplib.core.io import load_image
from medplib.core.io.registry_data import dicom_file
from medplib.core.queries import Query
from medplib.core.regions import BoxPrompt, PointPrompt

TOKENS = 4
CONFIG = ServeConfig().with_overrides(load={"device": "cpu"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference() -> MedPLIB:
    return medplib.load("tiny", device="cpu")


@pytest.fixture(scope="module")
def trunk() -> Any:
    return Trunk.func_or_class(CONFIG)


@pytest.fixture(scope="module")
def grounding() -> Any:
    return GroundingDecoder.func_or_class(CONFIG)


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return load_image(dicom_file("CT_small.dcm")).pixels


def merged(trunk: Any, grounding: Any, queries: list[Query]) -> list[Any]:
    """The ingress's merge: the trunk's results, masks from the grounding decoder where `<SEG>`s are."""
    results = []
    for query, output in zip(queries, trunk._generate(queries, {"max_new_tokens": TOKENS}), strict=True):
        grounded = None
        if len(output.seg_hidden_states):
            label = query.text if query.task == "ground" else None
            (grounded,) = grounding._decode([GroundingItem(query.image, output.seg_hidden_states, label)])
        results.append(completed(output.result, grounded, {}, 0.0))
    return results


def comparable(result: Any) -> dict[str, Any]:
    return result.model_dump(exclude={"timings_ms", "cache", "image_source"})


def test_the_split_equals_the_assistant(
    reference: MedPLIB, trunk: Any, grounding: Any, ct: np.ndarray, scripted_lm_head: Any
) -> None:
    other = np.ascontiguousarray(ct[::-1])
    queries = [
        Query(image=ct, text="What modality is this?"),
        Query(image=other, text="the lungs", task="ground"),
        Query(
            image=ct,
            text="Compare {region} with {region}.",
            regions=[BoxPrompt(box=(10, 10, 60, 60)), PointPrompt(points=[(100, 100)])],
        ),
    ]
    expected = reference.answer_batch(queries, max_new_tokens=TOKENS)
    outputs = merged(trunk, grounding, queries)
    assert [comparable(r) for r in outputs] == [comparable(r) for r in expected]
    assert len(outputs[1].masks) == 1 and outputs[1].cache.sam == "miss"

    config = reference.model.config
    seg, eos = config.seg_token_id, config.text_config.eos_token_id
    with scripted_lm_head(reference.model, [seg, 300, seg, eos]):
        expected = reference.answer_batch(queries[:1], max_new_tokens=TOKENS)
    with scripted_lm_head(trunk.assistant.model, [seg, 300, seg, eos]):
        (output,) = merged(trunk, grounding, queries[:1])
    assert len(output.masks) == 2 and comparable(output) == comparable(expected[0])
    assert output.cache.sam == "miss"  # the grounding decoder's own cache: first sight of the CT
    states = np.stack([np.zeros(reference.model.config.text_config.hidden_size, np.float32)])
    (again,) = grounding._decode([GroundingItem(ct, states, "x")])
    assert again.sam_cache == "hit" and len(again.masks) == 1 and again.masks[0].label == "x"


def test_the_grounding_replica_keeps_only_sam_and_the_seg_head(grounding: Any) -> None:
    assert {name for name, _ in grounding.generator.model.named_children()} == set(GROUNDING_MODULES)


def test_a_query_the_trunk_refuses_fails_alone(trunk: Any, ct: np.ndarray) -> None:
    queries = [
        Query(image=ct, text="Where is {region}?"),  # marks a region it does not give
        Query(image=ct, text="What is this?"),
    ]
    refused, answered = trunk._generate(queries, {"max_new_tokens": TOKENS})
    assert isinstance(refused, RegionError) and "{region}" in str(refused)
    assert answered.result.question == "What is this?"


async def test_a_plugin_experts_head_runs_apart_and_equals_the_assistant(
    modality_checkpoint: Any, ct: np.ndarray
) -> None:
    """The trunk leaves a hosted expert's head un-run and returns its token's hidden states; the
    Expert deployment's head (loaded from the checkpoint) turns them into the in-process outputs."""
    from medplib.agents.serve.deployments import ExpertHead
    from medplib.core.plugins import get_experts

    config = ServeConfig(model=str(modality_checkpoint), plugin_experts={"modality": {}}).with_overrides(
        load={"device": "cpu"}
    )
    trunk, head = Trunk.func_or_class(config), ExpertHead.func_or_class(get_experts()["modality"], config)
    asked = {"max_new_tokens": TOKENS}
    queries = [
        Query(image=ct, text=f"Which modality? {i}", capability="modality_classification") for i in (1, 2)
    ]
    outputs = trunk._generate(queries, asked)
    assistant = medplib.load(str(modality_checkpoint), device="cpu")
    for query, output in zip(queries, outputs, strict=True):
        states = output.head_states["modality"]
        assert states.shape == (1, assistant.model.config.text_config.hidden_size)
        assert "modality" not in output.result.outputs and output.result.forced  # an untrained model
        expected = assistant.answer(ct, query.text, capability=query.capability, **asked).outputs["modality"]
        assert await head.run(states) == expected
    # Two requests' states merged in one head call come back to each, and differ: the head reads them.
    merged = await asyncio.gather(*(head.run(output.head_states["modality"]) for output in outputs))
    assert merged[0] != merged[1] and len(merged[0]) == 1


@pytest.mark.parametrize("model", ["tiny", "tiny_moe_checkpoint"])
def test_an_expert_deployment_refuses_a_model_without_its_trained_head(
    model: str, request: pytest.FixtureRequest, example_module: Any
) -> None:
    from medplib.agents.serve.deployments import ExpertHead
    from medplib.core.errors import CheckpointError
    from medplib.core.plugins import get_experts

    source = model if model == "tiny" else str(request.getfixturevalue(model))
    config = ServeConfig(model=source, plugin_experts={"modality": {}}).with_overrides(load={"device": "cpu"})
    expected = "a preset with random weights" if model == "tiny" else "holds no trained head"
    with pytest.raises(CheckpointError, match=expected):
        ExpertHead.func_or_class(get_experts()["modality"], config)
