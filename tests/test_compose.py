"""docker-compose.yml cannot run here (no Docker engine), so check what can be checked without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from choreo import Service
from choreo.cli import build_parser, load_service
from services import TARGETS

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def choreo_services() -> dict[str, dict[str, object]]:
    return {name: spec for name, spec in COMPOSE["services"].items() if spec.get("image") == "choreo-example"}


def test_the_choreo_services_are_all_but_kafka_and_postgres() -> None:
    assert set(COMPOSE["services"]) - set(choreo_services()) == {"kafka", "postgres"}


def test_postgres_is_the_official_image_with_a_health_check_and_a_volume() -> None:
    postgres = COMPOSE["services"]["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert "pg_isready" in postgres["healthcheck"]["test"][1]
    assert postgres["volumes"] == ["postgres-data:/var/lib/postgresql/data"] and "postgres-data" in COMPOSE["volumes"]
    env = postgres["environment"]
    service_env = next(iter(choreo_services().values()))["environment"]
    assert service_env["PGPASSWORD"] == env["POSTGRES_PASSWORD"]  # the services can log in
    parser = build_parser()  # the store URL the header comment gives is one `choreo run` accepts
    url = f"postgresql://{env['POSTGRES_USER']}@postgres:5432/{env['POSTGRES_DB']}"
    assert url in (ROOT / "docker-compose.yml").read_text()
    assert parser.parse_args(["run", "services.payment:service", "--store", url]).store == url


def test_kafka_is_the_official_image_in_kraft_mode() -> None:
    kafka = COMPOSE["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]


def test_every_example_service_runs_in_its_own_container() -> None:
    runs = {spec["command"][1]: name for name, spec in choreo_services().items() if spec["command"][0] == "run"}
    assert sorted(runs) == sorted(TARGETS.values())
    for target, container in runs.items():
        service = load_service(target)
        assert isinstance(service, Service) and service.name == container


@pytest.mark.parametrize("name", sorted(choreo_services()))
def test_every_command_is_a_valid_choreo_command(name: str) -> None:
    spec = choreo_services()[name]
    args = build_parser().parse_args(spec["command"])  # argparse exits on an invalid command
    store = getattr(args, "store", None) or spec["environment"]["CHOREO_STORE"]
    assert store.startswith("kafka://kafka:9092")
    assert spec["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_the_image_installs_the_kafka_postgres_and_metrics_extras() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '".[kafka,postgres,metrics]"' in dockerfile and 'ENTRYPOINT ["choreo"]' in dockerfile


def test_every_service_container_is_health_checked_on_its_metrics_port() -> None:
    runs = {name: spec for name, spec in choreo_services().items() if spec["command"][0] == "run"}
    assert len(runs) == len(TARGETS)
    for name, spec in runs.items():
        args = build_parser().parse_args(spec["command"])
        assert args.metrics_port, name
        test = spec["healthcheck"]["test"]
        assert test[0] == "CMD" and f"http://127.0.0.1:{args.metrics_port}/healthz" in " ".join(test), name


def test_payment_runs_as_two_replicas_sharing_its_state_in_postgres() -> None:
    payment = COMPOSE["services"]["payment"]
    assert payment["deploy"]["replicas"] == 2
    assert payment["depends_on"]["postgres"]["condition"] == "service_healthy"
    from choreo.stores.kafka import KafkaSettings

    settings = KafkaSettings.from_url(payment["environment"]["CHOREO_STORE"])
    env = COMPOSE["services"]["postgres"]["environment"]
    assert settings.state == f"postgresql://{env['POSTGRES_USER']}@postgres:5432/{env['POSTGRES_DB']}"
    others = [spec for name, spec in choreo_services().items() if name != "payment" and spec["command"][0] == "run"]
    assert all("deploy" not in spec for spec in others)  # their state is a SQLite file each: one process
