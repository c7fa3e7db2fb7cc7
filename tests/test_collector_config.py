"""Static checks of the OpenTelemetry Collector configurations shipped in collector-config/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "collector-config"
CONFIGS = sorted(CONFIG_DIR.glob("*.y*ml"))
KINDS = ("receivers", "processors", "exporters", "connectors")
SIGNALS = ("traces", "metrics", "logs", "profiles")
ENV_REF = re.compile(r"\$\{([^}]*)\}")


def _load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path.name}: not a mapping"
    return config


def _defined(config: dict[str, Any], kind: str) -> set[str]:
    return set(config.get(kind) or {})


def test_there_are_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert {"otelcol.yaml", "otelcol-gateway.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_pipelines_reference_defined_components(path: Path) -> None:
    config = _load(path)
    pipelines = config["service"]["pipelines"]
    assert pipelines, f"{path.name}: no pipelines"
    used: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for name, pipeline in pipelines.items():
        assert name.split("/", 1)[0] in SIGNALS, f"{path.name}: bad pipeline id {name!r}"
        assert pipeline.get("receivers"), f"{path.name}: {name} has no receivers"
        assert pipeline.get("exporters"), f"{path.name}: {name} has no exporters"
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind) or []:
                # a connector is both an exporter of one pipeline and a receiver of another
                known = _defined(config, kind) | _defined(config, "connectors")
                assert component in known, f"{path.name}: {name} uses undefined {kind} {component}"
                used[kind].add(component)
            refs = pipeline.get(kind) or []
            assert len(refs) == len(set(refs)), f"{path.name}: {name} lists a {kind} twice"
    for kind in ("receivers", "processors", "exporters"):
        unused = _defined(config, kind) - used[kind] - _defined(config, "connectors")
        assert not unused, f"{path.name}: defined but unused {kind}: {sorted(unused)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_memory_limiter_first_and_batch_last(path: Path) -> None:
    config = _load(path)
    for name, pipeline in config["service"]["pipelines"].items():
        processors = [p.split("/", 1)[0] for p in pipeline.get("processors") or []]
        assert processors, f"{path.name}: {name} has no processors"
        assert processors[0] == "memory_limiter", (
            f"{path.name}: {name} must start with memory_limiter"
        )
        if "batch" in processors:
            assert processors[-1] == "batch", f"{path.name}: {name}: batch belongs last"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_extensions_and_queue_storage_are_defined(path: Path) -> None:
    config = _load(path)
    extensions = _defined(config, "extensions")
    enabled = set(config["service"].get("extensions") or [])
    assert enabled <= extensions, f"{path.name}: undefined extensions {enabled - extensions}"
    for name, exporter in (config.get("exporters") or {}).items():
        storage = ((exporter or {}).get("sending_queue") or {}).get("storage")
        if storage is not None:
            assert storage in enabled, f"{path.name}: {name} queues to a disabled {storage}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_otlp_receiver_listens_on_standard_ports(path: Path) -> None:
    protocols = _load(path)["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_environment_references_are_well_formed(path: Path) -> None:
    refs = ENV_REF.findall(path.read_text())
    assert refs, f"{path.name}: the backend should come from the environment"
    for ref in refs:
        assert re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?", ref), ref
