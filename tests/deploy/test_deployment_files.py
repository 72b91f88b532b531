"""docker-compose.yml, render.yaml and the Dockerfile, checked offline: against their schemas, and
against the project (every command, variable, service and path they name exists)."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from litestar.testing import AsyncTestClient

from api.cli import _parser
from api.settings import ENVIRONMENT_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
RENDER = yaml.safe_load((ROOT / "render.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
RENDER_SCHEMA_SHA256 = "cbecb06e77d9405fddd59a8fa9c2a456ab53e545011fa0af67a15b0b50937264"
# Variables set for PostgreSQL's own container, not read by Tally.
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"}


def _compose_schema() -> dict[str, Any]:
    path = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def _render_schema() -> dict[str, Any]:
    raw = (ROOT / "tests" / "data" / "render-blueprint.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == RENDER_SCHEMA_SHA256  # the vendored copy, unedited
    schema: dict[str, Any] = json.loads(raw)
    return schema


def _errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def _assert_tally_command(argv: list[str]) -> None:
    assert argv[0] == "tally", argv
    _parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option


def test_compose_file_follows_the_compose_specification() -> None:
    assert _errors(_compose_schema(), COMPOSE) == []


def test_render_blueprint_follows_renders_schema() -> None:
    assert _errors(_render_schema(), RENDER) == []


def test_the_schemas_do_reject_mistakes() -> None:
    """The validation above is not vacuous: a misspelt key fails each schema."""
    broken_compose = {
        **COMPOSE,
        "services": {**COMPOSE["services"], "db": {**COMPOSE["services"]["db"], "imagee": "x"}},
    }
    assert _errors(_compose_schema(), broken_compose)
    web = {**RENDER["services"][0], "healthcheckPath": "/health/ready"}
    assert _errors(_render_schema(), {**RENDER, "services": [web]})


def test_compose_stack_is_complete_and_ordered() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"db", "migrate", "seed", "api", "projector"}
    assert "healthcheck" in services["db"]
    # The API is healthy when it can take commands (readiness), whatever the projections do.
    assert "/health/ready" in " ".join(services["api"]["healthcheck"]["test"])
    assert "pgdata" in COMPOSE["volumes"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["seed"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("api", "projector"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on an undefined service {needed}"


def test_compose_commands_and_variables_exist() -> None:
    for name, service in COMPOSE["services"].items():
        if name == "db":
            assert set(service["environment"]) <= POSTGRES_IMAGE_VARIABLES
            continue
        _assert_tally_command(service["command"])
        assert set(service["environment"]) <= set(ENVIRONMENT_VARIABLES), name
        assert service["build"] == "."
        assert (ROOT / "Dockerfile").exists()
    # The API and the projector log in as the application role; migrate and seed as the owner,
    # and migrate makes that role. No password has a default: compose refuses to start without.
    for name in ("api", "projector"):
        env = COMPOSE["services"][name]["environment"]
        assert re.fullmatch(r"postgresql://tally_app:\$\{TALLY_APP_PASSWORD:\?[^}]+\}@db:5432/tally",
                            env["DATABASE_URL"]), env  # fmt: skip
        assert "TALLY_OWNER_DATABASE_URL" not in env
    for name in ("migrate", "seed"):
        env = COMPOSE["services"][name]["environment"]
        assert re.fullmatch(r"postgresql://tally:\$\{POSTGRES_PASSWORD:\?[^}]+\}@db:5432/tally",
                            env["TALLY_OWNER_DATABASE_URL"]), env  # fmt: skip
        assert env["TALLY_APP_ROLE"] == "tally_app"
    assert ":-" not in (ROOT / "docker-compose.yml").read_text().split("PASSWORD")[1]
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_render_services_databases_commands_and_variables_exist() -> None:
    databases = {d["name"] for d in RENDER["databases"]}
    kinds = {s["type"]: s for s in RENDER["services"]}
    assert set(kinds) == {"web", "worker"}
    _assert_tally_command(shlex.split(kinds["web"]["dockerCommand"]))
    _assert_tally_command(shlex.split(kinds["web"]["preDeployCommand"]))
    assert shlex.split(kinds["web"]["preDeployCommand"]) == ["tally", "migrate"]
    _assert_tally_command(shlex.split(kinds["worker"]["dockerCommand"]))
    assert shlex.split(kinds["worker"]["dockerCommand"]) == ["tally", "projector"]
    for service in RENDER["services"]:
        assert (ROOT / service["dockerContext"] / service["dockerfilePath"]).exists()
        groups = {g["name"]: g["envVars"] for g in RENDER["envVarGroups"]}
        keys = {v["key"] for v in service["envVars"] if "key" in v}
        keys |= {
            v["key"] for ref in service["envVars"] if "fromGroup" in ref for v in groups[ref["fromGroup"]]
        }
        assert {"DATABASE_URL", "TALLY_APP_ROLE", "TALLY_APP_PASSWORD"} <= keys
        assert keys <= set(ENVIRONMENT_VARIABLES), service["name"]
        for var in service["envVars"]:
            if "fromDatabase" in var:
                assert var["fromDatabase"]["name"] in databases


async def test_the_health_check_path_answers(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    web = next(s for s in RENDER["services"] if s["type"] == "web")
    response = await client.get(web["healthCheckPath"])
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready"


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    stages = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, flags=re.M)
    assert len(stages) >= 2
    assert all(image.startswith("python:3.11-slim") for image in stages)
    assert re.search(r"^USER\s+(?!root\b)\w+", DOCKERFILE, flags=re.M)
    health = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", DOCKERFILE, flags=re.M | re.S)
    assert health is not None
    assert "/health/live" in health.group(1)
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, flags=re.M)
    assert cmd is not None
    _assert_tally_command(json.loads(cmd.group(1)))
    # No secret is baked in: no ENV names a password, secret, token or database URL.
    env_names = re.findall(
        r"(\b[A-Z_]+)=", " ".join(re.findall(r"^ENV (.*?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S))
    )
    assert env_names
    assert not [n for n in env_names if re.search("PASSWORD|SECRET|TOKEN|DATABASE_URL", n)]
    assert set(env_names) - {"PYTHONUNBUFFERED"} <= set(ENVIRONMENT_VARIABLES)
    # Only runtime dependencies in the final image: the dev extras are never installed.
    assert "[dev]" not in DOCKERFILE
    assert "[embedded]" not in DOCKERFILE


@pytest.mark.parametrize("path", ["migrations", "domain", "commands", "projections", "api"])
def test_the_image_gets_what_it_runs(path: str) -> None:
    assert re.search(rf"^COPY {path} ", DOCKERFILE, flags=re.M), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert path not in ignored
