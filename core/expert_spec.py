"""`ExpertSpec`: what a plugin declares about an expert, validated before anything is built from it.

An expert is a LoRA adapter on the MLP of the shared LLM plus an optional head. The spec names
everything a trainer, the router and a Ray worker need to rebuild it without importing the plugin's
training code: the adapter's shape, the head's factory as an import path, the loss weights, which
samples it learns from and what it asks for when hosted. It imports neither torch nor transformers,
so listing experts (`medplib experts`) stays fast.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IDENTIFIER = r"^[a-z][a-z0-9_]*$"
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
# Only the MLP is routed per token; attention is shared by every expert (see router/).
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MlpProjection = Literal["gate_proj", "up_proj", "down_proj"]
# What a training sample can exercise (`SampleFilter.tasks`): MeCoVQA's parts, and stage I's captions.
SAMPLE_TASKS = ("caption", "vqa", "region_vqa", "grounding")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(_Strict):
    """A LoRA adapter on the LLM's MLP: W x + (alpha / r) B A x on each target projection."""

    target_modules: tuple[MlpProjection, ...] = MLP_PROJECTIONS
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    layers: tuple[int, ...] | None = None  # decoder layer indices; None = every layer

    @field_validator("target_modules")
    @classmethod
    def _distinct_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"target_modules must be distinct and non-empty, got {list(targets)}")
        return targets

    @field_validator("layers")
    @classmethod
    def _valid_layers(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if layers is not None and (not layers or min(layers) < 0 or len(set(layers)) != len(layers)):
            raise ValueError(f"layers must be distinct non-negative indices, got {list(layers)}")
        return layers

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LossWeights(_Strict):
    """Weights of the losses the expert's samples are trained with (0 = not used)."""

    ce: float = Field(1.0, ge=0)
    bce: float = Field(0.0, ge=0)
    dice: float = Field(0.0, ge=0)
    focal: float = Field(0.0, ge=0)
    head: float = Field(0.0, ge=0)  # the head's own loss (`ExpertHead.loss`) on its trigger tokens


class SampleFilter(_Strict):
    """Which training samples an expert learns from; None on a field means any value."""

    tasks: tuple[str, ...] = ()  # among SAMPLE_TASKS (checked when plugins are listed)
    answer_types: tuple[str, ...] | None = None  # MeCoVQA `answer_type`, e.g. closed, open
    modalities: tuple[str, ...] | None = None  # e.g. CT, MRI, X-Ray
    kinds: tuple[str, ...] | None = None  # question kinds, e.g. modality, plane, segment

    def accepts(
        self,
        task: str,
        answer_type: str | None = None,
        modality: str | None = None,
        kind: str | None = None,
    ) -> bool:
        return (
            task in self.tasks
            and (self.answer_types is None or answer_type in self.answer_types)
            and (self.modalities is None or modality in self.modalities)
            and (self.kinds is None or kind in self.kinds)
        )


class Resources(_Strict):
    """What one hosted replica of the expert asks for (Ray actor options)."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)

    def ray_options(self) -> dict[str, float]:
        options = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}
        if self.memory_gb is not None:
            options["memory"] = self.memory_gb * 2**30
        return options


class ExpertSpec(_Strict):
    """One expert, as a plugin registers it through `medplib_register_experts`."""

    name: str = Field(pattern=IDENTIFIER)
    version: str = "0.1.0"
    description: str = ""
    capabilities: tuple[str, ...] = Field(min_length=1)
    special_tokens: tuple[str, ...] = ()
    adapter: LoraSpec = LoraSpec()
    head: str | None = Field(None, pattern=IMPORT_PATH)  # "pkg.module:factory"
    # "pkg.module:Model": the pydantic type of one head output (what a trigger token yields in a result)
    head_output: str | None = Field(None, pattern=IMPORT_PATH)
    loss_weights: LossWeights = LossWeights()
    trains_on: SampleFilter = SampleFilter()
    resources: Resources = Resources()
    source: str = ""  # filled by the plugin manager: "builtin" or "<distribution> <version>"

    @field_validator("capabilities")
    @classmethod
    def _identifiers(cls, capabilities: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in capabilities if not re.match(IDENTIFIER, c)]
        if bad:
            raise ValueError(f"capabilities must be lower-case identifiers, got {bad}")
        return capabilities

    @field_validator("special_tokens")
    @classmethod
    def _bracketed(cls, tokens: tuple[str, ...]) -> tuple[str, ...]:
        bad = [
            t for t in tokens if not (len(t) > 2 and t.startswith("<") and t.endswith(">") and " " not in t)
        ]
        if bad:
            raise ValueError(f"special tokens look like <NAME> without spaces, got {bad}")
        return tokens

    @field_validator("head_output")
    @classmethod
    def _output_needs_head(cls, output: str | None, info: Any) -> str | None:
        if output is not None and info.data.get("head") is None:
            raise ValueError("head_output names the output of a head, but the spec has no head")
        return output

    def build_head(self, config: Any) -> Any:
        """The expert's head, built by its factory from the composed model's config (None without one).

        The factory is named by import path so a Ray worker can rebuild the head from the spec alone.
        """
        return None if self.head is None else _resolve(self.head)(config)

    def output_model(self) -> type[BaseModel] | None:
        """The pydantic type of one head output (None: the spec names none)."""
        return None if self.head_output is None else _resolve(self.head_output)

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema of one head output, as the API lists it."""
        model = self.output_model()
        return None if model is None else model.model_json_schema()


def _resolve(path: str) -> Any:
    module_name, attribute = path.split(":")
    return getattr(importlib.import_module(module_name), attribute)
