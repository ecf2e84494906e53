"""Writing output folders safely: built in a staging folder beside the destination, moved into place only when
complete, with the usual permissions, never replacing anything but files of the kind the command writes."""

import os
import shutil
import tempfile
from pathlib import Path


def check_new_folder(destination, marker=None, overwrite=False):
    """`destination` must be new or empty, or, with `overwrite`, hold an earlier output (it has the file `marker`)."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        earlier = marker is not None and (destination / marker).is_file()
        if not (overwrite and earlier):
            raise FileExistsError(
                f"{destination} exists and is not empty; choose a new or empty folder"
                + (" (or pass --overwrite to replace an earlier output)" if earlier else "")
                + ". Nothing was written."
            )


def staging_folder(destination):
    """A new empty folder beside `destination` (same file system, so the final move is atomic)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))


def publish(staging, destination):
    """Move the complete folder `staging` to `destination`, with the usual permissions instead of mkdtemp's 0700.

    A non-empty `destination` is replaced only if every file in it is one `staging` also has (or a safetensors
    shard or index): nothing else of the user's is ever deleted.
    """
    staging, destination = Path(staging), Path(destination)
    if destination.exists() and any(destination.iterdir()):
        written = {path.name for path in staging.iterdir()}
        foreign = sorted(
            path.name for path in destination.iterdir()
            if path.name not in written and not path.name.endswith((".safetensors", ".safetensors.index.json"))
        )
        if foreign:
            raise FileExistsError(
                f"{destination} holds files this command does not write ({', '.join(foreign[:5])}); move them away "
                "or choose another folder. Nothing was changed."
            )
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if destination.exists() and any(destination.iterdir()):
        retired = staging.with_name(staging.name + ".old")
        os.replace(destination, retired)
        os.replace(staging, destination)
        shutil.rmtree(retired)
    else:
        os.replace(staging, destination)  # also onto an empty folder
