"""The few Kubernetes API calls the runtime makes, in plain dicts, through lightkube (0.x, on httpx).

One narrow door: lightkube's overloads do not type-check under mypy strict, its models are converted to
dicts here and nowhere else, and its failures become ours (``kube_errors``) with what to do about them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Pod, PodLog, Secret, Service
from lightkube.types import CascadeType, PatchType

from common.errors import BackendStartFailed, KubernetesUnavailable
from controller.runtime.logs import LineSplitter

Kind = Literal["Deployment", "Service", "Pod", "Secret", "Lease"]
TIMEOUT = httpx.Timeout(10.0)
FOLLOW_TIMEOUT = httpx.Timeout(10.0, read=None)  # connect, write and pool bounded; reads wait for the next line
_KINDS: dict[str, Any] = {"Deployment": Deployment, "Service": Service, "Pod": Pod, "Secret": Secret, "Lease": Lease}


class KubeApi:
    """A namespaced client: in-cluster (service account) or from a kubeconfig."""

    def __init__(self, namespace: str | None, kubeconfig: Path | None, context: str | None) -> None:
        try:
            loaded = KubeConfig.from_file(kubeconfig) if kubeconfig is not None else KubeConfig.from_env()
            single = loaded.get(context_name=context)
        except (ConfigError, OSError, KeyError) as exc:
            raise KubernetesUnavailable(
                f"no Kubernetes configuration found ({exc}): run the controller in a pod with a service account, "
                "or set runtime.kubernetes.kubeconfig (or KUBECONFIG)"
            ) from exc
        if single is None:
            raise KubernetesUnavailable(f"the kubeconfig has no context {context!r}")
        self._client: Any = AsyncClient(
            single, namespace=namespace, timeout=TIMEOUT, field_manager="llamacontroller", trust_env=False
        )
        self.namespace: str = self._client.namespace

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        kind = _KINDS[body["kind"]]
        created = await self._client.create(kind.from_dict(body))
        return _plain(created)

    async def get(self, kind: Kind, name: str) -> dict[str, Any] | None:
        try:
            return _plain(await self._client.get(_KINDS[kind], name))
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise

    async def list(self, kind: Kind, labels: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
        """The objects and the resourceVersion to watch from."""
        listing = self._client.list(_KINDS[kind], labels=labels)
        items = [_plain(item) async for item in listing]
        return items, str(listing.resourceVersion)

    async def create_new(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when an object of that name exists already (409)."""
        try:
            return await self.create(body)
        except ApiError as exc:
            if exc.status.code == 409:
                return None
            raise

    async def replace(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Write the whole object (PUT) over the version ``metadata.resourceVersion`` names; None when it changed
        since (409) or is gone (404): optimistic concurrency, the leader election's one rule."""
        try:
            return _plain(await self._client.replace(_KINDS[body["kind"]].from_dict(body)))
        except ApiError as exc:
            if exc.status.code in (404, 409):
                return None
            raise

    async def patch(self, kind: Kind, name: str, body: dict[str, Any]) -> None:
        """A JSON merge patch (RFC 7386): what ``body`` names is set, the rest left as it is."""
        await self._client.patch(_KINDS[kind], name, body, patch_type=PatchType.MERGE)

    async def delete(self, kind: Kind, name: str, grace: int | None = None) -> None:
        """Delete; one already gone is fine. Dependants (a Deployment's pods) go in the background."""
        try:
            await self._client.delete(_KINDS[kind], name, grace_period=grace, cascade=CascadeType.BACKGROUND)
        except ApiError as exc:
            if exc.status.code != 404:
                raise

    async def watch(
        self, kind: Kind, labels: dict[str, str], version: str
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        stream = self._client.watch(_KINDS[kind], labels=labels, resource_version=version, server_timeout=300)
        async for event, item in stream:
            yield str(event), _plain(item)

    async def log(self, pod: str, container: str, since_time: str | None = None) -> AsyncIterator[str]:
        """Follow a container's output from ``since_time`` (RFC 3339; None = all of it), each line led by the
        kubelet's RFC 3339 time stamp and a space, so that a follower can resume where it stopped.

        Built here rather than by lightkube's ``log``, for two reasons: its requests carry the client's 10 s read
        timeout, which ended the stream of any backend quiet for 10 s (a follow stream has no read timeout here:
        a backend may say nothing for hours), and it has no ``sinceTime``. Lines are cut by a LineSplitter (a
        line without end is cut at MAX_LINE_BYTES); what follows the last newline comes only with a clean end: a
        stream broken off mid-line leaves that line to the next follow, which brings it whole."""
        generic = self._client._client
        params = {"container": container, "follow": True, "timestamps": True, "sinceTime": since_time}
        request = generic.build_adapter_request(generic.prepare_request("get", PodLog, name=pod, params=params))
        request.extensions["timeout"] = FOLLOW_TIMEOUT.as_dict()
        response = await generic.send(request, stream=True)
        try:
            if response.is_error:
                await response.aread()
                generic.raise_for_status(response)
            lines = LineSplitter()
            async for chunk in response.aiter_bytes():
                for line in lines.feed(chunk):
                    yield line
            for line in lines.rest():
                yield line
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self._client.close()


def _plain(item: Any) -> dict[str, Any]:
    plain: dict[str, Any] = item.to_dict()
    return plain


@contextlib.contextmanager
def kube_errors(action: str) -> Iterator[None]:
    """lightkube (and its HTTP layer) failures as our errors, with what to do about them."""
    try:
        yield
    except ApiError as exc:
        code, message = exc.status.code, exc.status.message or str(exc)
        if code in (401, 403):
            raise KubernetesUnavailable(
                f"{action}: the Kubernetes API refused ({code}): {message}. The controller's service account "
                "needs the Role the Helm chart creates (deployments, services, pods, pods/log, events, secrets, leases)"
            ) from exc
        raise BackendStartFailed(f"{action}: the Kubernetes API refused ({code}): {message}") from exc
    except (httpx.HTTPError, OSError) as exc:
        raise KubernetesUnavailable(f"{action}: the Kubernetes API does not answer ({describe(exc)})") from exc


def describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status.code} {exc.status.reason or ''}".strip()
    return exc.__class__.__name__
