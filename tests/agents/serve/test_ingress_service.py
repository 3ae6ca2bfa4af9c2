"""The ingress's logic without a cluster: the model deployments are the real classes behind fake handles.

Covers what the Ray tests cannot provoke on demand: a replica that dies twice under a batch (retried),
one that keeps dying (503 after `retries.attempts`), one that hangs (504 at the request timeout, not
later), the decoded-image cache, and concurrent requests gathered into one batch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from ray import serve
from ray.exceptions import ActorDiedError

from medplib.agents.serve.config import ServeConfig
from medplib.agents.serve.deployments import GroundingDecoder, Trunk
from medplib.agents.serve.ingress import IngressService
from medplib.agents.serve.schemas import ExpertsResponse, GroundRequest, ServeError, VQARequest
from medplib.core.errors import InvalidInputError, RegionError
from medplib.core.io.registry_data import dicom_file
from medplib.core.results import AnswerResult, GroundingResult, TextDelta

CONFIG = ServeConfig().with_overrides(load={"device": "cpu"}, retries={"backoff_s": 0.01})
CT = base64.b64encode(dicom_file("CT_small.dcm").read_bytes()).decode()
DECODING = {"max_new_tokens": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    await ingress.answer(vqa())
    # Decoded once, then from the cache (counted, not timed: a timing comparison flakes under load).
    assert ingress.images.stats().hits == 1 and ingress.images.stats().misses == 1


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
    with pytest.raises(InvalidInputError, match="not under a path this reader may open"):
        await ingress.answer(VQARequest(image={"uri": str(dicom_file("CT_small.dcm"))}, question="q"))
    escape = f"{tmp_path}/../{tmp_path.name}/../../etc/passwd"
    with pytest.raises(InvalidInputError, match="not under a path"):
        await ingress.answer(VQARequest(image={"uri": escape}, question="q"))


async def test_the_replica_batcher_merges_what_waits_while_it_runs() -> None:
    from medplib.agents.serve.deployments import ReplicaBatcher

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

    from medplib.agents.serve.schemas import GroundVolumeRequest

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
    from medplib.agents.serve.schemas import GroundVolumeRequest
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
    with pytest.raises(InvalidInputError, match="not under a path this reader may open"):
        await service(replicas, small)[0].ground_volume(
            GroundVolumeRequest(volume={"uri": str(dicom_file("CT_small.dcm"))}, text="x")
        )
    assert generate.calls == []


def test_ground_volume_over_http(replicas: tuple[Any, Any], tmp_path: Any, make_sphere: Any) -> None:
    from fastapi.testclient import TestClient

    from medplib.agents.serve.http_api import create_api
    from medplib.agents.serve.schemas import GroundVolumeResponse

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

    from medplib.agents.serve.ingress import Ingress

    ingress, _, _ = service(replicas)
    app = Ingress.func_or_class.__serve_build_asgi_app__(ingress)  # what the replica builds
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "/ui/app.js" in page.text
        assert client.get("/ui/app.js").status_code == 200
        rendered = client.post("/v1/render", json={"image": {"base64": CT}})
        assert rendered.status_code == 200 and rendered.json()["modality"] == "CT"


# ---- what a request may read: the image `uri` and a mask region's `source`, through the HTTP app ----


@pytest.fixture
def files(tmp_path: Any) -> Any:
    """data/ (the allowed root) and, beside it, data2/ and outside/ holding readable scans and masks:
    a request that got past the check would be answered, so only the check can refuse it."""
    from PIL import Image

    mask = Image.new("L", (128, 128))
    mask.paste(255, (40, 40, 80, 80))
    for folder in ("data", "data2", "outside"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ct.dcm").write_bytes(dicom_file("CT_small.dcm").read_bytes())
        mask.save(tmp_path / folder / "mask.png")
    (tmp_path / "data" / "link").symlink_to(tmp_path / "outside")
    return tmp_path


@pytest.fixture
def http(replicas: tuple[Any, Any], files: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from medplib.agents.serve.http_api import create_api

    limits = {"allowed_uri_prefixes": [str(files / "data"), "s3://scans"]}
    ingress, _, _ = service(replicas, CONFIG.with_overrides(limits=limits))
    app = create_api(ingress, max_body_bytes=1 << 20, api_key=None)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


OUTSIDE = [
    "{t}/data/../outside/NAME",
    "{t}/data/link/NAME",
    "{t}/data2/NAME",
    "{t}/data/link/NAME::file://",
    "file://{t}/data/link/NAME",
    "file://{t}/data2/NAME",
    "{t}/data/%2e%2e/outside/NAME",
    "{t}\\data\\..\\outside\\NAME",
    "s3://scans-private/NAME",
    "{t}/data/NAME\x00",
]


@pytest.mark.parametrize("reference", OUTSIDE)
def test_a_request_cannot_read_outside_the_allowed_roots(http: Any, files: Any, reference: str) -> None:
    as_image = {"image": {"uri": reference.format(t=files).replace("NAME", "ct.dcm")}, "question": "q"}
    response = http.post("/v1/vqa", json={**as_image, "decoding": DECODING})
    assert response.status_code == 400 and response.json()["error"] == "invalid_input", response.text
    assert response.json()["message"].startswith("image.uri: ")
    region = {"kind": "mask", "source": reference.format(t=files).replace("NAME", "mask.png")}
    as_region = {"image": {"base64": CT}, "question": "q", "regions": [region], "decoding": DECODING}
    response = http.post("/v1/vqa", json=as_region)
    assert response.status_code == 400 and response.json()["error"] == "invalid_input", response.text
    assert "regions[1].source: " in response.json()["message"]


@pytest.mark.parametrize("reference", ["{t}/data/NAME", "file://{t}/data/NAME", "{t}/data/./x/../NAME"])
def test_a_request_reads_what_is_under_an_allowed_root(http: Any, files: Any, reference: str) -> None:
    image = {"uri": reference.format(t=files).replace("NAME", "ct.dcm")}
    region = {"kind": "mask", "source": reference.format(t=files).replace("NAME", "mask.png")}
    response = http.post(
        "/v1/vqa", json={"image": image, "question": "q", "regions": [region], "decoding": DECODING}
    )
    assert response.status_code == 200, response.text
    assert (
        response.json()["image_source"] == str(files / "data" / "ct.dcm")
        and response.json()["num_regions"] == 1
    )


# ---- numbers: every one finite and in range, so none reaches torch as a 500 ------------------------


def ct_request(**fields: Any) -> dict[str, Any]:
    image = {"base64": CT, **fields.pop("image", {})}
    return {"image": image, "question": "q", "decoding": {**DECODING, **fields.pop("decoding", {})}, **fields}


INF, NAN, HUGE = float("inf"), float("nan"), 2**70
HOSTILE_NUMBERS = {
    "temperature inf": ct_request(decoding={"temperature": INF}),
    "temperature nan": ct_request(decoding={"temperature": NAN}),
    "temperature huge": ct_request(decoding={"temperature": 1e308}),
    "seed huge": ct_request(decoding={"temperature": 1.0, "seed": HUGE}),
    "seed negative huge": ct_request(decoding={"temperature": 1.0, "seed": -HUGE}),
    "top_k huge": ct_request(decoding={"temperature": 1.0, "top_k": HUGE}),
    "top_p nan": ct_request(decoding={"temperature": 1.0, "top_p": NAN}),
    "max_new_tokens huge": ct_request(decoding={"max_new_tokens": HUGE}),
    "frame huge": ct_request(image={"frame": HUGE}),
    "slice negative huge": ct_request(image={"slice_index": -HUGE}),
    "volume_index huge": ct_request(image={"volume_index": HUGE}),
    "window inf": ct_request(image={"window": [INF, 400]}),
    "window nan": ct_request(image={"window": [40, NAN]}),
    "point inf": ct_request(regions=[{"kind": "point", "points": [[INF, 3]]}]),
    "point nan": ct_request(regions=[{"kind": "point", "points": [[NAN, 3]]}]),
    "point radius inf": ct_request(regions=[{"kind": "point", "points": [[3, 3]], "radius": INF}]),
    "box nan": ct_request(regions=[{"kind": "box", "box": [0, 0, NAN, 10]}]),
    "box huge": ct_request(regions=[{"kind": "box", "box": [-1e308, -1e308, 1e308, 1e308]}]),
    "polygon inf": ct_request(regions=[{"kind": "polygon", "points": [[0, 0], [INF, 0], [5, 5]]}]),
    "scribble width inf": ct_request(regions=[{"kind": "scribble", "points": [[3, 3]], "width": INF}]),
    "scribble width huge": ct_request(regions=[{"kind": "scribble", "points": [[3, 3]], "width": 1e300}]),
    "uri nul": {"image": {"uri": "/tmp/ct.dcm\x00.png"}, "question": "q"},
    "question lone surrogate": ct_request(question="caf\ud800?"),  # JSON may escape one; UTF-8 cannot hold it
    "uri lone surrogate": {"image": {"uri": "/tmp/caf\ud800.dcm"}, "question": "q"},
    "mask source lone surrogate": ct_request(regions=[{"kind": "mask", "source": "/tmp/\ud800.png"}]),
    "mask source nul": ct_request(regions=[{"kind": "mask", "source": "/tmp/m.png\x00"}]),
}


@pytest.mark.parametrize("name", list(HOSTILE_NUMBERS))
def test_hostile_numbers_and_bytes_get_a_4xx_never_a_500(http: Any, name: str) -> None:
    body = json.dumps(HOSTILE_NUMBERS[name])  # json writes Infinity and NaN, as JavaScript clients may
    response = http.post("/v1/vqa", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    assert set(response.json()) == {"error", "message"}, response.text
