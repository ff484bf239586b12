"""Where slides come from: the competition's CSVs and the external sources declared in config.

Every slide is named ``{source}/{image_id}``; the competition's sources are ``train`` and ``test``.
An external source is a mapping ``{name, kind, root, labels_csv, magnification}``: ``kind: slides``
(whole slides, read by openslide or pyvips) or ``kind: patches`` (pre-cut tiles, one bag per image_id).
Its labels CSV has columns ``image_id, file, label`` (``file`` relative to ``root``) and may add
``patient_id`` or other group columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ubc_ocean.io_utils import MissingInput
from ubc_ocean.slides.magnification import is_tma_by_size

TRAIN, TEST = "train", "test"
LABEL_COLUMNS = ("image_id", "file", "label")


@dataclass
class SlideSpec:
    """What the tiler needs to know about one slide before opening it."""

    source: str
    image_id: str
    path: Path
    thumbnail: Path | None = None
    is_tma: bool | None = None
    magnification: float | None = None  # per-source setting, used when the file has no mpp
    expected_size: tuple[int, int] | None = None  # (width, height) from the CSV, checked against the file
    label: str | None = None
    competition_scale: bool = False  # no mpp: WSI 20x / TMA 40x (slides.*), as for the competition's PNGs

    @property
    def slide_id(self) -> str:
        return f"{self.source}/{self.image_id}"


@dataclass(frozen=True)
class SlideFiles:
    """Where one slide's pieces are (``layout.find_slide`` fills it in)."""

    slide_id: str
    label: str | None
    image: Path  # the raw image
    thumbnail: Path | None  # used for the view when it stands for the image
    embeddings: Path  # h5 with coords
    extent: int  # a tile's level-0 side
    tiles: Path | None = None  # stage-01 tile folder (training slides); None: tiles are cut from the image
    fold: int | None = None  # its validation fold (training slides): heatmaps use that fold's checkpoints


@dataclass
class ExternalSource:
    name: str
    kind: str
    root: Path
    labels_csv: Path
    magnification: float | None

    def labels(self) -> pd.DataFrame:
        if not self.labels_csv.is_file():
            raise MissingInput(self.labels_csv, f"external source '{self.name}' needs its labels file: put it "
                               "there or leave the source out of external.sources (stage 00 writes the "
                               "synthetic ones)")
        frame = pd.read_csv(self.labels_csv, dtype={"image_id": str})
        missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"external source '{self.name}': {self.labels_csv.name} lacks columns {missing}")
        return frame


def external_sources(cfg: Mapping) -> list[ExternalSource]:
    """Resolve ``external.sources``; roots are relative to ``paths.external``."""
    sources = []
    for entry in cfg["external"]["sources"] or []:  # checked when the config loads (config/schema.py)
        name, kind = entry["name"], entry.get("kind", "slides")
        root = Path(cfg["paths"]["external"]) / str(entry.get("root", name))
        labels = root / str(entry.get("labels_csv", "labels.csv"))
        magnification = entry.get("magnification")
        sources.append(ExternalSource(name, kind, root, labels, float(magnification) if magnification else None))
    return sources


def raw_path(cfg: Mapping, key: str) -> Path:
    return Path(cfg["paths"]["raw"]) / cfg["data"][key]


def raw_remedy(cfg: Mapping) -> str:
    """How to get the competition's raw folder, as a :class:`~ubc_ocean.io_utils.MissingInput` remedy."""
    return (f"download the competition data into {cfg['paths']['raw']} (kaggle competitions download -c "
            "UBC-OCEAN, then unzip), or run `make demo` for the synthetic set (configs/demo.yaml)")


def _read_raw_csv(cfg: Mapping, key: str) -> pd.DataFrame:
    path = raw_path(cfg, key)
    if not path.is_file():
        raise MissingInput(path, raw_remedy(cfg))
    return pd.read_csv(path, dtype={"image_id": str})


def read_train_csv(cfg: Mapping) -> pd.DataFrame:
    frame = _read_raw_csv(cfg, "train_csv")
    if frame["is_tma"].dtype != bool:
        frame["is_tma"] = frame["is_tma"].astype(str).str.lower().isin(["true", "1"])
    return frame


def read_test_csv(cfg: Mapping) -> pd.DataFrame:
    return _read_raw_csv(cfg, "test_csv")


def competition_specs(cfg: Mapping, split: str) -> list[SlideSpec]:
    """Slide specs for the competition's ``train`` or ``test`` images (thumbnails used when present)."""
    frame = read_train_csv(cfg) if split == TRAIN else read_test_csv(cfg)
    images = raw_path(cfg, f"{split}_images")
    thumbnails = raw_path(cfg, f"{split}_thumbnails")
    specs = []
    for row in frame.itertuples(index=False):
        image_id = str(row.image_id)
        specs.append(
            SlideSpec(
                source=split,
                image_id=image_id,
                path=images / f"{image_id}.png",
                thumbnail=thumbnails / f"{image_id}_thumbnail.png",
                is_tma=bool(row.is_tma) if "is_tma" in frame.columns else None,
                expected_size=(int(row.image_width), int(row.image_height)),
                label=getattr(row, "label", None),
                competition_scale=True,
            )
        )
    return specs


def spec_is_tma(spec: SlideSpec, slides: Mapping) -> bool:
    """Whether a slide is a TMA before it is opened: its CSV's ``is_tma``, else the size rule on its CSV size
    (``slides.tma_max_side``, ``slides.tma_square_tolerance``); a slide with neither counts as a WSI."""
    if spec.is_tma is not None:
        return bool(spec.is_tma)
    if not spec.expected_size or min(spec.expected_size) <= 0:
        return False
    width, height = spec.expected_size
    return is_tma_by_size(width, height, int(slides["tma_max_side"]), float(slides["tma_square_tolerance"]))


def is_tma_by_image(cfg: Mapping, split: str = TEST) -> dict[str, bool]:
    """``{image_id: is_tma}`` of every image of the competition's ``split`` (:func:`spec_is_tma`): the real
    ``test.csv`` has no ``is_tma`` column, so there the size rule decides."""
    return {spec.image_id: spec_is_tma(spec, cfg["slides"]) for spec in competition_specs(cfg, split)}


def external_slide_specs(source: ExternalSource) -> list[SlideSpec]:
    frame = source.labels().drop_duplicates("image_id")
    return [
        SlideSpec(
            source=source.name,
            image_id=str(row.image_id),
            path=source.root / str(row.file),
            magnification=source.magnification,
            label=str(row.label),
        )
        for row in frame.itertuples(index=False)
    ]
