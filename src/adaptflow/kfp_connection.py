"""Connecting to a Kubeflow Pipelines API: host and token resolution, a health check before kfp.Client
(which would otherwise retry an unreachable host for minutes), and API errors turned into StoreErrors
with a hint."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adaptflow.errors import AdaptflowError, ConfigError, StoreError

log = logging.getLogger(__name__)

PORT_FORWARD_HINT = "kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow"
TOKEN_ENV = "KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # the variable kfp's own volume credentials read

_CONNECT_TIMEOUT_S = 5.0
_HEALTHZ = "/apis/v2beta1/healthz"
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


# --------------------------------------------------------------------------- small helpers


def normalize_host(host: str) -> str:
    """``localhost:8080`` -> ``http://localhost:8080``; other hosts without a scheme get ``https://``.

    kfp itself defaults every scheme-less host to https, which breaks the usual port-forward address.
    """
    value = host.strip().rstrip("/")
    if not value:
        raise ConfigError(
            "no Kubeflow Pipelines host given",
            hint=f"pass --host http://localhost:8080 after `{PORT_FORWARD_HINT}`",
        )
    if "://" not in value:
        hostname = urlsplit("//" + value).hostname or ""
        scheme = "http" if hostname in _LOOPBACK or hostname.startswith("127.") else "https"
        value = f"{scheme}://{value}"
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"invalid Kubeflow Pipelines host {host!r}",
            hint="use a URL such as http://localhost:8080 or https://kubeflow.example.com/pipeline",
        )
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"invalid Kubeflow Pipelines host {host!r}: {exc}") from exc
    return value


def resolve_token(token: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token to send: ``token``, else ``$KFP_TOKEN``, else the file ``$KF_PIPELINES_SA_TOKEN_PATH``.

    Meant for the CLI layer (called at command time, never at import). ``None`` means "no token": kfp
    then sends no credentials to an explicit host (fine for a port-forward).
    """
    if token:
        return token.strip()
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip()
    path = env.get(SA_TOKEN_PATH_ENV)
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"cannot read the KFP token file {path} (from ${SA_TOKEN_PATH_ENV}): {exc}",
                hint=f"fix or unset ${SA_TOKEN_PATH_ENV}, or pass the token in ${TOKEN_ENV}",
            ) from exc
    return None


def default_version_name(package_path: str | Path, now: datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<sha256[:8]>`` of the package: sortable, and different for different YAML."""
    digest = hashlib.sha256(Path(package_path).read_bytes()).hexdigest()[:8]
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{digest}"


# --------------------------------------------------------------------------- connection and errors


def _unreachable(host: str, reason: object) -> StoreError:
    return StoreError(
        f"cannot reach the Kubeflow Pipelines API at {host}: {reason}",
        hint=f"check --host and that the API is reachable; for a local cluster run `{PORT_FORWARD_HINT}` "
        "and use --host http://localhost:8080",
    )


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            data = json.loads(body)
        except ValueError:
            return body.strip()[:300]
        if isinstance(data, dict):
            return str(data.get("message") or data.get("error") or body)[:300]
    return str(getattr(exc, "reason", "") or exc)


def _api_error(host: str, action: str, exc: Any, not_found: str | None) -> StoreError:
    status = int(getattr(exc, "status", 0) or 0)
    message = _api_message(exc)
    if status == 0:
        return _unreachable(host, message)
    if status in (401, 403):
        return StoreError(
            f"Kubeflow Pipelines at {host} refused to {action} (HTTP {status}): {message}",
            hint=f"pass a bearer token (--token or ${TOKEN_ENV}, or a token file in ${SA_TOKEN_PATH_ENV}), "
            "or check --namespace and your RBAC in a multi-user deployment",
        )
    if status == 404 and not_found:
        return StoreError(
            f"{not_found} (HTTP 404 from {host})", hint="list what exists with `adaptflow schedule list`"
        )
    if status == 404:
        return StoreError(
            f"{host} answered 404 to {action}: {message}",
            hint="is --host the KFP API / UI address (it must serve /apis/v2beta1)? "
            f"For a local cluster use `{PORT_FORWARD_HINT}`",
        )
    if status == 409:
        return StoreError(
            f"Kubeflow Pipelines at {host} could not {action}: it already exists (HTTP 409): {message}",
            hint="another submit may have raced this one; run the command again",
        )
    return StoreError(f"Kubeflow Pipelines at {host} could not {action} (HTTP {status}): {message}")


@contextlib.contextmanager
def kfp_call(host: str, action: str, *, not_found: str | None = None) -> Iterator[None]:
    """Turn kfp / urllib3 failures into StoreErrors; keep kfp's ``print`` chatter out of stdout."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    except AdaptflowError:
        raise
    except ApiException as exc:
        raise _api_error(host, action, exc, not_found) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # MaxRetryError, ConnectionError, TimeoutError
        reason = getattr(exc, "reason", None) or exc
        raise _unreachable(host, reason) from exc
    except ValueError as exc:  # kfp's own argument checks (empty names, ambiguous lookups)
        raise StoreError(f"could not {action} on {host}: {exc}") from exc
    finally:
        for line in chatter.getvalue().splitlines():
            if line.strip():
                log.debug("kfp: %s", line)


def _preflight(host: str, token: str | None, timeout: float = _CONNECT_TIMEOUT_S) -> None:
    """One health check with timeouts and no retries, before ``kfp.Client`` runs its own.

    kfp's check has no connect timeout (a blackholed host hangs for minutes) and retries refusals
    5 times, 5 s apart; this one fails in seconds and tells an auth problem from a wrong address.
    """
    import certifi
    import urllib3

    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        response = pool.request(
            "GET",
            f"{host}{_HEALTHZ}",
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=3 * timeout),
            retries=False,
            redirect=False,
        )
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _unreachable(host, getattr(exc, "reason", None) or exc) from exc
    finally:
        pool.clear()
    status = response.status
    if 300 <= status < 400 or status in (401, 403):
        raise StoreError(
            f"Kubeflow Pipelines at {host} wants authentication (HTTP {status} on {_HEALTHZ})",
            hint=f"pass a bearer token (--token or ${TOKEN_ENV}, or a token file in ${SA_TOKEN_PATH_ENV}); "
            f"behind a login page, port-forward the API instead: `{PORT_FORWARD_HINT}`",
        )
    if status == 404:
        raise StoreError(
            f"{host} is not a Kubeflow Pipelines API: {_HEALTHZ} answered 404",
            hint=f"use the ml-pipeline-ui address; for a local cluster `{PORT_FORWARD_HINT}` and "
            "--host http://localhost:8080",
        )
    if status >= 400:
        raise StoreError(f"Kubeflow Pipelines at {host} is not healthy: {_HEALTHZ} answered HTTP {status}")


def connect(host: str, *, namespace: str | None = None, existing_token: str | None = None) -> tuple[Any, str]:
    """A ``kfp.Client`` for ``host`` and the normalised URL it talks to, after a fast health check of
    our own (see :func:`_preflight`)."""
    import kfp

    url = normalize_host(host)
    _preflight(url, existing_token)
    kwargs: dict[str, Any] = {"host": url, "existing_token": existing_token}
    if namespace:
        kwargs["namespace"] = namespace
    log.debug("connecting to Kubeflow Pipelines at %s (namespace=%s)", url, namespace)
    with kfp_call(url, "answer the health check"):
        return kfp.Client(**kwargs), url
