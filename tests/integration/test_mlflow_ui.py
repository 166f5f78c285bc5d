"""MLflow's own UI reads well for a pipeline run: headless Chromium against a real ``mlflow server``.

One ``adaptflow run`` on the tiny demo set fills an embedded SQLite store; a real ``mlflow server`` serves
that store and headless Chromium (Debian package ``chromium``) renders MLflow's single-page app. The
rendered DOM is checked, and a screenshot of each page is kept under the test's tmp_path (and copied to
``$ADAPTFLOW_SCREENSHOT_DIR`` when it is set).

Routes (MLflow 3.17's hash router):

- experiment: ``#/experiments/<id>?workflowType=machine_learning``. The bare ``#/experiments/<id>`` lands on
  the GenAI "Overview" page (traces, token usage) whatever the experiment's ``mlflow.experimentKind`` tag
  says: the sidebar's "GenAI | Model training" switch decides, read from the ``workflowType`` query
  parameter, else from localStorage (``mlflow.workflowType``), else ``genai``. A fresh browser profile
  has no localStorage, so the query parameter picks the runs list.
- run: ``#/experiments/<id>/runs/<run_id>?workflowType=machine_learning`` (the same switch, for the
  sidebar; the run page renders the same either way).
- model version: ``#/models/<name>/versions/<version>``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_report_browser import CHROMIUM_FLAGS as REPORT_FLAGS

from adaptflow.tracking import run_page_url
from services import require_or_skip

pytestmark = pytest.mark.integration

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]

# test_report_browser.py's flags, with a longer virtual-time budget: the SPA fetches from the server first
CHROMIUM_FLAGS = [
    *(flag for flag in REPORT_FLAGS if not flag.startswith("--virtual-time-budget=")),
    "--virtual-time-budget=15000",
    "--window-size=1400,1000",
]

# what MLflow's GenAI experiment overview shows, and the runs list never does
GENAI_OVERVIEW = ("Token Usage", "Tokens per Trace", "Cost Breakdown")


def chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return require_or_skip("chromium is not installed (Debian: apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}


@pytest.fixture(scope="module")
def browser() -> str:
    """Looked up first, so a machine without Chromium skips before the pipeline runs."""
    return chromium()


@dataclass(frozen=True)
class PipelineRun:
    summary: dict[str, Any]
    data: Path

    @property
    def experiment_id(self) -> str:
        return str(self.summary["mlflow"]["experiment_id"])

    @property
    def run_id(self) -> str:
        return str(self.summary["mlflow"]["run_id"])

    @property
    def model_name(self) -> str:
        return str(self.summary["mlflow"]["model_name"])

    @property
    def version(self) -> str:
        return str(self.summary["registered_version"])

    @property
    def run_name(self) -> str:
        """The name the pipeline gives its parent run: the outcome, not a timestamp."""
        if self.summary["promoted"]:
            return f"{self.model_name}: promoted v{self.version}"
        return f"{self.model_name}: not promoted (v{self.version})"


@pytest.fixture(scope="module")
def pipeline_run(browser: str, tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("mlflow-ui")
    overrides = [
        *tiny_assets.overrides(work / "state"),
        # keep the baseline: the UI reads the same with or without a fine-tuning stage, and it is cheaper
        "baseline.advisor.force=false",
    ]
    args = [*ADAPTFLOW, "run", "--data", str(tiny_assets.target)]
    args += [arg for o in overrides for arg in ("--set", o)]
    result = subprocess.run(
        [*args, "--json"], cwd=work, env=_clean_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"adaptflow run failed ({result.returncode}):\n{result.stderr[-4000:]}"
    summary = json.loads(result.stdout)
    assert summary["mlflow"]["tracking_uri"].startswith("sqlite:///")
    assert summary["registered_version"], summary
    return PipelineRun(summary, Path(tiny_assets.target))


@pytest.fixture(scope="module")
def mlflow_ui(pipeline_run: PipelineRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on the run's SQLite store; its base URL. Stopped, process group and all."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", pipeline_run.summary["mlflow"]["tracking_uri"]),
    ]
    env = {**_clean_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers to outlive it
    log_path = root / "server.log"
    with open(log_path, "ab") as log:  # cwd=root: any ./mlartifacts lands there, not in the checkout
        process = subprocess.Popen(
            command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"mlflow server did not start:\n{log_path.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the whole group: uvicorn's worker too
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@dataclass(frozen=True)
class Page:
    dom: str
    text: str  # the DOM's visible text, whitespace collapsed
    screenshot: Path


def _text(dom: str) -> str:
    body = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body))).strip()


def render(browser: str, url: str, name: str, tmp_path: Path) -> Page:
    """The rendered DOM of ``url`` and a 1400x1000 screenshot of it, from one fresh headless Chromium."""
    shot = tmp_path / f"{name}.png"
    out = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / f'profile-{name}'}",  # fresh: no remembered workflow switch
            f"--screenshot={shot}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    if os.environ.get("ADAPTFLOW_SCREENSHOT_DIR"):
        keep = Path(os.environ["ADAPTFLOW_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, keep / shot.name)
    return Page(out.stdout, _text(out.stdout), shot)


def _assert_not_blank(shot: Path) -> None:
    from PIL import Image, ImageStat

    image = Image.open(shot).convert("L")
    assert image.size == (1400, 1000)
    assert ImageStat.Stat(image).stddev[0] > 10, shot  # text and tables, not an empty page


def test_experiment_is_a_training_experiment(pipeline_run: PipelineRun, mlflow_ui: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_ui)  # through the server the UI talks to
    experiment = client.get_experiment(pipeline_run.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert client.get_run(pipeline_run.run_id).info.run_name == pipeline_run.run_name


def test_experiment_page_lists_the_run_by_its_outcome(
    browser: str, pipeline_run: PipelineRun, mlflow_ui: str, tmp_path: Path
) -> None:
    url = f"{mlflow_ui}/#/experiments/{pipeline_run.experiment_id}?workflowType=machine_learning"
    page = render(browser, url, "experiment", tmp_path)
    excerpt = page.text[:3000]
    assert f"Runs - Experiment {pipeline_run.experiment_id}" in page.text, excerpt  # the page's title
    assert not [marker for marker in GENAI_OVERVIEW if marker in page.text], excerpt  # not the traces page
    assert "Run Name" in page.text and "Dataset" in page.text, excerpt  # the runs table's columns
    assert pipeline_run.run_name in page.text, excerpt  # named by outcome, not by a timestamp
    digest = pipeline_run.summary["dataset"]["fingerprint"][:36]
    assert f"{pipeline_run.data.name} ({digest})" in page.text, excerpt  # the dataset column
    _assert_not_blank(page.screenshot)


def test_run_page_shows_metrics_and_dataset(
    browser: str, pipeline_run: PipelineRun, mlflow_ui: str, tmp_path: Path
) -> None:
    # the link a run's summary prints when MLflow is a tracking server
    url = run_page_url(mlflow_ui, pipeline_run.experiment_id, pipeline_run.run_id)
    assert url is not None and url.endswith("?workflowType=machine_learning")
    page = render(browser, url, "run", tmp_path)
    excerpt = page.text[:4000]
    assert pipeline_run.run_name in page.text, excerpt
    # the metrics table: key then value; the parent run's test_accuracy is the winner's
    shown = re.search(r"\btest_accuracy ([0-9.eE+-]+)", page.text)
    assert shown is not None, excerpt
    summary = pipeline_run.summary
    winner = summary["baseline"] if summary["winner"] == "baseline" else summary["finetune"]
    assert float(shown.group(1)) == pytest.approx(winner["metrics"]["accuracy"], abs=1e-6)
    # the dataset input: the data folder's name and the first 36 characters of its fingerprint
    digest = summary["dataset"]["fingerprint"][:36]
    assert f"{pipeline_run.data.name} ({digest})" in page.text, excerpt
    assert "Status Finished" in page.text, excerpt
    _assert_not_blank(page.screenshot)


def test_model_version_page_renders_the_model_card(
    browser: str, pipeline_run: PipelineRun, mlflow_ui: str, tmp_path: Path
) -> None:
    name, version = pipeline_run.model_name, pipeline_run.version
    page = render(browser, f"{mlflow_ui}/#/models/{name}/versions/{version}", "model-version", tmp_path)
    excerpt = page.text[:4000]
    assert f"{name} v{version} - MLflow" in page.text, excerpt  # the page's title
    # the description is rendered as Markdown: headings, not the raw "## v1: " source
    assert re.search(rf"<h2>\s*v{version}: ", page.dom), excerpt
    assert f"## v{version}" not in page.text, excerpt
    decision = "promoted to champion" if pipeline_run.summary["promoted"] else "not promoted"
    assert re.search(rf"<h3>\s*Gate:\s*<strong>{decision}</strong>", page.dom), excerpt
    assert re.search(r"<h3>\s*Lineage\s*</h3>", page.dom), excerpt
    assert f"pipeline run: {pipeline_run.run_id}" in page.text, excerpt
    assert pipeline_run.summary["dataset"]["fingerprint"][:16] in page.text, excerpt
    if pipeline_run.summary["promoted"]:
        assert "@ champion" in page.text, excerpt  # the alias, on the version
    _assert_not_blank(page.screenshot)
