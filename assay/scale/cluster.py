"""Start or join Ray, with clear errors: no Ray installed names the extra; an address that does not answer fails
within ``connect_timeout_s`` (a plain TCP probe before ``ray.init``, which would otherwise wait much longer), before
anything is written."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

EXTRA = 'pip install "assay[ray]"'


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster named did not answer."""


def require_ray():
    """The ``ray`` module, or an error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only ray core
    except ImportError as e:
        raise RayUnavailable(f"the Ray engine needs Ray Data, which is not installed ({e}); install the extra: "
                             f"{EXTRA}, or set annotate.engine: local") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address (``host:port``, ``ray://host:port``); None for ``auto`` / ``local``."""
    a = address.strip()
    if a in ("auto", "local"):
        return None
    for scheme in ("ray://", "http://", "https://"):
        if a.startswith(scheme):
            a = a[len(scheme):]
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(f"Ray address {address!r} is not host:port or ray://host:port (annotate.ray.address, "
                             "--address or RAY_ADDRESS)")
    return host or "127.0.0.1", int(port)


def probe(address: str, timeout_s: float) -> None:
    """Raise RayUnavailable unless something answers on the address's port within ``timeout_s``."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        raise RayUnavailable(f"the Ray cluster at {address!r} did not answer within {timeout_s:g} s ({e}); start it "
                             "(`ray start --head`), or fix annotate.ray.address / --address / RAY_ADDRESS; nothing "
                             "was written") from None


def connect(ray_cfg, address: str | None = None) -> dict:
    """Join ``address`` (else annotate.ray.address, else RAY_ADDRESS) or start a local Ray with the configured CPUs
    and object store. Reuses a Ray this process already started. Returns what was joined."""
    ray = require_ray()
    target = address or ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    if target:
        probe(target, ray_cfg.connect_timeout_s)
    if ray.is_initialized():
        return {"address": target or "local", "resources": ray.cluster_resources()}
    if target:
        try:
            ray.init(address=target, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, TimeoutError, RuntimeError, OSError) as e:
            raise RayUnavailable(f"could not join the Ray cluster at {target!r} ({type(e).__name__}: {e}); start it "
                                 "(`ray start --head`), or fix annotate.ray.address / --address / RAY_ADDRESS; "
                                 "nothing was written") from None
        log.info("joined Ray at %s", target)
    else:
        kw = {}
        if ray_cfg.num_cpus:
            kw["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.object_store_mb:
            kw["object_store_memory"] = int(ray_cfg.object_store_mb) * 1024 * 1024
        ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, **kw)
        log.info("started a local Ray (%s)", kw or "default resources")
    return {"address": target or "local", "resources": ray.cluster_resources()}
