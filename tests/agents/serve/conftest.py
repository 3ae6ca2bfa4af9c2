"""One local Ray cluster and one served application for every `ray`-marked test in this folder.

The cluster has two fake GPUs (`num_gpus=2`: Ray schedules on them, torch sees none), so the placement
test can deploy a GPU configuration beside the CPU one the other tests use. Starting Ray (~8 s) and
the application (~25 s: three replicas import torch and load the tiny preset) happens once.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medplib.agents.serve.client import MedPLIBClient
from medplib.agents.serve.config import ServeConfig
from medplib.core.io.registry_data import dicom_file

EXAMPLES = Path(__file__).parents[3] / "examples" / "serve"
API_KEY = "test-key"
TOKENS = 3  # new tokens per answer: the tiny model's answers are noise, and two cores are shared


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ray: starts a local Ray cluster (select with -m ray, skip with -m 'not ray')"
    )


@dataclass(frozen=True)
class Served:
    url: str
    config: ServeConfig
    api_key: str = API_KEY
    tokens: int = TOKENS  # max_new_tokens of the tests' requests

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **options: object) -> MedPLIBClient:
        return MedPLIBClient(self.url, api_key=self.api_key, **options)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def served(ray_cluster: None) -> Served:
    """The CPU example config on a free loopback port, with an API key and small limits to hit."""
    from medplib.agents.serve.app import deploy

    config = ServeConfig.from_yaml(EXAMPLES / "cpu.yaml").with_overrides(
        http={"port": free_port()},
        api_key=API_KEY,
        load={"cache_bytes": 256 << 20},
        limits={"max_body_bytes": 1 << 20, "max_regions": 4, "max_new_tokens": 16, "request_timeout_s": 60},
        deployments={"trunk": {"torch_threads": 1}, "grounding": {"torch_threads": 1}},
    )
    return Served(url=deploy(config), config=config)


@pytest.fixture(scope="session")
def ct_path() -> str:
    """A real chest CT slice, 128 x 128 (pydicom's CT_small.dcm)."""
    return str(dicom_file("CT_small.dcm"))


@pytest.fixture(scope="session")
def mr_base64() -> str:
    """A real MR slice, 64 x 64 (pydicom's MR_small.dcm), as a request carries it."""
    return base64.b64encode(dicom_file("MR_small.dcm").read_bytes()).decode()
