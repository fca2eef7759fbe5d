"""Gated model repos on the test Hub: `GatedHubServer` is `HubServer` whose repo metadata says
`gated: "manual"` for the repos named in `gated` (everything else as HubServer serves it)."""

from __future__ import annotations

from typing import Any

from tests.support.hub_server import HubServer, _HubHandler


class _GatedHandler(_HubHandler):
    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        hub = self.hub
        if isinstance(payload, dict) and payload.get("id") in getattr(hub, "gated", ()):
            payload = {**payload, "gated": "manual"}
        super()._json(status, payload, headers)


class GatedHubServer(HubServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gated: set[str] = set()

    def _handler_class(self) -> type[_HubHandler]:
        return _GatedHandler
