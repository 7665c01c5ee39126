from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from gist_core.errors import ModelError
from gist_core.models import (
    extract_model_zip,
    fingerprint,
    join_split_zip,
    load_sentence_transformer,
    packaged_model,
    resolve_model,
)


def test_resolve_short_name_hub_id_path_and_unknown(tmp_path: Path) -> None:
    models = tmp_path / "models"
    ref = resolve_model("all-MiniLM-L6-v2", models)
    assert (ref.source, ref.location) == ("packaged", str(models / "all-MiniLM-L6-v2"))
    # the Hub id of a packaged model resolves to the offline copy
    assert resolve_model("sentence-transformers/all-mpnet-base-v2", models).source == "packaged"
    (tmp_path / "my-model").mkdir()
    local = resolve_model("my-model", models, root=tmp_path)
    assert local.source == "path" and local.location == str((tmp_path / "my-model").resolve())
    hub = resolve_model("BAAI/bge-small-en-v1.5", models)
    assert (hub.source, hub.location, hub.is_local) == ("hub", "BAAI/bge-small-en-v1.5", False)
    with pytest.raises(ModelError, match="unknown model 'not-a-model'"):
        resolve_model("not-a-model", models)
    with pytest.raises(ModelError, match="empty"):
        resolve_model("  ", models)


def _model_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/modules.json", "[]")
        zf.writestr("all-mpnet-base-v2/config.json", "{}")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
        zf.writestr("__MACOSX/._config.json", "junk")
    return buf.getvalue()


def test_split_zip_is_joined_in_order_and_junk_dropped(tmp_path: Path) -> None:
    payload = _model_zip()
    size = len(payload) // 3 + 1
    parts = []
    for i in range(3):
        part = tmp_path / f"m.zip.{i + 1:03d}"
        part.write_bytes(payload[i * size : (i + 1) * size])
        parts.append(part)
    joined = join_split_zip(list(reversed(parts)), tmp_path / "m.zip")
    assert joined.read_bytes() == payload
    folder = extract_model_zip(joined, tmp_path / "out")
    assert folder == tmp_path / "out" / "all-mpnet-base-v2"
    assert (folder / "modules.json").is_file()
    assert not (folder / "desktop.ini").exists() and not (tmp_path / "out" / "__MACOSX").exists()


def test_split_zip_errors(tmp_path: Path) -> None:
    (tmp_path / "m.zip.001").write_bytes(b"x")
    (tmp_path / "m.zip.003").write_bytes(b"y")
    with pytest.raises(ModelError, match="complete 1..N"):
        join_split_zip([tmp_path / "m.zip.001", tmp_path / "m.zip.003"], tmp_path / "m.zip")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a valid zip"):
        extract_model_zip(tmp_path / "bad.zip", tmp_path / "o")


def test_fingerprint_is_content_not_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        (d / "README.md").write_text(f"card for {d}")
    assert fingerprint(a) == fingerprint(b)
    (b / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint(a) != fingerprint(b)


def test_load_failure_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    ref = resolve_model(str(tmp_path / "broken"), tmp_path)
    with pytest.raises(ModelError, match="could not load model"):
        load_sentence_transformer(ref)


def test_packaged_catalogue() -> None:
    mpnet = packaged_model("all-mpnet-base-v2")
    assert mpnet is not None and len(mpnet.packages) == 5 and mpnet.layout == "split_zip"
    assert packaged_model("something-else") is None
