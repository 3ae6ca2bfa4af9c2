"""The Ray Serve application built from a `ServeConfig`, and deploying it on a Ray cluster.

    from medplib.agents.serve.app import build_app, deploy
    app = build_app(ServeConfig())        # serve.Application: Ingress -> Trunk, GroundingDecoder, experts
    url = deploy(ServeConfig(), address="auto")  # joins (or starts) Ray, starts Serve, runs the app

The graph: one `Ingress` (HTTP) bound to the `Trunk`, the `GroundingDecoder` and an `ExpertHead` per
plugin expert the config hosts apart (`plugin_experts`); each deployment takes its replicas,
autoscaling, resources and concurrency from the config. The built-in experts map onto the model
deployments (`vision_language` runs in the trunk; `pixel_grounding` in the trunk, for its adapter and
`<SEG>`, and in the grounding decoder); a plugin expert's adapter and token run in the trunk, its head
in `Expert-NAME`, or in the trunk when the config does not host it apart. Only experts the model holds
(trained with it) are served: `/v1/experts` lists them, a `capability` must be one of theirs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import httpx
from ray import serve

from medplib.agents.serve.config import ROLE_DEFAULTS, DeploymentConfig, Http, RoleDefaults, ServeConfig
from medplib.agents.serve.deployments import ExpertHead, GroundingDecoder, Trunk
from medplib.agents.serve.ingress import Ingress
from medplib.agents.serve.schemas import DeploymentInfo, ExpertsResponse, HostedExpert
from medplib.core import plugins
from medplib.core.errors import CapacityError, CheckpointError, PluginError
from medplib.core.expert_spec import ExpertSpec, Resources
from medplib.loading import model_config

logger = logging.getLogger("medplib.serve")
BUILTIN_HOSTS = {"vision_language": ["Trunk"], "pixel_grounding": ["Trunk", "GroundingDecoder"]}
# A replica whose constructor keeps failing (a checkpoint that cannot load) fails the deployment after
# this many tries, instead of Serve's default of 20: the error reaches `medplib serve` in seconds.
CONSTRUCTOR_RETRIES = 3


def build_app(config: ServeConfig) -> serve.Application:
    plan = deployment_plan(config)
    options = {name: cfg.serve_options(name, defaults) for name, (cfg, defaults) in plan.items()}
    model_options = {"max_constructor_retry_count": CONSTRUCTOR_RETRIES}
    trunk = Trunk.options(**options["Trunk"], **model_options).bind(config)
    grounding = GroundingDecoder.options(**options["GroundingDecoder"], **model_options).bind(config)
    specs = hosted_plugin_specs(config)
    experts = {
        name: ExpertHead.options(**options[f"Expert-{name}"], **model_options).bind(spec, config)
        for name, spec in specs.items()
    }
    catalog = expert_catalog(config, plan, specs)
    return Ingress.options(**options["Ingress"]).bind(trunk, grounding, experts, config, catalog)


def deployment_plan(config: ServeConfig) -> dict[str, tuple[DeploymentConfig, RoleDefaults]]:
    """Every deployment's name, config and the defaults for what its config leaves out."""
    deployments = config.deployments
    plan: dict[str, tuple[DeploymentConfig, RoleDefaults]] = {
        "Ingress": (deployments.ingress, ROLE_DEFAULTS["ingress"]),
        "Trunk": (deployments.trunk, ROLE_DEFAULTS["trunk"]),
        "GroundingDecoder": (deployments.grounding, ROLE_DEFAULTS["grounding"]),
    }
    for name, spec in hosted_plugin_specs(config).items():
        # A plugin expert asks for its own resources in its spec; the config may override them.
        defaults = ROLE_DEFAULTS["expert"].model_copy(update={"resources": spec.resources})
        plan[f"Expert-{name}"] = (config.plugin_experts[name], defaults)
    return plan


def model_experts(config: ServeConfig) -> list[str]:
    """The experts the served model holds (read from its config, without its weights)."""
    from medplib.core.expert_heads import checkpoint_experts

    return checkpoint_experts(model_config(config.model))


def hosted_plugin_specs(config: ServeConfig) -> dict[str, ExpertSpec]:
    """The specs of the plugin experts the config hosts apart; PluginError for one that is not
    installed, built in, headless or not held by the model (it would have no trained head to serve)."""
    if not config.plugin_experts:
        return {}
    installed = plugins.get_experts()
    held = model_experts(config)
    specs = {}
    for name in config.plugin_experts:
        spec = installed.get(name)
        if spec is None:
            raise PluginError(
                f"plugin expert {name!r} is not installed (installed experts: {', '.join(installed)})"
            )
        if name in BUILTIN_HOSTS:
            raise PluginError(f"{name!r} is built in: configure it under deployments.trunk / .grounding")
        if spec.head is None:
            raise PluginError(f"plugin expert {name!r} has no head to host (its spec names no factory)")
        if name not in held:
            raise PluginError(
                f"plugin expert {name!r} is not in the model {config.model} (its experts: "
                f"{', '.join(held)}), so it has no trained head to serve; train it (medplib train --stage "
                f"expert --expert {name}) and serve that checkpoint"
            )
        specs[name] = spec
    return specs


def expert_catalog(
    config: ServeConfig,
    plan: dict[str, tuple[DeploymentConfig, RoleDefaults]],
    specs: dict[str, ExpertSpec],
) -> ExpertsResponse:
    """What `GET /v1/experts` answers: each expert the model holds with the deployments that run it and
    its head's output schema, and each deployment."""
    experts = []
    for spec in plugins.require_experts(model_experts(config)):
        hosts = BUILTIN_HOSTS.get(spec.name) or (
            ["Trunk", f"Expert-{spec.name}"] if spec.name in specs else ["Trunk"]
        )
        experts.append(HostedExpert(spec=spec, deployments=hosts, output_schema=spec.output_schema()))
    deployments = {
        name: DeploymentInfo(
            replicas=None if cfg.autoscaling_config is not None else cfg.num_replicas or 1,
            autoscaling_config=cfg.autoscaling_config,
            resources=cfg.replica_resources(defaults.resources),
            max_ongoing_requests=cfg.max_ongoing_requests or defaults.max_ongoing_requests,
        )
        for name, (cfg, defaults) in plan.items()
    }
    return ExpertsResponse(experts=experts, deployments=deployments)


def check_resources(config: ServeConfig, cluster: dict[str, float]) -> None:
    """Refuse a replica that no node could hold, e.g. a GPU share on a cluster without GPUs, which
    Serve would otherwise wait for forever. (The cluster's total is the bound: an autoscaling cluster
    that adds GPU nodes on demand should set `check_resources: false`.)"""
    for name, (cfg, defaults) in deployment_plan(config).items():
        asked: Resources = cfg.replica_resources(defaults.resources)
        for resource, amount in (("GPU", asked.num_gpus), ("CPU", asked.num_cpus)):
            if amount > cluster.get(resource, 0.0):
                raise CapacityError(
                    f"deployment {name} asks for {amount:g} {resource} per replica but the Ray cluster has "
                    f"{cluster.get(resource, 0.0):g}; lower it in the serve config (resources.num_"
                    f"{resource.lower()}s) or add nodes"
                )


def check_model_source(config: ServeConfig) -> None:
    """Fail before deploying when the model is neither a preset nor a folder or URI (every replica
    would fail to load it)."""
    from medplib.core.io.sources import is_uri
    from medplib.core.model import MODEL_PRESETS

    source = config.model
    if source not in MODEL_PRESETS and not is_uri(source) and not os.path.isdir(os.path.expanduser(source)):
        raise CheckpointError(
            f"{source} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a checkpoint folder"
        )


def deploy(config: ServeConfig, *, address: str | None = None, ray_init: dict[str, Any] | None = None) -> str:
    """Run the application on Ray (joining the cluster at `address`, or starting one here when None
    and Ray is not initialised yet) and return the API's URL once every deployment is running."""
    import ray

    check_model_source(config)
    for warning in config.exposure_warnings():
        logger.warning("%s", warning)
    if not ray.is_initialized():
        ray.init(address=address, **(ray_init or {}))
    if config.check_resources:
        check_resources(config, ray.cluster_resources())
    start_serve(config.http, request_timeout_s=config.limits.request_timeout_s + 30)
    serve.run(build_app(config), name=config.app_name, route_prefix=config.http.route_prefix)
    return f"{proxy_url(config.http)}{config.http.route_prefix.rstrip('/')}"


def proxy_url(http: Http) -> str:
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}"


def start_serve(http: Http, *, request_timeout_s: float) -> None:
    """Start Serve (or join the running one) with its HTTP proxy up, waiting up to
    `http.startup_timeout_s` for the proxy: Serve gives up after a fixed 60 s, which a loaded machine
    exceeds, while the proxy actor goes on starting."""
    options = {
        "proxy_location": http.proxy_location,
        # Serve's own bound, behind the ingress's: a request never outlives it, whatever happens.
        "http_options": {"host": http.host, "port": http.port, "request_timeout_s": request_timeout_s},
    }
    started = time.monotonic()
    try:
        serve.start(**options)
        return
    except TimeoutError as error:
        logger.warning(
            "Serve's HTTP proxy is slow to start (%s); waiting up to %.0f s", error, http.startup_timeout_s
        )
    health = proxy_url(http) + "/-/healthz"
    while time.monotonic() - started < http.startup_timeout_s:
        try:
            httpx.get(health, timeout=5)  # any answer: the proxy listens (it is healthy once routes come)
            serve.start(**options)  # the controller is running: this connects to it
            return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise CapacityError(
        f"Serve's HTTP proxy on {proxy_url(http)} did not start within {http.startup_timeout_s:.0f} s "
        "(http.startup_timeout_s); is the machine overloaded or the port taken?"
    )
