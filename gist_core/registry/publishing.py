"""Publishing a registered version to the Hugging Face Hub, with its model card as README.md.

``gist registry publish NAME REPO_ID`` downloads the version's sentence-transformers folder from the
registry, puts the card logged with the version (``gist_core.registry.card``) in it as README.md and
uploads the folder to a Hub model repository. It needs a write token (``HF_TOKEN`` or ``hf auth
login``) and a reachable Hub; without either it stops with one clear line before downloading anything.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from gist_core.errors import RegistryError
from gist_core.registry.card import read_card
from gist_core.registry.client import Store, model_name
from gist_core.registry.serving import download_version, version_number
from gist_core.registry.tags import CARD_FILE

log = logging.getLogger(__name__)


def hub_token() -> str:
    """The Hub token to publish with; raises a clear error when offline or without one."""
    # deferred: huggingface_hub is only needed to publish
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise RegistryError(
            "cannot publish: HF_HUB_OFFLINE is set, so the Hugging Face Hub is not reachable from this "
            "process; unset it on a machine that can reach https://huggingface.co"
        )
    token = get_token()
    if not token:
        raise RegistryError(
            "cannot publish: no Hugging Face token; set HF_TOKEN to a write token or run `hf auth login`"
        )
    return token


def publish(
    store: Store, repo_id: str, version: str = "champion", name: str | None = None, private: bool = True
) -> str:
    """Upload a version (a number or an alias) with its card to the Hub repository ``repo_id``; returns its URL."""
    # deferred: huggingface_hub is only needed to publish
    from huggingface_hub import HfApi

    token = hub_token()
    name = model_name(store, name)
    number = version_number(store, version, name)
    text = read_card(store, number, name)
    with tempfile.TemporaryDirectory(prefix="gist-publish-") as scratch:
        folder = download_version(store, number, Path(scratch) / "model", name)
        (folder / CARD_FILE).write_text(text)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(
                folder_path=str(folder), repo_id=repo_id, commit_message=f"{name} version {number} (GISTEmbed)"
            )
        except Exception as err:  # noqa: BLE001 - network, auth and Hub errors become one clear line
            raise RegistryError(
                f"publishing {name} version {number} to the Hugging Face Hub ({repo_id}) failed: "
                f"{type(err).__name__}: {err}"
            ) from None
    log.info("published %s version %s to %s", name, number, repo_id)
    return f"https://huggingface.co/{repo_id}"
