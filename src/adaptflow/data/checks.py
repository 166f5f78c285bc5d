"""Where ingest may read from, decided before anything is opened or fetched.

Local files must resolve (symlinks followed) inside the data root -- the ImageFolder, or the
manifest's folder -- or inside ``ingest.allowed_roots``. Remote URIs must use a scheme in
``ingest.allowed_schemes``; http(s) also needs its host in ``ingest.allowed_hosts``, and so does
every redirect. A refusal is a quarantine reason that names the file; it is never fatal.
"""

from __future__ import annotations

import errno
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPMessage
from pathlib import Path
from typing import IO

from adaptflow.config import IngestConfig
from adaptflow.errors import StoreError
from adaptflow.storage import is_http, local_path, read_bytes


def printable(path: str | Path) -> str:
    """``path`` as valid UTF-8: a name that is not (bytes from another system) shows its bytes
    escaped, so the reason and the snapshot can still be written as JSON and CSV."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(path: str | Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def allowed_roots(base: Path, cfg: IngestConfig) -> tuple[Path, ...]:
    """The data root first, then ``ingest.allowed_roots``, each with its own symlinks resolved."""
    return (base.resolve(), *(Path(root).resolve() for root in cfg.allowed_roots))


def confine_local(path: Path, roots: tuple[Path, ...]) -> tuple[Path | None, str | None]:
    """(the resolved file, None) when ``path`` may be read, else (None, why not).

    Only ``resolve`` and ``stat`` touch the file system here: a refused file is never opened.
    """
    shown = printable(path)
    if not is_utf8(path):
        return None, f"{shown}: file name is not valid UTF-8; rename the file"
    try:
        target = path.resolve()  # where it points, existing or not: confinement comes first
    except RuntimeError:  # Python 3.11/3.12 report a symlink loop this way, 3.13 as ELOOP
        return None, f"{shown}: symlink loop"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None, f"{shown}: symlink loop"
        return None, f"{shown}: cannot resolve: {error.strerror or error}"
    except ValueError as error:  # e.g. an embedded NUL byte in a manifest row
        return None, f"{shown}: not a valid path: {error}"
    if not any(target.is_relative_to(root) for root in roots):
        where = f" (resolves to {printable(target)})" if target != path.absolute() else ""
        inside = ", ".join(printable(r) for r in roots)
        return None, (
            f"{shown}{where} is outside the data root; allowed: {inside} "
            "(add its folder to ingest.allowed_roots to read it)"
        )
    if not target.exists():
        broken = " (a broken symlink)" if path.is_symlink() else ""
        return None, f"{shown}: does not exist{broken}"
    if not target.is_file():  # a FIFO would block the reader, a device might never end
        return None, f"{shown}: not a regular file"
    return target, None


class LocalConfinement:
    """``confine_local`` for many files, with the file's ``lstat`` (its size and mtime key ingest's
    verdict cache): each folder is resolved once, each plain file costs one ``lstat``. Anything
    unusual (a symlink, a missing file, a name that is not UTF-8) goes through ``confine_local``."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots = roots
        self._root_prefixes = tuple("/" if str(r) == "/" else f"{r}/" for r in roots)
        self._folders: dict[str, str] = {}
        self._bases: dict[str, str | None] = {}

    def folder_base(self, folder: str) -> str | None:
        """``folder`` resolved once, with a trailing ``/`` (a file's target is this plus its name),
        when that lies inside a root; None when it does not or cannot be resolved."""
        base = self._bases.get(folder, "")
        if base == "":
            try:
                base = os.path.realpath(folder or ".").rstrip("/") + "/"
            except (ValueError, OSError):  # a NUL byte; realpath is not strict, so errors are rare
                base = None
            if base is not None and not base.startswith(self._root_prefixes):
                base = None
            self._bases[folder] = base
        return base

    def check(self, path: str) -> tuple[str | None, os.stat_result | None, str | None]:
        """(the resolved file, its stat, None), or (None, None, why it may not be read)."""
        folder, name = os.path.split(path)
        try:
            path.encode("utf-8")
            resolved = self._folders.get(folder)
            if resolved is None:
                resolved = self._folders[folder] = os.path.realpath(folder or ".")
            if name in ("", ".", ".."):
                raise ValueError(name)
            info = os.lstat(path)
        except (ValueError, OSError):  # UnicodeEncodeError is a ValueError
            return self._slow(path)
        target = f"{resolved.rstrip('/')}/{name}"
        if not stat.S_ISREG(info.st_mode) or not target.startswith(self._root_prefixes):
            return self._slow(path)
        return target, info, None

    def _slow(self, path: str) -> tuple[str | None, os.stat_result | None, str | None]:
        target, reason = confine_local(Path(path), self.roots)
        if target is None:
            return None, None, reason
        try:
            return str(target), os.stat(target), None
        except OSError as error:
            return None, None, f"{printable(path)}: cannot stat: {error.strerror or error}"


def _scheme(uri: str) -> str:
    """The lowercased scheme of ``scheme://...``; '' for a path (``file://`` is a path too)."""
    if "://" not in uri:
        return ""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    return "" if scheme == "file" else scheme


def remote_refusal(uri: str, cfg: IngestConfig) -> str | None:
    """Why ``uri`` may not be fetched, or None."""
    scheme = _scheme(uri)
    if scheme not in cfg.allowed_schemes:
        allowed = ", ".join(cfg.allowed_schemes) or "none"
        return f"{uri}: scheme {scheme!r} is not in ingest.allowed_schemes ({allowed})"
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)
        host = (parts.hostname or "").lower()
        with_port = f"{host}:{parts.port}" if parts.port else host
        if host not in cfg.allowed_hosts and with_port not in cfg.allowed_hosts:
            hosts = ", ".join(cfg.allowed_hosts) or "none"
            return f"{uri}: host {host!r} is not in ingest.allowed_hosts ({hosts})"
    return None


def manifest_target(
    raw: str, manifest: Path, roots: tuple[Path, ...], cfg: IngestConfig
) -> tuple[str, str | None]:
    """A manifest row's image -> (the URI to read, None) or (what to call it, why it is refused).

    Relative paths are relative to the manifest's folder, as before.
    """
    scheme = _scheme(raw)
    if scheme:
        uri = scheme + raw[len(scheme) :]  # storage matches schemes in lower case
        return uri, remote_refusal(uri, cfg)
    candidate = local_path(raw)
    path = candidate if candidate.is_absolute() else manifest.parent / candidate
    target, reason = confine_local(path, roots)
    return (printable(path), reason) if target is None else (str(target), None)


class _ConfinedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to where the row itself could have pointed: an allowed host may not
    bounce ingest to another (an internal service, a metadata endpoint)."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        refusal = remote_refusal(newurl, self.cfg)
        if refusal is not None:
            raise StoreError(f"{req.full_url} redirects to {refusal}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(uri: str, cfg: IngestConfig, timeout: float = 60.0) -> bytes:
    """The bytes at an already allowed ``uri``; StoreError when they cannot be read."""
    if not is_http(uri):
        return read_bytes(uri, max_attempts=cfg.s3_max_attempts)
    opener = urllib.request.build_opener(_ConfinedRedirects(cfg))
    try:
        with opener.open(uri, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except (urllib.error.URLError, OSError) as error:
        raise StoreError(f"cannot download {uri}: {error}", hint="check the URL and the network") from error
