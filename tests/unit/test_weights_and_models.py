from __future__ import annotations

import http.server
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adaptflow.config import BackboneSpec
from adaptflow.errors import ConfigError, WeightsError
from adaptflow.models import build_model, list_backbones
from adaptflow.models.factory import Classifier, build_torchvision, count_parameters
from adaptflow.models.weights import read_weights_file, resolve_weights, save_weights_file


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a temp folder, like an internal weights mirror."""
    root = tmp_path / "mirror"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("resnet9000", 3)
    assert "resnet18" in (info.value.hint or "")


def test_factory_registry_refuses_duplicates() -> None:
    from adaptflow.models.factory import BACKBONES, register_backbone

    with pytest.raises(ValueError, match="registered twice"):
        register_backbone(BACKBONES["resnet18"])


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_builds_features_and_blocks(name: str) -> None:
    model = build_model(name, 4).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    assert len(model.blocks()) >= 4
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_file_weights_verified_and_cached(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = BackboneSpec(name="resnet18", weights_uri=tiny_assets.weights_uri, sha256=tiny_assets.sha256)
    resolved = resolve_weights(spec, tmp_path / "cache")
    assert resolved.sha256 == tiny_assets.sha256
    assert resolved.preprocessing.input_size == 32
    assert resolved.meta["source_classes"] == ["0", "1", "2", "3", "4"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # the source task's features load into a fresh classifier for the target task
    model = Classifier("resnet18", 5)
    assert resolved.state_dict is not None
    model.load_backbone_state(resolved.state_dict)


def test_wrong_hash_is_an_error_and_nothing_is_cached(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = BackboneSpec(name="resnet18", weights_uri=tiny_assets.weights_uri, sha256="0" * 64)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_weights(spec, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_https_mirror_with_torchvision_hash_prefix_names(http_root, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, root = http_root
    good = f"resnet18-{tiny_assets.sha256[:8]}.safetensors"
    shutil.copy(tiny_assets.weights, root / good)
    resolved = resolve_weights(BackboneSpec(name="resnet18", weights_uri=f"{url}/{good}"), tmp_path / "cache")
    assert resolved.sha256 == tiny_assets.sha256
    # a file whose name claims another hash prefix is refused
    bad = "resnet18-deadbeef.safetensors"
    shutil.copy(tiny_assets.weights, root / bad)
    with pytest.raises(WeightsError, match="expected deadbeef"):
        resolve_weights(BackboneSpec(name="resnet18", weights_uri=f"{url}/{bad}"), tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists() or list((tmp_path / "cache2").iterdir()) == []


def test_unreachable_mirror_is_a_clear_error(tmp_path: Path) -> None:
    from adaptflow.errors import StoreError

    spec = BackboneSpec(name="resnet18", weights_uri="http://127.0.0.1:9/resnet18-abcdef12.pth")
    with pytest.raises(StoreError, match="cannot download"):
        resolve_weights(spec, tmp_path)


def test_torchvision_mirror_file_pth_state_dict(tmp_path: Path) -> None:
    state = build_torchvision("resnet18").state_dict()
    path = tmp_path / "resnet18-plain.pth"
    sha = save_weights_file(state, path, {})
    resolved = resolve_weights(
        BackboneSpec(name="resnet18", weights_uri=str(path), sha256=sha), tmp_path / "c"
    )
    assert resolved.state_dict is not None and set(resolved.state_dict) == set(state)


class _TouchOnUnpickle:
    """Unpickling this runs ``Path.touch(sentinel)``: proof that a loader executed pickled code."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.sentinel,))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip-archive", "legacy-archive"])
def test_pickled_objects_are_refused_and_never_run(tmp_path: Path, zipped: bool) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"state_dict": {"conv1.weight": torch.zeros(1), "fc.bias": _TouchOnUnpickle(sentinel)}}
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    assert not sentinel.exists()
    refused: WeightsError | None = None
    try:
        resolve_weights(BackboneSpec(name="resnet18", weights_uri=str(path)), tmp_path / "c")
    except WeightsError as error:
        refused = error
    # checked first: an unsafe loader runs the payload whether or not it raises afterwards
    assert not sentinel.exists(), "loading the weights file executed code from its pickle"
    assert refused is not None, "a file holding arbitrary pickled objects was accepted as weights"
    assert re.search(r"cannot load \S*evil\.pth safely", refused.message), refused.message
    assert "pickled objects are refused" in (refused.hint or "")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("damage", ["empty", "text", "truncated"])
def test_corrupt_weights_files_are_a_weights_error(tmp_path: Path, suffix: str, damage: str) -> None:
    """The narrowed except clause still turns damaged files (empty, not weights, cut short) into a WeightsError."""
    good = tmp_path / f"good{suffix}"
    save_weights_file({"w": torch.ones(64)}, good, {})
    whole = good.read_bytes()
    data = {"empty": b"", "text": b"this is text, not weights", "truncated": whole[: len(whole) // 2]}[damage]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=rf"cannot load bad{re.escape(suffix)} safely"):
        read_weights_file(path)


def test_a_bug_while_loading_is_not_disguised_as_a_refused_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "good.pth"
    save_weights_file({"w": torch.ones(4)}, path, {})

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("a bug, not a bad file")

    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(TypeError, match="a bug, not a bad file"):
        read_weights_file(path)


def test_torchvision_enum_is_resolved_for_preprocessing_and_mirror_hash(http_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The air-gapped path: enum names the file and its hash; the bytes come from a mirror."""
    url, root = http_root
    (root / "resnet18-f37072fd.pth").write_bytes(b"not the real weights")
    spec = BackboneSpec(name="resnet18", weights="IMAGENET1K_V1", weights_uri=f"{url}/resnet18-f37072fd.pth")
    with pytest.raises(WeightsError, match="expected f37072fd"):
        resolve_weights(spec, tmp_path / "c")


def test_unknown_enum_member_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        resolve_weights(BackboneSpec(name="resnet18", weights="IMAGENET9K"), tmp_path)
    assert "IMAGENET1K_V1" in (info.value.hint or "")


def test_architecture_mismatch_is_reported(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = BackboneSpec(name="resnet34", weights_uri=tiny_assets.weights_uri, sha256=tiny_assets.sha256)
    with pytest.raises(WeightsError, match="trained for resnet18"):
        resolve_weights(spec, tmp_path)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network (every HTTP(S) request goes to a closed local port) and an empty torch hub cache."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    # urllib reads the proxy variables when it builds its global opener: build it again, under them
    monkeypatch.setattr(urllib.request, "_opener", None)
    return tmp_path


def test_the_default_backbone_is_pretrained_and_offline_it_names_both_ways_out(offline: Path) -> None:
    from adaptflow.config import Settings

    spec = Settings().backbone
    assert spec.weights == "DEFAULT" and spec.weights_uri is None
    with pytest.raises(WeightsError) as caught:
        resolve_weights(spec, offline / "cache")
    assert "cannot get the pretrained resnet18 weights DEFAULT" in str(caught.value)
    hint = caught.value.hint or ""
    assert "backbone.weights_uri" in hint and "backbone.sha256" in hint and "backbone.weights=none" in hint


@pytest.mark.parametrize("weights", ["none", "None", None])
def test_from_scratch_only_when_asked_and_labelled_so(weights: str | None, offline: Path) -> None:
    from adaptflow.models.weights import RANDOM_INIT, init_label

    resolved = resolve_weights(BackboneSpec(weights=weights), offline / "cache")
    assert (
        resolved.state_dict is None and resolved.sha256 == RANDOM_INIT and resolved.source == "from scratch"
    )
    assert init_label(resolved.sha256) == "from scratch" and init_label("ab" * 32) == "pretrained"


def test_adaptflow_run_offline_stops_before_any_work(offline: Path) -> None:
    import os
    import subprocess
    import sys

    (offline / "data" / "a").mkdir(parents=True)
    workdir = offline / "work"
    code = "from adaptflow.cli import main; main()"
    argv = [sys.executable, "-c", code, "run", "--data", str(offline / "data"), "--set", f"workdir={workdir}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert result.returncode != 0 and result.stdout == ""
    assert "error: cannot get the pretrained resnet18 weights" in result.stderr
    assert "backbone.weights=none" in result.stderr and "Traceback" not in result.stderr
    assert not workdir.exists()  # no MLflow store, no run: it stopped before any work
