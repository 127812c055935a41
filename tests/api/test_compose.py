"""docker-compose.yml: valid for `docker-compose config` where that tool exists, and structurally what the
deployment promises everywhere (no Docker engine is needed for either)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.compose import COMPOSE_FILE, ROOT, load_compose

VARS = {"POSTGRES_PASSWORD": "p", "SGTM_API_TOKENS": "t"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(VARS)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    ok = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], env={"PATH": "/usr/bin:/bin",
                        **VARS}, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"], env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr  # no default secrets


def test_the_secrets_have_no_defaults() -> None:
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        load_compose({"SGTM_API_TOKENS": "t"})
    with pytest.raises(KeyError, match="SGTM_API_TOKENS"):
        load_compose({"POSTGRES_PASSWORD": "p"})


def test_services_and_exposure(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "mlflow", "migrate", "api", "worker-gpu", "worker-cpu", "beat"}
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"api"}  # MLflow has no authentication: it stays on the internal network
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]  # loopback unless SGTM_BIND says otherwise
    assert load_compose({**VARS, "SGTM_BIND": "0.0.0.0"})["services"]["api"]["ports"] == ["0.0.0.0:8000:8000"]
    for name, service in services.items():
        if name != "migrate":
            assert "healthcheck" in service, f"{name} has no health check"
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: pin the image ({image!r})"


def test_workers_dispatch_and_ordering(compose: dict) -> None:
    services = compose["services"]
    gpu = services["worker-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    assert gpu["environment"]["SGTM_WORKER_QUEUES"] == "gpu"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["SGTM_WORKER_QUEUES"] == "cpu"
    assert services["beat"]["environment"]["SGTM_WORKER_QUEUES"] == "control" and "-B" in services["beat"]["command"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    for name in ("api", "worker-gpu", "beat"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["api"]["environment"]["SGTM_MODE"] == "deployed"
    # the API reads the engine logs the workers write (sgtm logs), and never writes there
    assert services["api"]["volumes"] == ["jobs:/data:ro"] and services["worker-gpu"]["volumes"] == ["jobs:/data"]


def test_mlflow_server_is_pinned_to_the_client_version_on_postgres(compose: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    dockerfile = (ROOT / mlflow["build"]["dockerfile"]).read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = [line.split('"')[1] for line in pyproject.splitlines() if line.strip().startswith('"mlflow-skinny==')]
    assert pinned and pinned[0].replace("mlflow-skinny", "mlflow") in dockerfile
    assert "mlflow-artifacts" not in mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"]


def test_images_install_what_their_code_imports_and_keep_torch_in_its_own_layer() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "requirements.py pyproject.toml service report" in dockerfile  # the API renders sweep reports
    assert "requirements.py pyproject.toml engine service" in dockerfile
    # torch.compile (`runtime.compile`) builds kernels with a host compiler; the engine itself compiles nothing
    worker_deps = dockerfile.split("AS worker-deps\n", 1)[1].split("FROM ", 1)[0]
    assert "apt-get install -y --no-install-recommends g++" in worker_deps
    assert "g++" not in dockerfile.split("AS api-deps\n", 1)[1].split("FROM ", 1)[0]
    for target in ("api", "worker"):  # dependencies first, the source after: a code edit keeps the torch layer
        stage = dockerfile.split(f"AS {target}\n", 1)[1].split("FROM ", 1)[0]
        assert stage.index("COPY --from=source") < stage.index("pip install --no-deps -e .")
        deps = dockerfile.split(f"AS {target}-deps\n", 1)[1].split("FROM ", 1)[0]
        assert "COPY" not in deps and "pip install -r requirements.txt" in deps
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_the_docs_work_offline(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.config import Settings
    from api.main import create_app

    app = create_app(Settings(_env_file=None, api_tokens=["x" * 32], database_url=f"sqlite:///{tmp_path / 'l.db'}",
                              data_root=tmp_path))
    with TestClient(app) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assert "cdn." not in html and "unpkg" not in html and "googleapis" not in html, page
        assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
        assert client.get("/static-offline-docs/redoc.standalone.js").status_code == 200
        headers = client.get("/health").headers
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
