"""Hub ids or local paths: fail fast with one sentence when the hub is needed but cannot be reached."""

from __future__ import annotations

import os
from pathlib import Path

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


def hub_is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when it was set after huggingface_hub was imported."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def _hub_answers(repo_id: str, repo_type: str) -> bool:
    """Ask the Hub about the repo through huggingface_hub's own client, so HF_ENDPOINT, HTTPS_PROXY and its other
    settings apply (a raw socket probe ignored the proxy and called a Hub behind one unreachable). Any answer, even
    "no such repo" (the loader then says so), means the Hub is there; no answer within the timeout means it is not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_SECONDS)
    except HfHubHTTPError:
        return True
    except Exception:  # the client's connection, timeout and proxy errors (httpx's, not OSErrors), offline mode
        return False
    return True


def ensure_hub_reachable(name_or_path: str, local_flag: str, repo_type: str = "model") -> None:
    """Without this check the hub client retries for about a minute before failing with a stack trace."""
    if is_local_path(name_or_path) or _in_local_cache(name_or_path, repo_type):
        return
    offline = hub_is_offline()
    if offline or not _hub_answers(name_or_path, repo_type):
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise UserError(
            f"'{name_or_path}' is neither a local path nor in the local cache and {reason}; "
            f"pass {local_flag} or connect to the network."
        )
