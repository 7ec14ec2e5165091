"""A model's image pulled onto this consumer's engine the first time a task needs it, then kept.

On a swarm of GPU hosts nobody loads model images onto each host by hand: operators push them
to the lab registry (IS_MODEL_REGISTRY, host[:port]) under the tag the model was registered
with, and a consumer whose engine lacks the image pulls `<registry>/<tag>` and tags it locally
as `<tag>`, so every later task (and the result cache's image ID lookup) finds it without a
registry. A tag that names a registry itself (`lab.example:5000/team/model:3`) is pulled as it
is. The registry login comes from IS_REGISTRY_USERNAME and the file IS_REGISTRY_PASSWORD_FILE
names (a Swarm secret), sent only to that registry.

A tag the registry does not have, or a login it refuses, fails the task at once (not
retryable: another attempt would meet the same answer); a registry that cannot be reached is
the platform's side, so that task is handed back for another attempt.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests
from docker.utils import parse_repository_tag

log = logging.getLogger(__name__)

# Words of an engine's answer that mean the registry was not reached at all (so another attempt,
# later or elsewhere, may succeed), as opposed to a registry that answered "no".
_UNREACHABLE_MARKERS = (
    "connection refused",
    "no route to host",
    "i/o timeout",
    "timeout exceeded",
    "no such host",
    "connection reset",
    "service unavailable",
    "server misbehaving",
    "tls handshake timeout",
)


class ImagePullError(Exception):
    """The model's image is not on this engine and could not be pulled."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class RegistryLogin:
    username: str
    password: str

    def auth_config(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password}


def read_registry_login(username: str, password_file: str) -> RegistryLogin | None:
    """The login in the settings, None when no username is set. A named password file that
    cannot be read is a configuration error: the consumer must not start without it."""
    if not username:
        return None
    if not password_file:
        raise ValueError("IS_REGISTRY_USERNAME is set but IS_REGISTRY_PASSWORD_FILE is not")
    try:
        password = Path(password_file).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read IS_REGISTRY_PASSWORD_FILE {password_file}: {exc.strerror}") from exc
    return RegistryLogin(username, password)


def names_registry(reference: str) -> bool:
    """Whether an image reference starts with a registry host, as the engine decides it: the
    first path component holds a dot or a port, or is localhost."""
    first, slash, _ = reference.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


class ImagePuller:
    """Makes sure a model's image is on the engine before its container is created."""

    def __init__(self, client: docker.DockerClient, registry: str, login: RegistryLogin | None) -> None:
        self._client = client
        self._registry = registry.rstrip("/")
        self._login = login
        # One pull per tag at a time: a burst of tasks of a new model waits for the first pull.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def ensure(self, container_tag: str) -> bool:
        """Pull the image `container_tag` names unless the engine has it; True when it pulled."""
        if self._present(container_tag):
            return False
        with self._lock_for(container_tag):
            if self._present(container_tag):
                return False
            source = self._source_of(container_tag)
            if source is None:
                raise ImagePullError(
                    f"image {container_tag!r} is not on this engine and no registry is configured "
                    "to pull it from (IS_MODEL_REGISTRY)",
                    retryable=False,
                )
            self._pull(source, container_tag)
            return True

    def _present(self, container_tag: str) -> bool:
        try:
            self._client.images.get(container_tag)
        except docker.errors.ImageNotFound:
            return False
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise ImagePullError(
                f"cannot ask the engine for image {container_tag!r}: {exc}", retryable=True
            ) from exc
        return True

    def _lock_for(self, container_tag: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(container_tag, threading.Lock())

    def _source_of(self, container_tag: str) -> str | None:
        if names_registry(container_tag):
            return container_tag
        if not self._registry:
            return None
        return f"{self._registry}/{container_tag}"

    def _auth_for(self, source: str) -> dict[str, str] | None:
        if self._login is None or not self._registry:
            return None
        return self._login.auth_config() if source.startswith(f"{self._registry}/") else None

    def _pull(self, source: str, container_tag: str) -> None:
        repository, tag = parse_repository_tag(source)
        log.info("pulling image %s for %s", source, container_tag)
        try:
            image = self._client.images.pull(
                repository, tag=tag or "latest", auth_config=self._auth_for(source)
            )
        except docker.errors.NotFound as exc:
            raise ImagePullError(
                f"image {source!r} is not in the registry: {_explanation(exc)}", retryable=False
            ) from exc
        except docker.errors.APIError as exc:
            explanation = _explanation(exc)
            unreachable = any(marker in explanation.lower() for marker in _UNREACHABLE_MARKERS)
            reason = "the registry could not be reached" if unreachable else "the registry refused it"
            raise ImagePullError(
                f"pulling image {source!r} failed, {reason}: {explanation}", retryable=unreachable
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise ImagePullError(
                f"pulling image {source!r} failed: the engine did not answer ({exc})", retryable=True
            ) from exc
        if source != container_tag:
            # Kept under the model's own tag: later tasks find it locally, as if loaded by hand.
            new_repository, new_tag = parse_repository_tag(container_tag)
            image.tag(new_repository, tag=new_tag or "latest")
        log.info("pulled image %s (%s)", source, image.id)


def _explanation(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


_pullers: dict[int, ImagePuller] = {}
_pullers_guard = threading.Lock()


def puller_for(client: docker.DockerClient, registry: str, username: str, password_file: str) -> ImagePuller:
    """The one puller of this engine client (its per-tag locks shared by all task threads)."""
    with _pullers_guard:
        puller = _pullers.get(id(client))
        if puller is None:
            try:
                login = read_registry_login(username, password_file)
            except ValueError as exc:
                raise ImagePullError(str(exc), retryable=True) from exc
            puller = ImagePuller(client, registry, login)
            _pullers[id(client)] = puller
        return puller
