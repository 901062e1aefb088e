"""RepositoryTierActor: where models come from (the default model's package, model directories, GGUF, a
repository over HTTP).

The slowest tier: fetching may download and convert. It answers ``Fetch`` with a local directory,
which the SSD tier then copies in. An optional ``repository.bandwidth`` in the topology slows
fetches to that rate, to make tier differences visible on one machine.

A source that is an ``http(s)://`` URL must lie under one of the topology's ``repositories`` (with the auth header
that repository names, its token read here, on the node); ``Fetch`` then answers with a started
``HttpCheckpointFetch`` (``storage/http_fetch.py``) once the index and small files are in, the partitions
arriving behind it into a staging directory beside the SSD tier's: the load reads them as they arrive and the
SSD tier copies the whole. Its bandwidth is the fetch's own (bytes over the network over the time they took).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.actors.node.tier_common import Bandwidth, hold_to_rate
from sllm_actors.messages import Fetch, TierLoaded
from sllm_actors.models import directory_bytes, resolve_source, sllm_home
from sllm_actors.actors.node.context import NodeContext
from sllm_actors.runtime.supervisor import SupervisedActor
from sllm_actors.runtime.topology import RepositorySpec, repository_for

__all__ = ["RepositoryTierActor", "auth_headers"]

log = logging.getLogger(__name__)


class RepositoryTierActor(SupervisedActor):
    tier = "repository"

    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext,
                 limit: float | None = None, repositories: tuple[RepositorySpec, ...] = (),
                 staging: Path | None = None) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.limit = limit
        self.repositories = repositories
        self.staging = staging
        """Where fetches over HTTP land before the SSD tier copies them (None: no HTTP sources)."""
        self.known: dict[str, int] = {}
        self.bandwidth = Bandwidth(limit or 0.0)

    def started(self) -> None:
        if self.staging is not None and self.staging.is_dir():
            # Fetches of an earlier node process, cut short: nothing reads them now. (This process's own, from
            # before a restart of this actor, may still be read by a load: their names carry our pid.)
            for child in self.staging.iterdir():
                if f".{os.getpid()}." not in child.name:
                    shutil.rmtree(child, ignore_errors=True)
        self._publish()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Fetch) and message.source.startswith(("http://", "https://")):
            return self._fetch_url(message.model, message.source)
        if isinstance(message, Fetch):
            started = time.perf_counter()
            path = resolve_source(message.source)
            size = directory_bytes(Path(path))
            if self.limit:
                hold_to_rate(size, self.limit, time.perf_counter() - started)
            self.known[message.model] = size
            self._publish()
            return path
        if isinstance(message, TierLoaded):
            # Timed by the storage client over fetch + store into the SSD tier: what a start from
            # this tier really costs (a local directory "fetches" instantly; its copy does not).
            self.bandwidth.observe(message.nbytes, message.seconds)
            self._publish()
            return None
        raise TypeError(f"{self.name}: unexpected message {message!r}")

    def _fetch_url(self, model: str, url: str) -> Any:
        from sllm_actors.storage import FetchError, HttpCheckpointFetch

        repository = repository_for(url, self.repositories)
        if repository is None:
            raise FetchError(f"model source {url} is outside the allowed repositories "
                             f"({', '.join(r.url for r in self.repositories) or 'none'})", url=url)
        if self.staging is None:
            raise FetchError(f"{self.node.name} has no staging directory for fetches over HTTP", url=url)
        dest = self.staging / f".{model}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incoming"
        me = self.actor_ref

        def done(nbytes: int, seconds: float) -> None:
            try:
                me.tell(TierLoaded(model, nbytes, seconds))
            except pykka.ActorDeadError:
                pass  # the tier is restarting: this measurement is lost, the next fetch makes another
        fetch = HttpCheckpointFetch(url, dest, headers=auth_headers(repository), on_done=done).start()
        assert fetch.index is not None
        self.known[model] = fetch.index.tensor_bytes
        self._publish()
        log.info("%s: fetching %s from %s (%s, %d bytes)", self.name, model, url,
                 "ranges" if fetch.ranged else "whole files", fetch.index.total_bytes)
        return fetch

    def _publish(self) -> None:
        self.node.board.update_tier(
            self.tier,
            models=sorted(self.known),
            used_bytes=sum(self.known.values()),
            capacity_bytes=0,
            bandwidth=self.bandwidth.value,
        )


def auth_headers(repository: RepositorySpec) -> dict[str, str]:
    """The header a repository's requests carry, its token read now (from the environment or a file under this
    node's ``$SLLM_HOME``); {} for a repository without one. Errors name where the token should be, never it."""
    from sllm_actors.storage import FetchError

    if not repository.header:
        return {}
    if repository.token_env:
        token = os.environ.get(repository.token_env, "")
        if not token:
            raise FetchError(f"repository {repository.url} needs a token in the environment variable "
                             f"{repository.token_env}, which is not set on this node", url=repository.url)
    else:
        path = sllm_home() / repository.token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise FetchError(f"repository {repository.url} needs a token in {path}: {exc.strerror or exc}",
                             url=repository.url) from None
        if not token:
            raise FetchError(f"repository {repository.url}: the token file {path} is empty", url=repository.url)
    return {repository.header: f"{repository.scheme} {token}" if repository.scheme else token}
