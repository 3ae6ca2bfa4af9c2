"""`HTTPBackend`: the LangChain tools' `Backend` over the HTTP API (`MedPLIBToolkit.from_url`)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medplib.agents.serve.client import MedPLIBClient
from medplib.agents.serve.client_calls import image_input
from medplib.agents.serve.schemas import ImageInput
from medplib.core.expert_spec import ExpertSpec
from medplib.core.image import DEFAULT_LIMITS
from medplib.core.io.sources import read_source
from medplib.core.regions import MaskPrompt, RegionPrompt
from medplib.core.results import AnswerResult, GroundingResult
from medplib.core.volume_results import VolumeGroundingResult

if TYPE_CHECKING:
    from medplib.agents.image_store import StoredImage


class HTTPBackend:
    """The LangChain tools' `Backend` over the HTTP API.

    With `upload=True` (the default) an image or mask the agent names by path or URI is read here and
    sent as base64, as the in-process backend would read it; `upload=False` sends the reference for
    the server to read (shared storage, and only under the server's `allowed_uri_prefixes`).
    """

    def __init__(self, client: MedPLIBClient, *, upload: bool = True) -> None:
        self.client = client
        self.upload = upload

    def answer(
        self,
        image: StoredImage,
        question: str,
        regions: Sequence[RegionPrompt] = (),
        *,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        stored, prompts = self._image(image), self._regions(regions)
        return self.client.vqa(stored, question, prompts, capability=capability, **decoding)

    def ground(self, image: StoredImage, text: str, **decoding: Any) -> GroundingResult:
        return self.client.ground(self._image(image), text, **decoding)

    async def aanswer(
        self,
        image: StoredImage,
        question: str,
        regions: Sequence[RegionPrompt] = (),
        *,
        capability: str | None = None,
        **decoding: Any,
    ) -> AnswerResult:
        stored, prompts = await asyncio.to_thread(lambda: (self._image(image), self._regions(regions)))
        return await self.client.avqa(stored, question, prompts, capability=capability, **decoding)

    def expert_specs(self) -> list[tuple[ExpertSpec, dict[str, Any] | None]]:
        """The server's experts, each with the JSON schema of its head's output."""
        return [(expert.spec, expert.output_schema) for expert in self.client.experts().experts]

    async def aground(self, image: StoredImage, text: str, **decoding: Any) -> GroundingResult:
        return await self.client.aground(await asyncio.to_thread(self._image, image), text, **decoding)

    def ground_volume(
        self, image: StoredImage, text: str, options: Mapping[str, Any] | None = None, **decoding: Any
    ) -> VolumeGroundingResult:
        response = self.client.ground_volume(self._volume(image), text, **(options or {}), **decoding)
        return response.result_with_mask()

    async def aground_volume(
        self, image: StoredImage, text: str, options: Mapping[str, Any] | None = None, **decoding: Any
    ) -> VolumeGroundingResult:
        volume = await asyncio.to_thread(self._volume, image)
        response = await self.client.aground_volume(volume, text, **(options or {}), **decoding)
        return await asyncio.to_thread(response.result_with_mask)

    def _volume(self, image: StoredImage) -> bytes | str:
        """A volume file is uploaded as an image is; a folder (a DICOM series) is always named."""
        from medplib.core.io.dicom_series import is_folder

        data = image.data
        if isinstance(data, str) and self.upload and not is_folder(data):
            return read_source(data, max_bytes=DEFAULT_LIMITS.max_bytes)
        return data

    def _image(self, image: StoredImage) -> ImageInput:
        data = image.data
        if isinstance(data, str) and self.upload:
            data = read_source(data, max_bytes=DEFAULT_LIMITS.max_bytes)
        return image_input(data, **image.options)

    def _regions(self, regions: Sequence[RegionPrompt]) -> list[RegionPrompt]:
        return [self._inline(region) for region in regions]

    def _inline(self, region: RegionPrompt) -> RegionPrompt:
        if not self.upload or not isinstance(region, MaskPrompt) or region.source is None:
            return region
        data = read_source(region.source, max_bytes=DEFAULT_LIMITS.max_bytes)
        return MaskPrompt(data_base64=base64.b64encode(data).decode("ascii"))

    def __repr__(self) -> str:
        return f"HTTPBackend({self.client.url!r})"
