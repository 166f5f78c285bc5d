"""Build infra/Dockerfile with buildah and run adaptflow inside the image, the way KFP would.

No registry image can be pulled on the build machines, so the test makes its own base: a Debian
bookworm ``minbase`` root (python3 3.11 + python3-venv, the Python the pinned torch wheel is built
for) from ``debootstrap``, imported with ``buildah from scratch``. The base is cached (a tarball in
``~/.cache/adaptflow-container/`` and the ``localhost/adaptflow-test-base`` image), so only the first
run pays for debootstrap. The adaptflow image itself is built fresh every run and removed afterwards.

pip in the build reaches PyPI; when this machine's pip is configured with local wheel stores
(``file://`` indexes, find-links), they are bind-mounted into the build read-only and passed as
build args, so torch comes from local disk. The Dockerfile itself stays the portable one.

Needs root (or rootless buildah), ``buildah`` and ``debootstrap``; skipped without them unless
ADAPTFLOW_REQUIRE_CONTAINER=1. Run with ``make test-container``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "infra" / "build-image.sh"
CACHE = Path(os.environ.get("ADAPTFLOW_CONTAINER_CACHE", Path.home() / ".cache" / "adaptflow-container"))
MIRROR = os.environ.get("ADAPTFLOW_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_KEY = f"{SUITE}-minbase-v1"  # bump to rebuild the cached base
BASE_IMAGE = f"localhost/adaptflow-test-base:{BASE_KEY}"
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE", re.I)
HOST_CA_IN_BUILD = "/run/adaptflow-build-ca.crt"


def _log(msg: str) -> None:
    print(f"[test_container] {msg}", file=sys.stderr, flush=True)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = f"{tool} is not installed (Debian: apt-get install buildah debootstrap)"
        print(f"SKIP reason: {reason}")
        if os.environ.get("ADAPTFLOW_REQUIRE_CONTAINER") == "1":
            pytest.fail(f"ADAPTFLOW_REQUIRE_CONTAINER=1 but {reason}")
        pytest.skip(reason)
    return path


def _run(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    shown = " ".join(c if len(c) < 80 else c[:77] + "..." for c in cmd)
    _log(f"{time.monotonic() - start:7.1f}s rc={proc.returncode} {shown}")
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {shown}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def _image_exists(name: str) -> bool:
    return _run("buildah", "inspect", "--type", "image", name, check=False).returncode == 0


def _make_base_tarball(tarball: Path) -> None:
    """debootstrap a Debian minbase with Python 3.11 into a tarball (the slow part, done once)."""
    debootstrap = _need("debootstrap")
    with tempfile.TemporaryDirectory(prefix="adaptflow-rootfs-", dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(rootfs),
            MIRROR,
            timeout=1800,
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        partial = tarball.with_suffix(".partial")
        _run("tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), ".", timeout=600)
        partial.rename(tarball)


def _ensure_base() -> str:
    """The local base image; made from the cached tarball (or debootstrap) when storage lacks it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / f"{BASE_KEY}.lock"), timeout=3600):
        if _image_exists(BASE_IMAGE):
            _log(f"base {BASE_IMAGE} cached")
            return BASE_IMAGE
        tarball = CACHE / f"{BASE_KEY}.tar"
        if not tarball.exists():
            _log(f"debootstrap {SUITE} minbase + {PACKAGES} from {MIRROR} (first run only)")
            _make_base_tarball(tarball)
        ctr = _run("buildah", "from", "scratch").stdout.strip()
        try:
            _run("buildah", "add", ctr, str(tarball), "/", timeout=600)
            _run(
                "buildah",
                "config",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                "--cmd",
                "python3",
                "--label",
                f"org.opencontainers.image.description=adaptflow test base: Debian {SUITE} minbase + python3",
                ctr,
            )
            _run("buildah", "commit", "--rm", ctr, BASE_IMAGE, timeout=600)
        except BaseException:
            _run("buildah", "rm", ctr, check=False)
            raise
        return BASE_IMAGE


def _pip_config() -> dict[str, str]:
    """This machine's effective pip settings (files and PIP_* env), as `pip config list` shows them."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    conf: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line.strip())
        if m:
            conf[m.group(1)] = m.group(2)  # env lines come last and win, as in pip
    return conf


def _local_pip_args() -> list[str]:
    """Build args + read-only bind mounts that let pip in the build use this machine's wheel stores."""
    conf = _pip_config()
    args: list[str] = []
    mounts: set[str] = set()
    indexes = []
    for url in conf.get("extra-index-url", "").split():
        if url.startswith("file://"):
            path = Path(url.removeprefix("file://"))
            if not path.is_dir():
                continue
            # PEP 503 pages may link files beside the index (../../files/x.whl): mount the parent.
            mounts.add(str(path.parent if path.name == "simple" else path))
        indexes.append(url)
    links = [p for p in conf.get("find-links", "").split() if Path(p).is_dir()]
    mounts.update(links)
    if indexes:
        args += ["--build-arg", f"PIP_EXTRA_INDEX_URL={' '.join(indexes)}"]
    if links:
        args += ["--build-arg", f"PIP_FIND_LINKS={' '.join(links)}"]
    cert = conf.get("cert") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file():  # a TLS-inspecting egress proxy's CA, when there is one
        args += ["--volume", f"{cert}:{HOST_CA_IN_BUILD}:ro", "--build-arg", f"PIP_CERT={HOST_CA_IN_BUILD}"]
    for m in sorted(mounts):
        args += ["--volume", f"{m}:{m}:ro"]
    return args


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    _need("buildah")
    base = _ensure_base()
    tag = f"localhost/adaptflow-test:{uuid.uuid4().hex[:10]}"
    start = time.monotonic()
    try:
        # Through infra/build-image.sh (what `make image` runs), forced onto buildah.
        proc = subprocess.run(
            [
                str(BUILD_SCRIPT),
                "-t",
                tag,
                "-b",
                base,
                "-c",
                GIT_COMMIT,
                "--",
                "--layers=false",
                *_local_pip_args(),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, "BUILDER": "buildah"},
        )
        assert proc.returncode == 0, f"build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        _log(f"image {tag} built in {time.monotonic() - start:.0f}s")
        yield tag
    finally:
        if os.environ.get("ADAPTFLOW_KEEP_TEST_IMAGE") != "1":
            _run("buildah", "rmi", "--force", tag, check=False)


@pytest.fixture()
def container(image: str) -> Iterator[str]:
    ctr = _run("buildah", "from", "--pull-never", image).stdout.strip()
    try:
        yield ctr
    finally:
        _run("buildah", "rm", ctr, check=False)


def _in(ctr: str, *cmd: str, timeout: float = 600) -> str:
    """Run cmd in the container as the image's user, workdir and env; return stdout."""
    return _run("buildah", "run", "--isolation", "chroot", ctr, "--", *cmd, timeout=timeout).stdout


def test_image_config_is_non_root_and_has_no_secrets(image: str) -> None:
    info = json.loads(_run("buildah", "inspect", "--type", "image", image).stdout)
    config = info["OCIv1"]["config"]
    user = config.get("User", "")
    assert user and user.split(":")[0] not in ("", "0", "root"), f"image runs as root: {user!r}"
    assert user.split(":")[0] == "10001"
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    leaked = sorted(k for k in env if SECRET_NAME.search(k))
    assert not leaked, f"credential-like env baked into the image: {leaked}"
    assert not [k for k in env if k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT")]
    assert env["ADAPTFLOW_GIT_COMMIT"] == GIT_COMMIT
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["MPLCONFIGDIR"].startswith(env["HOME"])
    assert config.get("WorkingDir") == "/workspace"
    assert not config.get("Entrypoint"), "KFP sets the command; an ENTRYPOINT would wrap `sh -c`"
    labels = config.get("Labels") or {}
    assert labels["org.opencontainers.image.revision"] == GIT_COMMIT
    assert labels["org.opencontainers.image.title"] == "adaptflow"


def test_cli_and_ingest_run_inside_the_image(container: str) -> None:
    version = _in(container, "adaptflow", "--version")
    assert re.fullmatch(r"adaptflow \d+\.\d+\.\d+\S*\n", version), version

    facts = json.loads(
        _in(
            container,
            "python3",
            "-c",
            "import json, os, shutil, sys, torch, kfp, adaptflow.pipelines;"
            "from adaptflow.tracking import git_commit;"
            "print(json.dumps({'uid': os.getuid(), 'python3': shutil.which('python3'), 'py': sys.version_info[:2],"
            "'torch': torch.__version__, 'cuda_build': torch.version.cuda, 'commit': git_commit(),"
            "'home_w': os.access(os.environ['HOME'], os.W_OK), 'cwd': os.getcwd(),"
            "'mpl_w': os.access(os.environ['MPLCONFIGDIR'], os.W_OK)}))",
        )
    )
    assert facts["uid"] == 10001
    assert facts["python3"].startswith("/opt/adaptflow/venv/"), facts
    assert facts["py"] == [3, 11]
    assert facts["torch"].startswith("2.14.1")
    assert facts["commit"] == GIT_COMMIT
    assert facts["home_w"] and facts["mpl_w"] and facts["cwd"] == "/workspace"

    demo = json.loads(
        _in(container, "adaptflow", "demo-data", "/tmp/demo", "--limit-per-class", "8", "--json")
    )
    assert demo["counts"]["target"] == 40

    out = _in(
        container,
        "python3",
        "-c",
        "import json; from adaptflow.config import load_settings; from adaptflow.steps import ingest_step;"
        "from adaptflow.contracts import Snapshot;"
        "o = ingest_step('/tmp/demo/target', load_settings().to_json(), '', '/tmp/snap');"
        "s = Snapshot.load('/tmp/snap');"
        "print(json.dumps({'fingerprint': o.fingerprint, 'counts': s.counts, 'classes': list(s.class_names)}))",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["fingerprint"]) == 64
    assert sum(result["counts"].values()) == 40
    assert result["classes"] == ["5", "6", "7", "8", "9"]


def test_kfp_lightweight_ingest_component_runs_as_a_pod_would(container: str) -> None:
    """Run the compiled ingest component's own command (sh -c ... python3 -m kfp.dsl.executor_main).

    The output artifact URI is minio://..., which the KFP executor maps to /minio/...: the path a
    non-root image must let its user write (kubeflow/pipelines#10397).
    """
    # The component spec and default config come from the image's own adaptflow (not this checkout's,
    # which may have moved on since the build).
    described = json.loads(
        _in(
            container,
            "python3",
            "-c",
            "import json; from adaptflow.components import pipeline_components;"
            "from adaptflow.config import load_settings;"
            "s = pipeline_components('unused').ingest.component_spec; c = s.implementation.container;"
            "print(json.dumps({'command': list(c.command), 'args': list(c.args),"
            "'inputs': {k: [v.type, v.default] for k, v in (s.inputs or {}).items()},"
            "'outputs': {k: v.type for k, v in (s.outputs or {}).items()},"
            "'config_json': load_settings().to_json()}))",
        )
    )
    command: list[str] = described["command"]
    args: list[str] = described["args"]
    assert "pip install" not in " ".join(command), "install_kfp_package=False: the image holds kfp"
    # Inputs and outputs come from the component's own spec, so the test follows signature changes.
    given: dict[str, object] = {
        "data_uri": "/tmp/kfpdemo/target",
        "config_json": described["config_json"],
        "force": True,
    }
    zero: dict[str, object] = {"String": "", "Boolean": False, "NumberInteger": 0, "NumberDouble": 0.0}
    params = {
        name: given[name] if name in given else (default if default is not None else zero[kind])
        for name, (kind, default) in described["inputs"].items()
    }
    artifact_root = "minio://mlpipeline/v2/artifacts/adaptflow/test-run/ingest"
    outputs: dict[str, str] = described["outputs"]
    executor_input = {
        "inputs": {"parameterValues": params},
        "outputs": {
            "artifacts": {
                name: {
                    "artifacts": [
                        {
                            "name": name,
                            "type": {"schemaTitle": kind.split("@")[0], "schemaVersion": "0.0.1"},
                            "uri": f"{artifact_root}/{name}",
                            "metadata": {},
                        }
                    ]
                }
                for name, kind in outputs.items()
                if kind.startswith("system.")
            },
            "parameters": {
                name: {"outputFile": f"/tmp/kfp/outputs/{name}"}
                for name, kind in outputs.items()
                if not kind.startswith("system.")
            },
            "outputFile": "/tmp/kfp/outputs/executor_output.json",
        },
    }
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in args]
    _in(container, "adaptflow", "demo-data", "/tmp/kfpdemo", "--limit-per-class", "8", "--json")
    _in(container, *command, *args)
    # The executor writes a NamedTuple's fields into executor_output.json (the launcher reads them).
    executor_output = json.loads(_in(container, "cat", "/tmp/kfp/outputs/executor_output.json"))
    fingerprint = executor_output["parameterValues"]["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint), executor_output
    snapshot = json.loads(
        _in(container, "cat", f"/minio/{artifact_root.removeprefix('minio://')}/snapshot/snapshot.json")
    )
    assert snapshot["fingerprint"] == fingerprint
    assert _in(container, "stat", "-c", "%u", "/minio/mlpipeline").strip() == "10001"


def test_base_cache_is_reusable() -> None:
    """The cached base stays after the run (the next run skips debootstrap)."""
    _need("buildah")
    assert _image_exists(BASE_IMAGE) or (CACHE / f"{BASE_KEY}.tar").exists()
    tarball = CACHE / f"{BASE_KEY}.tar"
    if tarball.exists():
        with tarfile.open(tarball) as tar:
            names = set(tar.getnames())
        assert "./usr/bin/python3" in names or "usr/bin/python3" in names
