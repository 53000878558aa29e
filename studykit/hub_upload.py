"""Uploading a finished run (or a study's results) to the Hugging Face Hub with huggingface_hub, leaving out what is
only the kit's bookkeeping: resumable checkpoints, unfinished writes, hidden files (locks, the study runner's records),
TensorBoard's event files.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from studykit.errors import UserError, first_line

# What a run directory holds that is not the model: huggingface_hub's ignore patterns (fnmatch on the POSIX path
# relative to the folder, where `*` also matches `/`). Unfinished writes carry io.PARTIAL_MARKER in their name.
UPLOAD_IGNORE = ("resume/*", "*/resume/*", "*.partial-*", ".*", "*/.*", "tensorboard/*", "*/tensorboard/*")
# The study's results, uploaded beside its trainings: ORG/PREFIX-results.
RESULTS_SUFFIX = "results"


def upload_plan(folder: Path, ignore: tuple[str, ...] = UPLOAD_IGNORE) -> list[str]:
    """The files upload_folder would send: every file under `folder` that no ignore pattern matches."""
    folder = Path(folder)
    files = [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*")) if path.is_file()]
    return [name for name in files if not any(fnmatch.fnmatch(name, pattern) for pattern in ignore)]


def hub_api():
    """The Hub client, logged in as `hf auth login` (or HF_TOKEN) left it."""
    from huggingface_hub import HfApi

    return HfApi()


def push_folder(
    folder: Path, repo_id: str, repo_type: str = "model", commit_message: Optional[str] = None, api: Any = None
) -> str:
    """Create the repo if needed and upload `folder` to it, without the bookkeeping; returns the repo's URL. `api` is a
    huggingface_hub.HfApi (tests pass a stand-in). A failure is one sentence, and the files stay where they are."""
    api = api if api is not None else hub_api()
    folder = Path(folder)
    if not upload_plan(folder):
        raise UserError(f"{folder} holds nothing to upload; train the run (or run the study) first.")
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type=repo_type,
            ignore_patterns=list(UPLOAD_IGNORE),
            commit_message=commit_message or f"Upload {folder.name} (studykit)",
        )
    except (OSError, ValueError) as error:
        # huggingface_hub's HTTP errors are OSErrors (requests' and httpx's alike), as is a missing token; a bad id is a
        # ValueError.
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        excludes = " ".join(f"--exclude '{pattern}'" for pattern in UPLOAD_IGNORE)
        raise UserError(
            f"uploading {folder} to {repo_id} failed ({first_line(error)}); the files are kept: log in with "
            f"`hf auth login` and upload them with `hf upload{kind} {repo_id} {folder} {excludes}`."
        ) from None
    print(f"uploaded {folder} to {url}")
    return str(url)


@dataclass(frozen=True)
class Upload:
    """One folder of a study and the repo it goes to."""

    folder: Path
    repo_id: str
    repo_type: str


def study_uploads(prefix: str, training_dirs: dict[str, Path], results_dir: Path) -> list[Upload]:
    """run_study.py --push-to-hub ORG/PREFIX: each chosen training as the model ORG/PREFIX-<training name>, then the
    results directory as the dataset ORG/PREFIX-results."""
    uploads = [Upload(Path(folder), f"{prefix}-{name}", "model") for name, folder in training_dirs.items()]
    return uploads + [Upload(Path(results_dir), f"{prefix}-{RESULTS_SUFFIX}", "dataset")]


def push_study(prefix: str, training_dirs: dict[str, Path], results_dir: Path, api: Any = None) -> list[str]:
    """Upload a study's chosen trainings and results (study_uploads); the URLs, in that order."""
    api = api if api is not None else hub_api()
    return [
        push_folder(upload.folder, upload.repo_id, upload.repo_type, api=api)
        for upload in study_uploads(prefix, training_dirs, results_dir)
    ]
