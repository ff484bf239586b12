"""Encoder weights resolved in one place (kind, location, identity, input size) and the weights checksum
remembered per file version, in memory and in the user cache folder, with real files throughout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders import create_encoder, weights
from ubc_ocean.encoders.registry import encoder_cache_name
from ubc_ocean.encoders.weights import (
    CHECKSUM_CACHE_FILE,
    ResolvedWeights,
    cached_file_checksum,
    checksum_cache_dir,
    efficientnet_lite0_weights_file,
    file_checksum,
    resolve_weights,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Each test starts with an empty memo and its own on-disk cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("UBC_OCEAN_CACHE", str(folder))
    monkeypatch.setattr(weights, "_MEMO", {})
    return folder


@pytest.fixture
def hash_calls(monkeypatch) -> list[Path]:
    """Every full read of a weights file, by path."""
    calls: list[Path] = []
    real = weights.file_checksum

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(weights, "file_checksum", counting)
    return calls


def _blob(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_packaged_default_keeps_its_identity():
    resolved = resolve_weights("efficientnet_lite0")
    packaged = efficientnet_lite0_weights_file()
    assert resolved.kind == "packaged" and resolved.location == packaged
    assert resolved.identity == file_checksum(packaged)
    assert resolved.architecture == "efficientnet_lite0" and resolved.input_size == 224 and resolved.preset is None
    # the folder the existing embeddings live in
    assert encoder_cache_name("efficientnet_lite0", None, 128) == "efficientnet_lite0-57934424-s128"


def test_the_default_encoders_input_size_is_timms_without_asking_timm():
    import timm

    # resolve_input_size answers it from a constant, so naming the default embeddings folder loads no timm
    assert timm.get_pretrained_cfg(weights.DEFAULT_ENCODER).input_size[-1] == weights.DEFAULT_ENCODER_INPUT_SIZE
    assert weights.resolve_input_size(weights.DEFAULT_ENCODER, None) == weights.DEFAULT_ENCODER_INPUT_SIZE


def test_local_file_resolves_to_its_sha256(tmp_path):
    content = os.urandom(3000)
    path = _blob(tmp_path / "w.pth", content)
    resolved = resolve_weights("resnet10t", path)
    assert resolved == ResolvedWeights("resnet10t", "local_file", path, hashlib.sha256(content).hexdigest(),
                                       "resnet10t", 176)
    with pytest.raises(AttributeError):
        resolved.identity = "0" * 64  # frozen


def test_second_resolution_reads_nothing_and_a_changed_file_is_hashed_again(tmp_path, hash_calls):
    path = _blob(tmp_path / "w.pth", b"a" * 1000)
    first = resolve_weights("resnet10t", path).identity
    assert resolve_weights("resnet10t", str(path)).identity == first  # str or Path: the same resolved path
    assert encoder_cache_name("resnet10t", path, 64).startswith(f"resnet10t-{first[:8]}-")
    assert len(hash_calls) == 1

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched: same bytes, new mtime
    assert resolve_weights("resnet10t", path).identity == first
    assert len(hash_calls) == 2

    _blob(path, b"b" * 1001)  # rewritten: new size
    changed = resolve_weights("resnet10t", path).identity
    assert changed == hashlib.sha256(b"b" * 1001).hexdigest() != first
    assert len(hash_calls) == 3


def test_a_file_changing_while_hashed_is_not_remembered(tmp_path, monkeypatch, hash_calls):
    path = _blob(tmp_path / "w.pth", b"x" * 100)
    counting = weights.file_checksum

    def growing(target):
        with open(target, "ab") as handle:  # another process still writing the download
            handle.write(b"y")
        return counting(target)

    monkeypatch.setattr(weights, "file_checksum", growing)
    cached_file_checksum(path)
    monkeypatch.setattr(weights, "file_checksum", counting)
    assert cached_file_checksum(path) == hashlib.sha256(b"x" * 100 + b"y").hexdigest()
    assert len(hash_calls) == 2


def test_disk_cache_answers_a_fresh_process(tmp_path, private_cache, hash_calls):
    path = _blob(tmp_path / "w.pth", os.urandom(2000))
    identity = resolve_weights("resnet10t", path).identity
    stored = json.loads((private_cache / CHECKSUM_CACHE_FILE).read_text())
    assert stored["files"][str(path.resolve())]["sha256"] == identity
    assert not [p for p in private_cache.iterdir() if p.name != CHECKSUM_CACHE_FILE]  # no temp file left

    # a new interpreter whose hashing function refuses to run still knows the identity
    script = (
        "import sys\n"
        "from ubc_ocean.encoders import weights\n"
        "def refuse(path):\n"
        "    raise AssertionError('hashed again')\n"
        "weights.file_checksum = refuse\n"
        "print(weights.resolve_weights('resnet10t', sys.argv[1]).identity)\n"
    )
    src = str(Path(weights.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == identity

    # the same in this process once the memo is gone
    weights._MEMO.clear()
    assert resolve_weights("resnet10t", path).identity == identity
    assert len(hash_calls) == 1


def test_unwritable_or_corrupt_cache_never_fails(tmp_path, monkeypatch, hash_calls, caplog):
    path = _blob(tmp_path / "w.pth", b"z" * 500)
    want = hashlib.sha256(b"z" * 500).hexdigest()
    blocker = _blob(tmp_path / "not_a_folder", b"")
    monkeypatch.setenv("UBC_OCEAN_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    with caplog.at_level("DEBUG", logger="ubc_ocean.encoders.weights"):
        assert resolve_weights("resnet10t", path).identity == want
    assert "not writable" in caplog.text
    assert resolve_weights("resnet10t", path).identity == want and len(hash_calls) == 1  # the memo still works

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    _blob(corrupt / CHECKSUM_CACHE_FILE, b"{not json")
    monkeypatch.setenv("UBC_OCEAN_CACHE", str(corrupt))
    weights._MEMO.clear()
    assert resolve_weights("resnet10t", path).identity == want
    assert json.loads((corrupt / CHECKSUM_CACHE_FILE).read_text())["files"][str(path.resolve())]["sha256"] == want


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UBC_OCEAN_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert checksum_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("UBC_OCEAN_CACHE")
    assert checksum_cache_dir() == tmp_path / "xdg" / "ubc_ocean"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert checksum_cache_dir() == tmp_path / "home" / ".cache" / "ubc_ocean"


def test_hub_weights_resolve_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    preset = resolve_weights("uni", "hub")
    assert (preset.kind, preset.location, preset.architecture) == ("hub", "MahmoodLab/UNI", "hf-hub:MahmoodLab/UNI")
    assert preset.identity == hashlib.sha256(b"hub:MahmoodLab/UNI").hexdigest() and preset.input_size == 224

    name = "hf-hub:timm/resnet10t.c3_in1k"
    hub = resolve_weights(name)
    assert (hub.kind, hub.location, hub.architecture) == ("hub", "timm/resnet10t.c3_in1k", name)
    assert hub.identity == hashlib.sha256(name.encode()).hexdigest()
    assert hub.input_size == 176  # timm's registry, read locally
    assert encoder_cache_name(name, None, 96) == f"hf-hub-timm-resnet10t.c3_in1k-{hub.identity[:8]}-s96"

    with pytest.raises(ConfigError, match=re.escape("needs features.input_size")):
        resolve_weights("hf-hub:someone/their-model")
    assert resolve_weights("hf-hub:someone/their-model", None, 224).kind == "hub"


def test_configuration_errors_are_raised_by_the_resolver(tmp_path):
    for call in (lambda: resolve_weights("resnet18"), lambda: encoder_cache_name("resnet18", None, None)):
        with pytest.raises(ValueError, match=re.escape("needs a weights file (features.weights): without one")):
            call()
    for call in (lambda: resolve_weights("uni"), lambda: encoder_cache_name("uni", None, None)):
        with pytest.raises(ValueError, match=re.escape("needs features.weights: download pytorch_model.bin from "
                                                       "https://huggingface.co/MahmoodLab/UNI")):
            call()
    absent = tmp_path / "absent.pth"
    for name in ("resnet18", "uni", "efficientnet_lite0"):
        with pytest.raises(FileNotFoundError, match=re.escape(f"weights file not found: {absent}")):
            encoder_cache_name(name, absent, None)
    path = _blob(tmp_path / "w.pth", b"w")
    with pytest.raises(ConfigError, match=re.escape("'ctranspath' takes 224 px input only")):
        resolve_weights("ctranspath", path, 112)
    vit = resolve_weights("lunit_dino_vit_s16", path, 112)
    assert vit.interpolate_positions and vit.input_size == 112 and vit.architecture == "vit_small_patch16_224"


def test_cache_name_matches_the_built_encoder(tmp_path):
    for size in (None, 64):
        assert encoder_cache_name("efficientnet_lite0", None, size) == create_encoder(input_size=size).cache_name

    source = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    built = create_encoder("resnet10t", weights=path)
    assert encoder_cache_name("resnet10t", path, None) == built.cache_name
    assert built.weights_id == file_checksum(path) and built.input_size == 176 and built.out_dim == 512
    tiles = torch.randint(0, 255, (2, 176, 176, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(built.model(built.preprocess(tiles)), source(built.preprocess(tiles)), atol=1e-5)
