"""``/admin/policy``: switching the placement policy at run time.

Every call must carry a token signed with the cluster key for exactly that
method and path, used once (``cluster/auth.py``). The policy itself lives in
the ``Dispatcher``; this object authenticates and loads specs.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from cluster.auth import ClusterKey, NonceCache, verify_call
from scheduler.dispatch import Dispatcher
from scheduler.policy import load_policy


DrainNode = Callable[[str, bool, float], Awaitable[dict]]


class PolicyAdmin:
    """The API's ``AdminBackend``: authorize a call, report or switch the dispatcher's policy,
    drain or undrain a node (through ``drain``, the service's)."""

    def __init__(self, key: ClusterKey, dispatcher: Dispatcher, drain: DrainNode | None = None) -> None:
        self.key, self.dispatcher, self._drain = key, dispatcher, drain
        self._nonces = NonceCache()  # tokens already used: a replay is refused

    def authorize(self, method: str, token: str | None) -> str | None:
        """None when ``token`` authenticates ``method`` (e.g. ``"PUT /admin/policy"``), else why not."""
        return verify_call(self.key, method, token, self._nonces)

    def current_policy(self) -> str:
        """The spec of the policy placing requests now."""
        return self.dispatcher.policy_name

    def switch_policy(self, spec: str) -> str:
        """Load ``spec`` and place with it from the next request on; ValueError
        naming what is wrong leaves the current policy in place."""
        self.dispatcher.use(load_policy(spec), spec)
        return spec

    async def drain_node(self, node_id: str, drain: bool, timeout_s: float) -> dict:
        """Drain (or undrain) ``node_id``; LookupError for an unknown node."""
        if self._drain is None:
            raise LookupError("this scheduler drains no nodes")
        return await self._drain(node_id, drain, timeout_s)
