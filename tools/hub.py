"""Upload landmark-llama weight diffs (and full landmark-llama folders) to the Hugging Face Hub, and download them.

    python -m landmark_llama.tools.hub upload FOLDER --repo-id NAME [--private] [--revision R] [--commit-message M]
    python -m landmark_llama.tools.hub download --repo-id NAME --out DIR [--revision R]

The endpoint is `HF_ENDPOINT` (read when a command runs; the public Hub if unset), the token the `HF_TOKEN`
environment variable or the stored `hf auth login`. The token is sent only in the Authorization header: it is never
printed or logged. `upload` refuses a folder that is neither a weight diff nor a landmark-llama model folder;
`download` writes beside its destination and moves the folder into place only when every file has arrived.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from huggingface_hub import HfApi, get_token, snapshot_download

from landmark_llama.tools.cli import exit_with_message
from landmark_llama.tools.folders import check_new_folder, publish, staging_folder


WEIGHT_DIFF_MANIFEST = "weight_diff.json"  # tools.weight_diff.MANIFEST, named here to keep torch out of the import
MODEL_TYPE = "landmark_llama"


def _endpoint():
    """The Hub endpoint from HF_ENDPOINT, read now (huggingface_hub's own constant is frozen at import)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def folder_kind(folder):
    """What an uploadable folder holds ("weight diff" or "model"); ValueError for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the folder written by weight_diff make or convert_llama.")
    if (folder / WEIGHT_DIFF_MANIFEST).is_file():
        return "weight diff"
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
        if model_type == MODEL_TYPE:
            return "model"
    raise ValueError(
        f"{folder} is neither a weight diff (no {WEIGHT_DIFF_MANIFEST}) nor a landmark-llama model folder (no "
        f'config.json with "model_type": "{MODEL_TYPE}"); make a diff with '
        "`python -m landmark_llama.tools.weight_diff make` or convert a Llama checkpoint with "
        "`python -m landmark_llama.tools.convert_llama` and upload that folder."
    )


def upload(folder, repo_id, private=False, revision=None, commit_message=None, token=None):
    """Create `repo_id` if needed (and the branch `revision`), upload `folder` in one commit; returns its URL."""
    kind = folder_kind(folder)
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token is needed).")
    api = HfApi(endpoint=_endpoint(), token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
        commit_message=commit_message or f"Upload landmark-llama {kind}",
    )
    return getattr(commit, "commit_url", None) or str(repo_url)


def download(repo_id, out, revision=None, token=None):
    """Download the repo `repo_id` (at `revision`) into the new or empty folder `out`; returns its path."""
    out = Path(out)
    check_new_folder(out)
    staging = staging_folder(out)
    try:
        snapshot_download(
            repo_id, revision=revision, local_dir=str(staging), endpoint=_endpoint(), token=token or get_token(),
        )
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        check_new_folder(out)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    upload_parser = commands.add_parser("upload", help="upload a weight diff or landmark-llama folder")
    upload_parser.add_argument("folder")
    upload_parser.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    upload_parser.add_argument("--private", action="store_true", help="create the repo private")
    upload_parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    upload_parser.add_argument("--commit-message", default=None)
    download_parser = commands.add_parser("download", help="download a repo into a new folder")
    download_parser.add_argument("--repo-id", required=True)
    download_parser.add_argument("--out", required=True, help="new or empty folder to write")
    download_parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    with exit_with_message():  # HfHubHTTPError is an OSError
        if args.command == "upload":
            result = upload(args.folder, args.repo_id, private=args.private, revision=args.revision,
                            commit_message=args.commit_message)
        else:
            result = download(args.repo_id, args.out, revision=args.revision)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
