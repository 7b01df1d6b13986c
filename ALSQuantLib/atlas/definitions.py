"""Atlas definitions: which files make an atlas, and its regions (data: ``atlases.json`` beside this module)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import io
from ..errors import InputError
from .tables import LabelTable


@dataclass(frozen=True)
class Region:
    """A named region: labels of one atlas per side. ``labels`` maps side ("left", "right", "both") → values.

    ``split_hemisphere``: the atlas does not separate sides, so each side is the label restricted to its half of the
    template (x < 0 left in RAS, x > 0 right, about the template's midline).
    """

    name: str
    labels: dict
    kind: str = "white_matter"  # or "cortex": decides the partial-volume control
    split_hemisphere: bool = False


@dataclass(frozen=True)
class AtlasDefinition:
    """File names (relative to an atlas folder), regions, and where an FSL installation keeps the files."""

    name: str
    template: str
    labels: str
    table: str
    regions: tuple
    template_contrast: str = "T1w"
    fsl_paths: tuple = ()
    midline_x_mm: float = 0.0
    space: str = ""


def _regions_from_json(entries, where):
    regions = []
    for entry in entries:
        try:
            labels = {side: tuple(int(v) for v in values) for side, values in entry["labels"].items()}
            regions.append(
                Region(
                    entry["name"], labels, entry.get("kind", "white_matter"), bool(entry.get("split_hemisphere", False))
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"{where}: entry {entry!r} is not a region ({err})") from None
    return regions


def _builtin_atlases():
    path = Path(__file__).with_name("atlases.json")
    atlases = {}
    for name, entry in io.read_json(path)["atlases"].items():
        atlases[name] = AtlasDefinition(
            name,
            template=entry["template"],
            labels=entry["labels"],
            table=entry["table"],
            regions=tuple(_regions_from_json(entry["regions"], f"{path}, atlas {name}")),
            fsl_paths=tuple(entry.get("fsl_paths", ())),
            midline_x_mm=float(entry.get("midline_x_mm", 0.0)),
            space=entry.get("space", name),
        )
    return atlases


BUILTIN_ATLASES = _builtin_atlases()
"""Atlas name → `AtlasDefinition`, from ``atlases.json``."""

ATLAS_COMBINATIONS = tuple(io.read_json(Path(__file__).with_name("atlases.json")).get("combinations", ()))
"""Combined atlases offered as choices (``"jhu-tracts,harvard-oxford"``); any comma list of atlases works."""

STUDY_MAPS = {"CST": ("mk", "fa", "md"), "M1": ("ms",)}
"""The study's defaults: DKI maps measured in the CST, susceptibility in M1."""


@dataclass
class Atlas:
    """An atlas resolved to files: template (and FA template), label image, label table (parsed, and its file), its
    regions and its template space.

    A combined atlas (`ALSQuantLib.atlas.composite.combine_atlases`) holds its label image in memory
    (``label_data``) and the atlases it was made from (``sources``).
    """

    name: str
    template: Path
    labels: Path
    table: LabelTable
    regions: dict
    template_fa: Path = None
    midline_x_mm: float = 0.0
    table_file: Path = None
    space: str = ""
    label_data: tuple = None
    sources: tuple = ()

    def load_labels(self):
        """``(label image as int32, affine)``."""
        if self.label_data is not None:
            return self.label_data
        data, affine = io.load_image(self.labels, ndim=3, what=f"atlas {self.name} labels")
        return data.astype(np.int32), affine

    def files(self):
        """Name → path of every file this atlas reads (for provenance): template, FA template, labels, table; a
        combined atlas's are its sources', prefixed with their names."""
        if self.sources:
            return {f"{source.name}_{k}": v for source in self.sources for k, v in source.files().items()}
        named = {"template": self.template, "template_fa": self.template_fa, "labels": self.labels}
        named["table"] = self.table_file
        return {k: Path(v) for k, v in named.items() if v is not None}

    def region(self, name):
        try:
            return self.regions[name]
        except KeyError:
            raise InputError(f"region {name!r}: atlas {self.name} defines {', '.join(self.regions)}") from None


def load_regions_json(path, atlas_name=None, *, required=True):
    """User region definitions: ``{"regions": [{"name": "CST", "atlas": "eve", "labels": {"left": [29], ...},
    "kind": "white_matter", "split_hemisphere": false}, ...]}``."""
    data = io.read_json(path)
    regions = {}
    for entry in data.get("regions", []):
        if atlas_name and entry.get("atlas", atlas_name) != atlas_name:
            continue
        try:
            labels = {side: tuple(int(v) for v in values) for side, values in entry["labels"].items()}
            regions[entry["name"]] = Region(
                entry["name"], labels, entry.get("kind", "white_matter"), bool(entry.get("split_hemisphere", False))
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"regions file {path}: entry {entry!r} is not a region ({err})") from None
    if not regions and required:
        raise InputError(f"regions file {path}: no regions for atlas {atlas_name}")
    return regions


def label_json_regions(atlas):
    """The atlas's regions as a JSON-ready dict (the format `load_regions_json` reads)."""
    regions = [
        {
            "name": r.name,
            "atlas": atlas.name,
            "labels": {side: list(values) for side, values in r.labels.items()},
            "kind": r.kind,
            "split_hemisphere": r.split_hemisphere,
        }
        for r in atlas.regions.values()
    ]
    return {"regions": regions}
