"""Reading the MLflow Model Registry: aliases, registered ONNX models, what a version was made from.

The promotion protocol that moves the aliases is :mod:`adaptflow.promotion`; the leases that guard
it are :mod:`adaptflow.lease`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adaptflow.contracts import ChampionRef
from adaptflow.errors import StoreError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
#: model-version tags the gate writes (promotion) and later runs read (registry, recovery)
GATE_DECISION_TAG = "adaptflow.gate.decision"
GATE_REASONS_TAG = "adaptflow.gate.reasons"


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def get_champion(tracking_uri: str, model_name: str, alias: str = CHAMPION) -> ChampionRef | None:
    """The version behind ``models:/NAME@alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        version = _client(tracking_uri).get_model_version_by_alias(model_name, alias)
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code) or "not found" in str(error).lower():
            return None
        raise StoreError(f"cannot read {model_name}@{alias} from {tracking_uri}: {error}") from error
    return ChampionRef(
        model_name=model_name,
        version=str(version.version),
        run_id=version.run_id,
        uri=f"models:/{model_name}@{alias}",
    )


def change_verdict(
    tracking_uri: str, model_name: str, fingerprint: str, config_hash: str, force: bool
) -> tuple[bool, str]:
    """(changed, why): should this run train, given what the champion and challenger were made from?"""
    if force:
        return True, "retraining forced"
    unchanged = unchanged_since_champion(tracking_uri, model_name, fingerprint, config_hash)
    return unchanged is None, unchanged or "new data or config since the champion"


def unchanged_since_champion(
    tracking_uri: str, model_name: str, fingerprint: str, config_hash: str
) -> str | None:
    """Why training can be skipped, or None.

    Skipped when the champion, or the challenger (the last candidate trained and gated), was made
    from this exact data and config: retraining would reproduce it and burn GPU hours for nothing.
    """
    client = _client(tracking_uri)
    for alias in (CHAMPION, CHALLENGER):
        ref = get_champion(tracking_uri, model_name, alias)
        if ref is None:
            continue
        tags = client.get_model_version(model_name, ref.version).tags
        if (
            tags.get("adaptflow.data_fingerprint") == fingerprint
            and tags.get("adaptflow.config_hash") == config_hash
        ):
            verdict = tags.get(GATE_DECISION_TAG, "unknown")
            return (
                f"unchanged: data fingerprint {fingerprint[:12]} and config hash {config_hash[:12]} equal those of "
                f"the {alias} v{ref.version} (gate: {verdict}); nothing to retrain (use --force to retrain anyway)"
            )
    return None


def _artifact_uri(model_uri: str, tracking_uri: str | None) -> str:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` resolved through ``tracking_uri``'s registry.

    MLflow resolves ``models:/`` through the process-wide registry URI whatever tracking URI it is
    given, so a caller naming a store explicitly would otherwise read another one.
    """
    body = model_uri[len("models:/") :] if model_uri.startswith("models:/") else None
    if body is None or tracking_uri is None or not ("@" in body or "/" in body):
        return model_uri
    client = _client(tracking_uri)
    if "@" in body:
        name, alias = body.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, version = body.rsplit("/", 1)
    return str(client.get_model_version_download_uri(name, version))


def download_onnx(model_uri: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """Downloads a registered ONNX model (any models:/ URI) and returns the .onnx file."""
    import mlflow

    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=_artifact_uri(model_uri, tracking_uri),
                dst_path=str(dest),
                tracking_uri=tracking_uri,
            )
        )
    except Exception as error:
        raise StoreError(
            f"cannot fetch {model_uri}: {error}",
            hint="check the model name and alias (`adaptflow history --model NAME`) and the tracking URI",
        ) from error
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise StoreError(f"{model_uri} holds no .onnx file; was it registered by adaptflow?")
    return found[0]
