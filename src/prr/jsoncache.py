"""A JSON file of per-machine decisions (low layer: the runtime's speculation budget and the model's attention
crossover both keep theirs here): ``{key: entry}`` under the user cache directory, written atomically."""

from __future__ import annotations

import json
import os


class JsonCache:
    """Entries (JSON-able dicts) by string key in ``path`` (default ``$XDG_CACHE_HOME/prr/<name>``, else
    ``~/.cache/prr/<name>``). A missing or unreadable file reads as empty."""

    def __init__(self, name: str, path: str | None = None):
        root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        self.path = path or os.path.join(root, "prr", name)

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {}

    def get_entry(self, key: str) -> dict | None:
        return self._load().get(key)

    def put_entry(self, key: str, entry: dict) -> None:
        data = self._load()
        data[key] = entry
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"  # one per process: tensor-parallel ranks write the same cache
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)  # atomic: a crash or a concurrent writer never leaves a half-written cache
