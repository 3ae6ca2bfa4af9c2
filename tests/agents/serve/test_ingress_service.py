"""The ingress's logic without a cluster: the model deployments are the real classes behind fake handles.

Covers what the Ray tests cannot provoke on demand: a replica that dies twice under a batch (retried),
one that keeps dying (503 after `retries.attempts`), one that hangs (504 at the request timeout, not
later), the decoded-image cache, and concurrent requests gathered into one batch.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from ray import serve
from ray.exceptions import ActorDiedError

from medplib.agents.deployments import GroundingDecoder, Trunk
from medplib.agents.ingress import IngressService
from medplib.agents.schemas import ExpertsResponse, GroundRequest, ServeError, VQARequest
from medplib.agents.serve_config import ServeConfig
from medplib.core.errors import InvalidInputError, RegionError
from medplib.core.results import AnswerResult, GroundingResult, TextDelta
from medplib.trainers.registry_data import dicom_file

CONFIG = ServeConfig().with_overrides(load={"device": "cpu"}, retries={"backoff_s": 0.01})
CT = base64.b64encode(dicom_file("CT_small.dcm").read_bytes()).decode()
DECODING = {"max_new_tokens": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve.batch` reads its replica's `max_ongoing_requests`: this process plays the ingress replica."""
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=512), app_name="test")
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


@pytest.fixture(scope="module")
def replicas() -> tuple[Any, Any]:
    return Trunk.func_or_class(CONFIG), GroundingDecoder.func_or_class(CONFIG)


class Method:
    """A handle's method: `.remote(...)` awaits `call`, after the failures queued in `fail`."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call, self.fail, self.calls = call, [], []

    async def _run(self, *args: Any) -> Any:
        self.calls.append(args)
        if self.fail:
            raise self.fail.pop(0)
        return await self.call(*args)

    def remote(self, *args: Any) -> Any:
        return self._run(*args)


class StreamMethod:
    """A streaming handle's method: `.remote(...)` iterates the replica's async generator."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call, self.calls = call, []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.call(*args)


class Handle:
    def __init__(self, **methods: Method | StreamMethod) -> None:
        self.__dict__.update(methods)

    def options(self, **_: Any) -> Handle:
        return self


def service(replicas: tuple[Any, Any], config: ServeConfig = CONFIG) -> tuple[IngressService, Method, Method]:
    trunk, grounding = replicas
    generate, decode = Method(trunk.generate), Method(grounding.decode)
    ingress = IngressService(
        Handle(generate=generate, generate_stream=StreamMethod(trunk.generate_stream)),
        Handle(decode=decode),
        {},
        config,
        ExpertsResponse(experts=[], deployments={}),
    )
    return ingress, generate, decode


def vqa(question: str = "What is this?", **fields: Any) -> VQARequest:
    return VQARequest(image={"base64": CT}, question=question, decoding=DECODING, **fields)


async def test_a_grounding_request_goes_through_both_deployments(replicas: tuple[Any, Any]) -> None:
    ingress, generate, decode = service(replicas)
    result = await ingress.answer(GroundRequest(image={"base64": CT}, text="the lungs", decoding=DECODING))
    assert (
        len(result.masks) == 1 and result.masks[0].label == "the lungs" and result.image_source == "<base64>"
    )
    assert result.cache.sam in ("hit", "miss") and set(result.timings_ms) >= {"load", "encode_sam", "total"}
    assert len(generate.calls) == len(decode.calls) == 1
    again = await ingress.answer(vqa())
    assert again.timings_ms["load"] < result.timings_ms["load"]  # decoded once, then from the cache
    assert ingress.images.stats().hits == 1


async def test_concurrent_requests_share_trunk_runs(
    replicas: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ingress, _, _ = service(replicas)
    assistant, runs = replicas[0].assistant, []
    original = assistant.generate_batch
    monkeypatch.setattr(
        assistant, "generate_batch", lambda queries, **d: runs.append(len(queries)) or original(queries, **d)
    )
    results = await asyncio.gather(*(ingress.answer(vqa(f"Question {i}?")) for i in range(6)))
    assert [r.question for r in results] == [f"Question {i}?" for i in range(6)]
    assert sum(runs) == 6 and len(runs) < 6  # gathered by serve.batch, merged by the replica


async def test_a_replica_that_dies_under_a_batch_is_retried(replicas: tuple[Any, Any]) -> None:
    ingress, generate, _ = service(replicas)
    generate.fail = [ActorDiedError(), ActorDiedError()]
    assert (await ingress.answer(vqa())).question == "What is this?"
    assert len(generate.calls) == 3


async def test_replicas_that_keep_dying_give_503_after_the_attempts(replicas: tuple[Any, Any]) -> None:
    ingress, generate, _ = service(replicas)
    generate.fail = [ActorDiedError()] * 5
    with pytest.raises(ServeError) as raised:
        await ingress.answer(vqa())
    assert raised.value.status == 503 and "3 times" in str(raised.value) and len(generate.calls) == 3


async def test_a_hanging_deployment_gives_504_at_the_timeout(replicas: tuple[Any, Any]) -> None:
    config = CONFIG.with_overrides(limits={"request_timeout_s": 0.5})
    ingress, generate, _ = service(replicas, config)

    async def hang(*_: Any) -> None:
        await asyncio.sleep(60)

    generate.call = hang
    start = time.perf_counter()
    with pytest.raises(ServeError) as raised:
        await ingress.answer(vqa())
    assert raised.value.status == 504 and time.perf_counter() - start < 2


async def test_bad_input_is_refused_before_any_batch(replicas: tuple[Any, Any]) -> None:
    ingress, generate, _ = service(replicas)
    with pytest.raises(RegionError, match="region 1"):
        await ingress.answer(vqa(regions=[{"kind": "box", "box": [0, 0, 500, 10]}]))
    with pytest.raises(InvalidInputError, match="base64"):
        await ingress.answer(VQARequest(image={"base64": "not base64!"}, question="q"))
    with pytest.raises(RegionError, match="marks 1 region"):  # refused by the trunk, for this query alone
        await ingress.answer(vqa("Where is {region}?"))
    assert len(generate.calls) == 1


async def test_allowed_prefixes_limit_what_a_request_may_read(
    replicas: tuple[Any, Any], tmp_path: Any
) -> None:
    ingress, _, _ = service(replicas, CONFIG.with_overrides(limits={"allowed_uri_prefixes": [str(tmp_path)]}))
    with pytest.raises(InvalidInputError, match="not under a path this server reads"):
        await ingress.answer(VQARequest(image={"uri": str(dicom_file("CT_small.dcm"))}, question="q"))
    escape = f"{tmp_path}/../{tmp_path.name}/../../etc/passwd"
    with pytest.raises(InvalidInputError, match="not under a path"):
        await ingress.answer(VQARequest(image={"uri": escape}, question="q"))


async def test_the_replica_batcher_merges_what_waits_while_it_runs() -> None:
    from medplib.agents.deployments import ReplicaBatcher

    runs: list[tuple[object, list[int]]] = []

    def work(key: object, items: list[int]) -> list[int]:
        time.sleep(0.05)  # the model is busy: the calls below arrive meanwhile
        runs.append((key, items))
        if -1 in items:
            raise RuntimeError("a bug")
        return [item * 10 for item in items]

    batcher = ReplicaBatcher(work, max_rows=3)
    first = asyncio.create_task(batcher.submit("a", [1]))
    await asyncio.sleep(0.01)
    calls = [
        batcher.submit("a", [2, 3]),
        batcher.submit("b", [4]),
        batcher.submit("a", [5]),
        batcher.submit("a", [6]),
    ]
    results = await asyncio.gather(first, *calls)
    assert results == [[10], [20, 30], [40], [50], [60]]
    # [1] alone (it found the model idle); then the waiting "a" calls up to 3 rows; then "b"; then the rest
    assert runs == [("a", [1]), ("a", [2, 3, 5]), ("b", [4]), ("a", [6])]
    with pytest.raises(RuntimeError, match="a bug"):
        await batcher.submit("a", [-1])
    assert await batcher.submit("a", [7]) == [70]  # and it goes on


# ---- POST /v1/ground_volume ------------------------------------------------------------------------


def ball_nifti(tmp_path: Any, make_sphere: Any) -> Any:
    import nibabel as nib
    import numpy as np

    affine = np.array([[0.0, 0, -1.5, 20], [-0.9, 0, 0, 8], [0, 1.1, 0, -3], [0, 0, 0, 1]])
    path = tmp_path / "ball.nii.gz"
    data = np.where(make_sphere((10, 9, 7), (5, 4, 3), 2.5), 200, 20).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


async def test_ground_volume_equals_the_in_process_result(
    replicas: tuple[Any, Any], tmp_path: Any, make_sphere: Any
) -> None:
    import numpy as np

    from medplib.agents.schemas import GroundVolumeRequest

    path = ball_nifti(tmp_path, make_sphere)
    ingress, generate, _ = service(replicas)
    body = {"base64": base64.b64encode(path.read_bytes()).decode()}
    request = GroundVolumeRequest(
        volume=body, text="the ball", axis="coronal", slices="2:7", decoding=DECODING
    )
    response = await ingress.ground_volume(request)
    local = replicas[0].assistant.ground_volume(path, "the ball", axis="coronal", slices="2:7", **DECODING)
    assert [s.index for s in response.result.slices] == [2, 3, 4, 5, 6]
    assert [s.score for s in response.result.slices] == pytest.approx(
        [s.score for s in local.slices], abs=1e-3
    )
    np.testing.assert_array_equal(response.result_with_mask().mask, local.mask)
    assert response.result.affine == local.affine and response.result.volume_ml == local.volume_ml
    assert sum(len(call[0]) for call in generate.calls) == 5 and len(generate.calls) < 5  # batched

    rle = await ingress.ground_volume(request.model_copy(update={"mask_format": "rle"}))
    assert [m.index for m in rle.slice_masks] == [2, 3, 4, 5, 6] and rle.mask_nifti_base64 is None
    assert sum(m.mask.area for m in rle.slice_masks) == local.voxels


async def test_ground_volume_limits_come_before_any_batch(
    replicas: tuple[Any, Any], tmp_path: Any, make_sphere: Any
) -> None:
    from medplib.agents.schemas import GroundVolumeRequest
    from medplib.core.errors import CapacityError, ImageTooLargeError

    path = ball_nifti(tmp_path, make_sphere)
    small = CONFIG.with_overrides(
        limits={"max_volume_voxels": 600, "max_volume_slices": 3, "allowed_uri_prefixes": [str(tmp_path)]}
    )
    ingress, generate, _ = service(replicas, small)
    with pytest.raises(ImageTooLargeError, match=r"volume: .*10x9x7 voxels is over the limit of 600"):
        await ingress.ground_volume(GroundVolumeRequest(volume={"uri": str(path)}, text="x"))
    ingress, generate, _ = service(replicas, CONFIG.with_overrides(limits={"max_volume_slices": 3}))
    with pytest.raises(CapacityError, match="9 slices, over the limit of 3"):
        await ingress.ground_volume(GroundVolumeRequest(volume={"uri": str(path)}, text="x"))
    with pytest.raises(InvalidInputError, match="not under a path this server reads"):
        await service(replicas, small)[0].ground_volume(
            GroundVolumeRequest(volume={"uri": str(dicom_file("CT_small.dcm"))}, text="x")
        )
    assert generate.calls == []


def test_ground_volume_over_http(replicas: tuple[Any, Any], tmp_path: Any, make_sphere: Any) -> None:
    from fastapi.testclient import TestClient

    from medplib.agents.http_api import create_api
    from medplib.agents.schemas import GroundVolumeResponse

    path = ball_nifti(tmp_path, make_sphere)
    ingress, _, _ = service(replicas)
    body = {
        "volume": {"base64": base64.b64encode(path.read_bytes()).decode()},
        "text": "the ball",
        "slices": "3:5",
        "decoding": DECODING,
    }
    with TestClient(create_api(ingress, max_body_bytes=1 << 20, api_key=None)) as client:
        response = client.post("/v1/ground_volume", json=body)
        assert response.status_code == 200, response.text
        parsed = GroundVolumeResponse.model_validate(response.json())
        assert [s.index for s in parsed.result.slices] == [3, 4] and parsed.mask_nifti_base64
        bad = client.post("/v1/ground_volume", json={**body, "slices": "3:50"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_input"
        assert "/v1/ground_volume" in client.get("/openapi.json").json()["paths"]

async def test_a_streamed_request_comes_token_by_token(replicas: tuple[Any, Any]) -> None:
    ingress, generate, decode = service(replicas)
    longer = VQARequest(image={"base64": CT}, question="What is this?", decoding={"max_new_tokens": 8})
    events = [event async for event in ingress.answer_stream(longer)]
    *deltas, result = events
    plain = await ingress.answer(longer)
    assert isinstance(result, AnswerResult) and all(isinstance(d, TextDelta) for d in deltas)
    assert len(deltas) >= 2 and "".join(d.text for d in deltas) == result.text == plain.text
    grounded = [
        event async for event in ingress.answer_stream(GroundRequest(image={"base64": CT}, text="the lungs"))
    ]
    assert isinstance(grounded[-1], GroundingResult) and len(grounded[-1].masks) == 1
    assert len(generate.calls) == 1 and len(decode.calls) == 1  # streams skip the batch, not the decoder
    with pytest.raises(RegionError, match="marks 1 region"):  # refused in the trunk, before any delta
        [event async for event in ingress.answer_stream(vqa("Where is {region}?"))]
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": plain.text}]
    follow_up = await ingress.answer(vqa("And now?", history=history))
    assert follow_up.prompt_tokens > plain.prompt_tokens and follow_up.question == "And now?"
    with pytest.raises(InvalidInputError, match="history ends"):
        await ingress.answer(vqa(history=history[:1]))


def test_the_serve_app_serves_the_page(replicas: tuple[Any, Any]) -> None:
    from fastapi.testclient import TestClient

    from medplib.agents.ingress import Ingress

    ingress, _, _ = service(replicas)
    app = Ingress.func_or_class.__serve_build_asgi_app__(ingress)  # what the replica builds
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "/ui/app.js" in page.text
        assert client.get("/ui/app.js").status_code == 200
        rendered = client.post("/v1/render", json={"image": {"base64": CT}})
        assert rendered.status_code == 200 and rendered.json()["modality"] == "CT"
