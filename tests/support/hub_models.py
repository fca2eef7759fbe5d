"""Gated model repos on the test Hub: `GatedHubServer` is `HubServer` whose repo metadata says
`gated: "manual"` for the repos named in `gated` (everything else as HubServer serves it);
`llama_8b_config_folder` writes the config files of a model to upload there (no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.hub_server import HubServer, _HubHandler

CONFIGS = Path(__file__).parents[1] / "fixtures" / "configs"


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


def llama_8b_config_folder(path: Path) -> Path:
    """`path`, made a model folder without weights: Llama 3.1 8B Instruct's config.json and a
    chat template (all that preflight and the access checks read)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text((CONFIGS / "llama-3.1-8b-instruct.json").read_text())
    (path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    return path
