"""What `medplib serve` deploys: one YAML file, from a laptop's CPUs to a multi-node GPU cluster.

    config = ServeConfig.from_yaml("examples/serve/cpu.yaml")     # or ServeConfig() for the defaults
    config = config.with_overrides(model="small", http={"port": 8080})

Four deployments host the model (see `agents/serve/deployments.py`): `ingress` (HTTP, validation, batching,
routing), `trunk` (CLIP, LLM with its routed experts, region encoder), `grounding` (SAM's image encoder
and mask decoder, fed `<SEG>` hidden states) and one per hosted plugin expert. Each has its own
replicas or autoscaling, resources (fractions of a GPU included) and concurrency; the model
deployments also say how the ingress batches requests for them. The defaults run on one machine's
CPUs; `examples/serve/gpu-cluster.yaml` gives the trunk whole GPUs and SAM a quarter of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from medplib.core.errors import InvalidInputError, validation_message
from medplib.core.expert_spec import Resources
from medplib.core.image import ImageLimits
from medplib.core.io.paths import AllowedRoots
from medplib.core.queries import InferenceLimits

API_KEY_ENV = "MEDPLIB_API_KEY"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Batching(_Strict):
    """How requests are batched for a model deployment.

    The ingress gathers the requests waiting at once, or arriving within `batch_wait_timeout_s`, into
    one call (`serve.batch`), up to `max_concurrent_batches` calls in flight; a replica merges the
    calls waiting while it is busy into its next run, up to `max_batch_size` rows (`ReplicaBatcher`).
    That merge is what batches under load, so the default wait is 0: a wait would only add to the
    latency of a lone request (measured: 8 ms of the 28 ms a request spends inside the app).
    `max_batch_size: 1` turns batching off.
    """

    max_batch_size: int = Field(8, ge=1, le=64)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)
    max_concurrent_batches: int = Field(16, ge=1)


class DeploymentConfig(_Strict):
    """One deployment: replicas (a fixed number, or autoscaling), resources per replica, concurrency."""

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1)")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve's AutoscalingConfig: min_replicas, max_replicas, target_ongoing_requests"
    )
    resources: Resources | None = Field(
        None, description="per replica: num_cpus, num_gpus (fractions allowed), memory_gb; None: the default"
    )
    max_ongoing_requests: int | None = Field(None, ge=1, description="in flight per replica")
    max_queued_requests: int = Field(-1, ge=-1, description="queued per caller before 503; -1 unbounded")

    @field_validator("autoscaling_config")
    @classmethod
    def _serve_accepts(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig  # Serve's own schema is the authority

            try:
                AutoscalingConfig(**value)
            except ValidationError as exc:
                raise ValueError(validation_message(exc)) from None
        return value

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def replica_resources(self, default: Resources) -> Resources:
        return self.resources if self.resources is not None else default

    def serve_options(self, name: str, default: RoleDefaults) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options` for this deployment."""
        options: dict[str, Any] = {
            "name": name,
            "ray_actor_options": self.replica_resources(default.resources).ray_options(),
            "max_ongoing_requests": self.max_ongoing_requests or default.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class ModelDeploymentConfig(DeploymentConfig):
    """A deployment that runs part of the model: also its batching and torch's CPU threads."""

    batching: Batching = Batching()
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per replica")


class RoleDefaults(_Strict):
    resources: Resources
    max_ongoing_requests: int


# What a deployment gets for a field its config leaves out. The ingress is async and holds every
# request while it waits for a batch, so it takes many at once; a model replica runs one batch at a
# time and merges the calls that wait meanwhile, so it takes as many as the ingress sends at once.
ROLE_DEFAULTS = {
    "ingress": RoleDefaults(resources=Resources(num_cpus=0.5), max_ongoing_requests=512),
    "trunk": RoleDefaults(resources=Resources(num_cpus=1), max_ongoing_requests=16),
    "grounding": RoleDefaults(resources=Resources(num_cpus=0.5), max_ongoing_requests=16),
    "expert": RoleDefaults(resources=Resources(), max_ongoing_requests=16),  # resources: the spec's
}


class Deployments(_Strict):
    ingress: DeploymentConfig = DeploymentConfig()
    trunk: ModelDeploymentConfig = ModelDeploymentConfig()
    grounding: ModelDeploymentConfig = ModelDeploymentConfig()


class LoadOptions(_Strict):
    """`medplib.load` options every model replica loads its own copy with."""

    device: str = Field("auto", description="auto (CUDA when the replica has a GPU), cpu, cuda")
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantization: Literal["int8", "int4"] | None = Field(
        None, description="the LLM's linear layers in 8 or 4 bits (docs/performance.md)"
    )
    sam: str | None = Field(None, description="with a LLaVA-1.5 folder as `model`: the SAM checkpoint")
    seed: int = Field(0, description="seed of a preset's random weights")
    cache_bytes: int = Field(1 << 30, ge=0, description="per replica: its image-embedding cache bound")


class Http(_Strict):
    host: str = Field("127.0.0.1", description="0.0.0.0 exposes the API beyond this machine")
    port: int = Field(8000, ge=0, le=65535)
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    route_prefix: str = Field("/", pattern=r"^/[\w/-]*$", description="the API's path under the host")
    # Serve itself waits a fixed 60 s for its HTTP proxy, which a loaded machine can exceed.
    startup_timeout_s: float = Field(300.0, gt=0, description="how long deploying waits for the HTTP proxy")


class ServeLimits(_Strict):
    """The largest request the API takes; anything larger is a 413, never a slow crawl."""

    max_body_bytes: int = Field(32 << 20, ge=1024, description="request body, checked before parsing")
    max_image_bytes: int = Field(64 << 20, ge=1, description="an image read from a URI")
    max_image_pixels: int = Field(16_000_000, ge=1, description="a decoded image, height x width")
    max_regions: int = Field(8, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    max_text_chars: int = Field(4000, ge=1)
    request_timeout_s: float = Field(60.0, gt=0, description="answer, or 504, within this time")
    allowed_uri_prefixes: tuple[str, ...] | None = Field(
        None,
        description="roots of the paths and URIs a request may name (images, mask regions), compared "
        "after resolving '..' and symlinks, component by component; None any, () none: base64 only. "
        "Restrict it on any server others can reach.",
    )
    decoded_cache_bytes: int = Field(256 << 20, ge=0, description="the ingress's decoded-image cache")
    max_volume_bytes: int = Field(512 << 20, ge=1, description="a volume read from a URI (all its files)")
    max_volume_voxels: int = Field(512 * 512 * 1024, ge=1, description="a decoded volume, checked on headers")
    max_volume_slices: int = Field(1024, ge=1, description="slices one /v1/ground_volume request grounds")
    volume_timeout_s: float = Field(900.0, gt=0, description="a volume grounded, or 504, within this time")

    @field_validator("allowed_uri_prefixes")
    @classmethod
    def _roots_parse(cls, roots: tuple[str, ...] | None) -> tuple[str, ...] | None:
        AllowedRoots(roots)  # a root that cannot be judged (a chain, a NUL, ...) is a config error
        return roots

    def inference(self, max_batch: int) -> InferenceLimits:
        return InferenceLimits(
            max_new_tokens=self.max_new_tokens,
            max_regions=self.max_regions,
            max_batch=max_batch,
            max_text_chars=self.max_text_chars,
        )

    def image(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def volume(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_volume_bytes,
            max_pixels=self.max_image_pixels,
            max_voxels=self.max_volume_voxels,
        )


class Retries(_Strict):
    """Calls to a model deployment whose replica died are retried, `attempts` in all, within the timeout."""

    attempts: int = Field(3, ge=1, le=10)
    backoff_s: float = Field(0.2, ge=0, description="first pause; doubled after each failure")


class ServeConfig(_Strict):
    app_name: str = Field("medplib", pattern=r"^[A-Za-z0-9_-]+$")
    model: str = Field("tiny", description="preset, save_pretrained folder or fsspec URI")
    load: LoadOptions = LoadOptions()
    http: Http = Http()
    api_key: SecretStr | None = Field(
        None, description=f"required as 'Authorization: Bearer' or 'X-API-Key'; default ${API_KEY_ENV}"
    )
    limits: ServeLimits = ServeLimits()
    retries: Retries = Retries()
    deployments: Deployments = Deployments()
    plugin_experts: dict[str, ModelDeploymentConfig] = Field(
        default_factory=dict,
        description="plugin experts whose trained heads run in a deployment of their own (Expert-NAME; "
        "resources default to the spec's); the trunk runs the heads of the others",
    )
    check_resources: bool = Field(
        True, description="refuse to deploy a replica no node of the cluster could ever hold"
    )

    @model_validator(mode="after")
    def _batches_fit_the_trunk(self) -> ServeConfig:
        if self.deployments.trunk.batching.max_batch_size > InferenceLimits().max_batch:
            raise ValueError(f"trunk batching.max_batch_size is over {InferenceLimits().max_batch}")
        return self

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ServeConfig:
        import yaml  # installed with ray[serve]

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read the serve config {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{path} is not valid YAML: {exc}") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, where: str = "serve config") -> ServeConfig:
        if not isinstance(data, dict):
            raise InvalidInputError(f"{where}: expected a mapping at the top, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInputError(f"{where}: {validation_message(exc)}") from None

    def with_overrides(self, **changes: Any) -> ServeConfig:
        """A copy with fields replaced; a mapping merges into the field's mapping, at any depth."""
        data = _merge(self.model_dump(mode="python", exclude_unset=True), changes)
        if self.api_key is not None and "api_key" not in changes:
            data["api_key"] = self.api_key
        return self.parse(data, "overrides")

    def exposure_warnings(self) -> list[str]:
        """What is left open on a server others can reach (bound beyond loopback): said at startup."""
        if self.http.host in ("127.0.0.1", "localhost", "::1"):
            return []
        where = f"the API listens on {self.http.host}, beyond this machine"
        warnings = []
        if self.resolved_api_key() is None:
            warnings.append(f"{where}, with no API key: set api_key or ${API_KEY_ENV}")
        if self.limits.allowed_uri_prefixes is None:
            warnings.append(
                f"{where}, and a request may name any file or URI the server can read: "
                "set limits.allowed_uri_prefixes (see docs/security.md)"
            )
        return warnings

    def resolved_api_key(self) -> str | None:
        """The configured key, else ${MEDPLIB_API_KEY}, else None (no key asked for)."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
