"""Uploads are size-limited, stored under uploads_dir() with sanitized names (no path traversal), never run."""

from __future__ import annotations

import pytest

from ftcore.paths import uploads_dir
from ui.uploads import (DATASET_SUFFIXES, MAX_CONFIG_BYTES, UploadError, safe_name, save_config_upload,
                        save_upload)


@pytest.mark.parametrize("given,expected", [
    ("../../etc/passwd.jsonl", "passwd.jsonl"),
    ("..\\..\\windows\\evil.csv", "evil.csv"),
    ("/abs/path/data set (1).jsonl", "data_set_1_.jsonl"),
    (".hidden.jsonl", "hidden.jsonl"),
    ("..", "upload"),
    ("", "upload"),
])
def test_safe_name_keeps_only_a_plain_file_name(given, expected):
    assert safe_name(given) == expected


def test_a_traversal_name_is_stored_inside_the_uploads_folder():
    path = save_upload(b'{"text": "hi"}\n', "../../../../tmp/owned.jsonl", kind="datasets", max_bytes=1024,
                       suffixes=DATASET_SUFFIXES)
    assert (uploads_dir() / "datasets").resolve() in path.resolve().parents
    assert path.name.endswith("-owned.jsonl") and path.read_bytes() == b'{"text": "hi"}\n'


def test_same_name_different_content_does_not_overwrite():
    a = save_upload(b"a\n", "d.jsonl", kind="datasets", max_bytes=1024, suffixes=DATASET_SUFFIXES)
    b = save_upload(b"b\n", "d.jsonl", kind="datasets", max_bytes=1024, suffixes=DATASET_SUFFIXES)
    assert a != b and a.read_bytes() == b"a\n" and b.read_bytes() == b"b\n"


def test_too_big_empty_and_wrong_type_are_refused_with_the_reason():
    with pytest.raises(UploadError, match="limit is 10 bytes"):
        save_upload(b"x" * 11, "d.jsonl", kind="datasets", max_bytes=10, suffixes=DATASET_SUFFIXES)
    with pytest.raises(UploadError, match="empty"):
        save_upload(b"", "d.jsonl", kind="datasets", max_bytes=10, suffixes=DATASET_SUFFIXES)
    with pytest.raises(UploadError, match="must end with"):
        save_upload(b"print(1)", "train.py", kind="datasets", max_bytes=100, suffixes=DATASET_SUFFIXES)
    with pytest.raises(UploadError, match="config.json is"):
        save_config_upload(b" " * (MAX_CONFIG_BYTES + 1))


def test_config_upload_becomes_a_folder_the_estimator_accepts():
    path = save_config_upload(b'{"model_type": "gpt2"}')
    assert path.name == "config.json" and path.parent.parent == uploads_dir() / "configs"
