"""Hub ids or local paths: fail fast with one sentence when the hub is needed but cannot be reached."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from studykit.errors import UserError

HUB_TIMEOUT_SECONDS = 3.0


def is_local_path(name_or_path: str) -> bool:
    return Path(name_or_path).exists()


def _in_local_cache(repo_id: str, repo_type: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(repo.repo_id == repo_id and repo.repo_type == repo_type for repo in scan_cache_dir().repos)
    except Exception:  # no cache directory yet, or an unreadable one: treat as not cached
        return False


def _hub_host_answers() -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=HUB_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def ensure_hub_reachable(name_or_path: str, local_flag: str, repo_type: str = "model") -> None:
    """Without this check the hub client retries for about a minute before failing with a stack trace."""
    if is_local_path(name_or_path) or _in_local_cache(name_or_path, repo_type):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_host_answers():
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise UserError(
            f"'{name_or_path}' is neither a local path nor in the local cache and {reason}; "
            f"pass {local_flag} or connect to the network."
        )
