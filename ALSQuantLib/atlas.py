"""Atlas labelling with ANTs and automatic ROI measurement.

Atlases are data, not code: an atlas is a template image, a label image and a label table (names, colours).
Regions are data too: a named set of labels of one atlas, per side (e.g. ``CST`` = Eve labels 29 left, 117 right).

The study's approach: the subject is registered to the atlas template (rigid → affine → SyN, antspyx), and the
*inverse* transform brings the atlas labels into the subject's own space (generic-label interpolation), where the
maps are measured.

No atlas file is shipped: users point to their own files, or they are found in an FSL installation
(``$FSLDIR/data/atlases``), or downloaded once from their official source with a SHA-256 check into a cache.
"""

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import geometry, io, phantom, provenance
from .errors import InputError
from .progress import report as report_progress

log = logging.getLogger(__name__)

# ANTs repeats exactly only single-threaded and with a non-zero seed, and ITK reads its thread count once, at its
# first use: so it is fixed here, before antspyx is imported. ALSQUANT_ANTS_THREADS=2 buys speed (measured 1.6x on
# the phantom) at the price of run-to-run differences.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", os.environ.get("ALSQUANT_ANTS_THREADS", "1"))


# ----------------------------------------------------------------------------------------------------------------
# Label tables
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LabelTable:
    """Label value → (name, (r, g, b))."""

    entries: dict = field(default_factory=dict)

    def name(self, value):
        return self.entries[value][0]

    def values(self, name):
        """Label values whose name equals `name` (case-insensitive)."""
        return [v for v, (n, _) in self.entries.items() if n.lower() == name.lower()]

    def as_list(self):
        return [(v, n, rgb) for v, (n, rgb) in sorted(self.entries.items())]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_color_table(path):
    """Read a Slicer colour table (``index name R G B A`` per line; ``#`` comments).

    Real files have quirks this survives: stray characters after the colour (the Eve table has ``)`` on some
    lines), names with brackets, tabs. A line without a leading integer and a name is refused with its number.
    """
    path = Path(path)
    table = LabelTable()
    for number, line in enumerate(io._existing(path, "colour table").read_text(errors="replace").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) < 2 or not parts[0].lstrip("-").isdigit():
            raise InputError(f"colour table {path}, line {number}: expected 'index name R G B A', got {text!r}")
        colour = [int(float(x)) for x in _NUMBER.findall(" ".join(parts[2:]))[:3]]
        table.entries[int(parts[0])] = (parts[1], tuple(colour + [128] * (3 - len(colour))))
    if not table.entries:
        raise InputError(f"colour table {path}: no labels found")
    return table


def read_index_table(path, *, first_value=1):
    """Read a plain index file in which line N names label N (FSL's ``*_index.txt`` as distributed)."""
    path = io._existing(path, "label index")
    names = [line.strip() for line in path.read_text().splitlines()]
    table = LabelTable({0: ("Background", (0, 0, 0))})
    for offset, name in enumerate(names):
        if name:
            table.entries[first_value + offset] = (name.replace(" ", "_"), _colour(first_value + offset))
    return table


def read_fsl_xml(path):
    """Read an FSL atlas XML; ``<label index="i">`` names image value i + 1 (FSL's 0-based index of a maxprob map)."""
    path = io._existing(path, "FSL atlas XML")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise InputError(f"FSL atlas XML {path}: not valid XML ({err})") from None
    table = LabelTable({0: ("Background", (0, 0, 0))})
    for label in root.iter("label"):
        value = int(label.get("index")) + 1
        table.entries[value] = ((label.text or f"label_{value}").strip().replace(" ", "_"), _colour(value))
    if len(table.entries) == 1:
        raise InputError(f"FSL atlas XML {path}: no <label> elements")
    return table


def _colour(value):
    rng = np.random.default_rng(value)
    return tuple(int(c) for c in rng.integers(40, 255, 3))


def read_label_table(path):
    """A label table from a Slicer colour table (.ctbl/.txt with colours), FSL XML, or an index file."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return read_fsl_xml(path)
    first = next((line for line in io._existing(path, "label table").read_text().splitlines() if line.strip() and not line.startswith("#")), "")
    if first.split() and first.split()[0].isdigit():
        return read_color_table(path)
    return read_index_table(path)


# ----------------------------------------------------------------------------------------------------------------
# Atlas definitions
# ----------------------------------------------------------------------------------------------------------------
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


BUILTIN_ATLASES = {
    "eve": AtlasDefinition(
        "eve",
        template="JHU_MNI_SS_T1_Brain.nii.gz",
        labels="JHU_MNI_SS_WMPM_Type-I.nii.gz",
        table="JHU_MNI_SS_WMPM_Type-I_SlicerLUT.txt",
        regions=(
            Region("CST", {"left": (29,), "right": (117,)}),
            Region("M1", {"left": (6,), "right": (94,)}, kind="cortex"),
            Region("precentral_WM", {"left": (71,), "right": (159,)}),
        ),
        midline_x_mm=-90.0,  # Eve's affine has origin 0: the midline lies at x = −90 mm
    ),
    "jhu-icbm-labels": AtlasDefinition(
        "jhu-icbm-labels",
        template="MNI152_T1_1mm_brain.nii.gz",
        labels="JHU-ICBM-labels-1mm.nii.gz",
        table="JHU-labels_index.txt",
        regions=(Region("CST", {"left": (8,), "right": (7,)}),),
        fsl_paths=("JHU/JHU-ICBM-labels-1mm.nii.gz", "JHU-labels.xml"),
    ),
    "jhu-tracts": AtlasDefinition(
        "jhu-tracts",
        template="MNI152_T1_1mm_brain.nii.gz",
        labels="JHU-ICBM-tracts-maxprob-thr25-1mm.nii.gz",
        table="JHU-tracts_index.txt",
        regions=(Region("CST", {"left": (3,), "right": (4,)}),),
        fsl_paths=("JHU/JHU-ICBM-tracts-maxprob-thr25-1mm.nii.gz", "JHU-tracts.xml"),
    ),
    "harvard-oxford": AtlasDefinition(
        "harvard-oxford",
        template="MNI152_T1_1mm_brain.nii.gz",
        labels="HarvardOxford-cort-maxprob-thr25-1mm.nii.gz",
        table="HarvardOxford-Cortical_index.txt",
        regions=(Region("M1", {"both": (7,)}, kind="cortex", split_hemisphere=True),),
        fsl_paths=("HarvardOxford/HarvardOxford-cort-maxprob-thr25-1mm.nii.gz", "HarvardOxford-Cortical.xml"),
    ),
    "phantom": AtlasDefinition(
        "phantom",
        template="template_T1w.nii.gz",
        labels="template_label.nii.gz",
        table="template_label.ctbl",
        regions=(
            Region("CST", {"left": (phantom.CST_LEFT,), "right": (phantom.CST_RIGHT,)}),
            Region("M1", {"left": (phantom.M1_LEFT,), "right": (phantom.M1_RIGHT,)}, kind="cortex"),
        ),
    ),
}

STUDY_MAPS = {"CST": ("mk", "fa", "md"), "M1": ("ms",)}
"""The study's defaults: DKI maps measured in the CST, susceptibility in M1."""


@dataclass
class Atlas:
    """An atlas resolved to files: template, label image, label table, and its regions."""

    name: str
    template: Path
    labels: Path
    table: LabelTable
    regions: dict
    template_fa: Path = None
    midline_x_mm: float = 0.0

    def region(self, name):
        try:
            return self.regions[name]
        except KeyError:
            raise InputError(f"region {name!r}: atlas {self.name} defines {', '.join(self.regions)}") from None


def load_regions_json(path, atlas_name=None):
    """User region definitions: ``{"regions": [{"name": "CST", "atlas": "eve", "labels": {"left": [29], ...},
    "kind": "white_matter", "split_hemisphere": false}, ...]}``."""
    data = io.read_json(path)
    regions = {}
    for entry in data.get("regions", []):
        if atlas_name and entry.get("atlas", atlas_name) != atlas_name:
            continue
        try:
            labels = {side: tuple(int(v) for v in values) for side, values in entry["labels"].items()}
            regions[entry["name"]] = Region(entry["name"], labels, entry.get("kind", "white_matter"), bool(entry.get("split_hemisphere", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"regions file {path}: entry {entry!r} is not a region ({err})") from None
    if not regions:
        raise InputError(f"regions file {path}: no regions for atlas {atlas_name}")
    return regions


def default_cache_dir():
    """``$ALSQUANT_CACHE``, else ``~/.cache/alsquant``."""
    return Path(os.environ.get("ALSQUANT_CACHE", Path.home() / ".cache" / "alsquant"))


def fetch(url, sha256, cache_dir=None, *, filename=None, timeout=60):
    """Download `url` into the cache (once) and check its SHA-256; return the cached path.

    The file is written to a temporary name and renamed only when its checksum matches, so the cache never holds a
    partial or corrupted file; a cached file whose checksum no longer matches is downloaded again.

    Parameters
    ----------
    filename : str, optional
        Name in the cache folder (default: the URL's file name behind the checksum's first 16 digits).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / (filename or f"{sha256[:16]}-{Path(url.split('?')[0]).name}")
    if target.is_file() and provenance.file_sha256(target) == sha256:
        return target
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise InputError(f"download {url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}")
        os.replace(tmp, target)
    except OSError as err:
        raise InputError(f"download {url} failed: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


OFFICIAL = "official"
"""Pass as `sources` to download from the addresses built into ``atlas_sources.json``."""


def official_sources(name):
    """The built-in download list of atlas `name`: its distributor's files pinned to a commit, with SHA-256,
    licence and citation (``atlas_sources.json`` beside this module)."""
    listed = io.read_json(Path(__file__).with_name("atlas_sources.json"))["atlases"]
    if name not in listed:
        raise InputError(
            f"atlas {name}: no official download address is built in (only for {', '.join(listed)}); "
            "give its files with an atlas folder or your own atlas sources file"
        )
    return listed[name]


def table_names(definition):
    """The label-table file names an atlas folder may hold: the definition's, then FSL's XML."""
    return (definition.table,) + ((Path(definition.fsl_paths[1]).name,) if definition.fsl_paths else ())


def fetch_atlas(name, sources, cache_dir=None):
    """Download a built-in atlas's files into ``<cache>/atlases/<name>/`` and return that folder (for `find_atlas`).

    Parameters
    ----------
    sources : str, Path or dict
        ``"official"`` (`OFFICIAL`) for the built-in addresses (`official_sources`), or a JSON file (or its content)
        naming where each file comes from:
        ``{"files": {"<file name>": {"url": "https://...", "sha256": "<64 hex digits>"}, ...}}``. It must cover the
        atlas's template, label image and label table (the definition's name or FSL's XML); an FA template
        (``template_FA.nii.gz``) is fetched too when listed. Every file is checked against its SHA-256 before it
        enters the cache.
    """
    if name not in BUILTIN_ATLASES:
        raise InputError(f"atlas {name!r}: expected one of {', '.join(BUILTIN_ATLASES)}")
    if str(sources) == OFFICIAL:
        sources, where = official_sources(name), f"official atlas sources of {name}"
        log.info("atlas %s from %s. %s. Cite: %s", name, sources["distributor"], sources["licence"], sources["citation"])
    else:
        where = "atlas sources" if isinstance(sources, dict) else f"atlas sources {sources}"
    files = (sources if isinstance(sources, dict) else io.read_json(sources)).get("files")
    if not isinstance(files, dict):
        raise InputError(f"{where}: expected {{\"files\": {{name: {{\"url\": ..., \"sha256\": ...}}}}}}")
    definition = BUILTIN_ATLASES[name]
    tables = table_names(definition)
    table = next((t for t in tables if t in files), tables[0])
    needed = [definition.template, definition.labels, table]
    missing = [f for f in needed if f not in files]
    if missing:
        raise InputError(f"{where}: no entry for {', '.join(missing)} (atlas {name} needs {', '.join(needed)})")
    folder = Path(cache_dir or default_cache_dir()) / "atlases" / name
    for filename in needed + (["template_FA.nii.gz"] if "template_FA.nii.gz" in files else []):
        entry = files[filename]
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or len(str(entry.get("sha256", ""))) != 64:
            raise InputError(f"{where}: entry {filename!r} needs a url and a 64-digit sha256")
        fetch(entry["url"], entry["sha256"].lower(), folder, filename=filename)
    return folder


def find_atlas(name, *, atlas_dir=None, template=None, fsldir=None, sources=None, cache_dir=None):
    """Resolve a built-in atlas to files.

    Looks in `atlas_dir` (the user's folder holding the files named in the definition, or FSL's XML table), then in
    ``$FSLDIR/data/atlases`` (FSL's layout), then, when `sources` is given (``"official"`` or a sources file),
    downloads the files into the cache (`fetch_atlas`). `template` overrides the template image (e.g. an MNI152 T1
    for the FSL atlases, which ship without one).
    """
    if name not in BUILTIN_ATLASES:
        raise InputError(f"atlas {name!r}: expected one of {', '.join(BUILTIN_ATLASES)}, or give your own files")
    definition = BUILTIN_ATLASES[name]
    candidates = []  # (label image, label-table choices)
    if atlas_dir:
        candidates.append((Path(atlas_dir) / definition.labels, [Path(atlas_dir) / t for t in table_names(definition)]))
    fsldir = fsldir or os.environ.get("FSLDIR")
    if fsldir and definition.fsl_paths:
        base = Path(fsldir) / "data" / "atlases"
        candidates.append((base / definition.fsl_paths[0], [base / definition.fsl_paths[1]]))

    def resolved(labels, tables):
        return labels.is_file() and next((t for t in tables if t.is_file()), None)

    if sources is not None and not any(resolved(*c) for c in candidates):
        folder = fetch_atlas(name, sources, cache_dir)
        candidates.append((folder / definition.labels, [folder / t for t in table_names(definition)]))
    for labels, tables in candidates:
        table = resolved(labels, tables)
        if table:
            template_path = Path(template) if template else labels.parent / definition.template
            if not template_path.is_file() and fsldir:
                template_path = Path(fsldir) / "data" / "standard" / "MNI152_T1_1mm_brain.nii.gz"
            if not template_path.is_file():
                raise InputError(f"atlas {name}: template {template_path} not found; pass template=")
            fa = labels.parent / "template_FA.nii.gz"
            return Atlas(
                name,
                template_path,
                labels,
                read_label_table(table),
                {r.name: r for r in definition.regions},
                template_fa=fa if fa.is_file() else None,
                midline_x_mm=definition.midline_x_mm,
            )
    looked = ", ".join(str(c[0].parent) for c in candidates) or "nowhere (no atlas folder given, FSLDIR unset)"
    raise InputError(
        f"atlas {name}: files {definition.labels} and {definition.table} not found; looked in {looked}"
        + ("" if sources is not None else "; or give atlas sources (URLs and SHA-256, or 'official') to download them")
    )


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------
def to_ants(data, affine):
    import ants

    origin, spacing, direction = geometry.itk_from_affine(affine)
    return ants.from_numpy(np.ascontiguousarray(data, dtype=np.float32), origin=origin, spacing=spacing, direction=direction)


def from_ants(image):
    return image.numpy(), geometry.affine_from_itk(image.origin, image.spacing, image.direction)


@dataclass
class Registration:
    """Subject → template registration: ANTs transform files, and quality figures."""

    forward: list
    inverse: list
    similarity: float
    workdir: Path

    def cleanup(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


def register(subject, subject_affine, template, template_affine, *, transform="SyNRA", random_seed=0, workdir=None):
    """Register the subject image to the template (rigid → affine → SyN by default) with antspyx.

    Parameters
    ----------
    subject, template : ndarray, 3D
        Images of similar contrast (e.g. subject FA and template FA; GRE magnitude and template T1w works through
        the mutual-information metric).
    transform : str
        ANTsPy ``type_of_transform`` (``"SyNRA"``: rigid + affine + SyN; ``"Rigid"``; ``"Affine"``).
    random_seed : int
        Seeds the metric sampling; with ANTs single-threaded (this module's default) results repeat bit for bit.

    Returns
    -------
    Registration
    """
    import ants
    import ants.config

    if os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") != "1":
        log.warning("ANTs runs multi-threaded: registrations will differ slightly from run to run")
    fixed = to_ants(template / max(np.percentile(template, 99), 1e-6), template_affine)
    moving = to_ants(subject / max(np.percentile(subject, 99), 1e-6), subject_affine)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="alsquant-ants-"))
    # antsRegistration reads seed 0 as "seed from the clock": shift by one. antspyx takes the seed from its config.
    previous = ants.config._random_seed
    ants.config._random_seed = int(random_seed) + 1
    try:
        result = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform, outprefix=str(workdir / "reg_"))
    finally:
        ants.config._random_seed = previous
    similarity = float(ants.image_similarity(fixed, result["warpedmovout"], metric_type="Correlation"))
    return Registration(result["fwdtransforms"], result["invtransforms"], -similarity, workdir)


def _inverse_chain(registration):
    """The registration's inverse transforms and which of them ANTs must invert (the affine ones)."""
    return list(registration.inverse), [not str(t).endswith(".nii.gz") for t in registration.inverse]


def propagate_labels(labels, template_affine, subject_shape, subject_affine, registration, *, link=None):
    """Atlas labels in the subject's space through the inverse transform (generic-label interpolation).

    Parameters
    ----------
    registration : Registration
        Subject reference → template.
    link : Registration, optional
        Another image of the same subject (e.g. GRE magnitude) → the reference, rigid: the labels then land on that
        image's grid (`subject_shape`, `subject_affine`), one atlas registration serving both.
    """
    import ants

    transforms, invert = _inverse_chain(registration)
    if link is not None:
        # ANTs applies the last transform first to a point of the output grid: image → reference → template.
        link_transforms, link_invert = _inverse_chain(link)
        transforms, invert = transforms + link_transforms, invert + link_invert
    moved = ants.apply_transforms(
        fixed=to_ants(np.zeros(subject_shape, np.float32), subject_affine),
        moving=to_ants(labels.astype(np.float32), template_affine),
        transformlist=transforms,
        whichtoinvert=invert,
        interpolator="genericLabel",
    )
    return np.rint(moved.numpy()).astype(np.int32)


def region_masks(labels, affine, atlas, region_names, *, template_midline_x=None):
    """Boolean masks per (region, side) for a label image in some space.

    For regions with ``split_hemisphere``, the side is decided on the label image's own x coordinate relative to
    `template_midline_x` (use labels in template space, before propagation).
    """
    masks = {}
    for name in region_names:
        region = atlas.region(name)
        if region.split_hemisphere:
            world_x = geometry.voxel_centers_world(labels.shape, affine)[..., 0]
            midline = atlas.midline_x_mm if template_midline_x is None else template_midline_x
            inside = np.isin(labels, region.labels["both"])
            masks[(name, "left")] = inside & (world_x < midline)
            masks[(name, "right")] = inside & (world_x > midline)
        else:
            for side, values in region.labels.items():
                masks[(name, side)] = np.isin(labels, values)
    return masks


def split_labels_by_hemisphere(labels, affine, atlas):
    """Give each split-hemisphere region's left and right halves their own label values (value, value + 1000)."""
    out = labels.astype(np.int32).copy()
    world_x = geometry.voxel_centers_world(labels.shape, affine)[..., 0]
    for region in atlas.regions.values():
        if region.split_hemisphere:
            for value in region.labels["both"]:
                out[(labels == value) & (world_x > atlas.midline_x_mm)] = value + 1000
    return out


# ----------------------------------------------------------------------------------------------------------------
# ROI statistics
# ----------------------------------------------------------------------------------------------------------------
def roi_statistics(maps, masks, *, subject="", erosion_voxels=0, fa=None, fa_threshold=0.2, kinds=None):
    """Tidy statistics: one row per region × side × map.

    Parameters
    ----------
    maps : dict name → ndarray (all on the grid of the masks)
    masks : dict (region, side) → ndarray of bool
    erosion_voxels : int
        Erode each region mask first (partial-volume control at region borders); a region that would vanish keeps
        its uneroded mask, and the row says so.
    fa : ndarray, optional
        FA on the same grid: white-matter regions keep voxels with FA ≥ `fa_threshold`.
    kinds : dict region → "white_matter" | "cortex", optional

    Returns
    -------
    list of dict with subject, region, side, map, n, mean, median, sd, iqr, eroded
    """
    rows = []
    for (region, side), mask in masks.items():
        selected = mask.copy()
        eroded = False
        if erosion_voxels > 0:
            candidate = ndimage.binary_erosion(mask, iterations=erosion_voxels)
            if candidate.any():
                selected, eroded = candidate, True
        kind = (kinds or {}).get(region, "white_matter")
        if kind == "white_matter" and fa is not None:
            selected &= fa >= fa_threshold
        for name, values in maps.items():
            v = values[selected]
            v = v[np.isfinite(v)]
            stats = dict(n=int(v.size), mean=np.nan, median=np.nan, sd=np.nan, iqr=np.nan)
            if v.size:
                q1, q3 = np.percentile(v, [25, 75])
                stats.update(mean=float(v.mean()), median=float(np.median(v)), sd=float(v.std(ddof=1)) if v.size > 1 else 0.0, iqr=float(q3 - q1))
            rows.append({"subject": subject, "region": region, "side": side, "map": name, **stats, "eroded": eroded})
    return rows


def grey_matter_mask(image, mask, *, seed=0):
    """Grey matter of a brain image: the middle-intensity class of a three-class Gaussian mixture of its voxels in
    `mask` (scikit-learn).

    Grey matter lies between CSF and white matter in GRE magnitude (CSF brightest), T2w and T1w (CSF darkest) alike,
    so the middle class is grey matter whichever the contrast. No bias-field correction: use on images without a
    strong intensity bias (or corrected ones).

    Parameters
    ----------
    image : ndarray, 3D
    mask : ndarray of bool, same shape: the brain (background voxels would form a class of their own)
    seed : int
        Seeds the mixture's initialisation and subsample: the same input gives the same mask.
    """
    from sklearn.mixture import GaussianMixture

    image, mask = np.asarray(image, dtype=float), np.asarray(mask, bool)
    if image.shape != mask.shape:
        raise InputError(f"grey-matter segmentation: image shape {image.shape} and mask shape {mask.shape} differ")
    values = image[mask]
    values = values[np.isfinite(values)]
    if values.size < 300 or np.ptp(values) == 0:
        raise InputError(f"grey-matter segmentation: the brain mask holds {values.size} voxels of distinct values; expected a brain image")
    # Standardised, so that any intensity scale works (real magnitudes come scaled to 1e-4 as well as to 4096):
    # scikit-learn's covariance floor is absolute.
    centre, scale = values.mean(), values.std()
    subsample = np.random.default_rng(seed).choice(values, size=min(values.size, 200_000), replace=False)
    mixture = GaussianMixture(3, random_state=seed).fit((subsample[:, None] - centre) / scale)
    middle = int(np.argsort(mixture.means_.ravel())[1])
    out = np.zeros(image.shape, bool)
    inside = mask & np.isfinite(image)
    out[inside] = mixture.predict((image[inside][:, None] - centre) / scale) == middle
    return out


def cortex_core(region, grey_matter, voxel_size, margin_mm):
    """The part of a cortex region farther than `margin_mm` from grey matter outside it.

    A propagated cortical label misplaced along the ribbon takes in the neighbouring cortex (another gyrus, with
    other values) at its ends; this keeps its core. Plain erosion would remove the whole ribbon, which is only a
    voxel or two thick: the ribbon's sides, against CSF and white matter, are left to the grey-matter mask.
    """
    region = region & grey_matter
    if margin_mm <= 0 or not region.any():
        return region
    distance = ndimage.distance_transform_edt(~(grey_matter & ~region), sampling=voxel_size)
    return region & (distance > margin_mm)


def dice(a, b):
    """Dice coefficient of two boolean masks."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def volume_ratios(subject_masks, subject_affine, template_masks, template_affine):
    """Region volume in the subject / in the template, per (region, side): a registration failure flag when far
    from 1 (brains differ by tens of percent, not by factors)."""
    v_subject = np.prod(geometry.voxel_sizes(subject_affine))
    v_template = np.prod(geometry.voxel_sizes(template_affine))
    ratios = {}
    for key, mask in subject_masks.items():
        reference = template_masks[key].sum() * v_template
        ratios[key] = float(mask.sum() * v_subject / reference) if reference else float("nan")
    return ratios


def quality_flags(similarity, ratios, *, min_similarity=0.5, ratio_range=(0.5, 2.0)):
    """Reasons to distrust a registration: low template similarity (`Registration.similarity`), or region volumes
    far from the template's."""
    flags = []
    if similarity < min_similarity:
        flags.append(f"template correlation after registration {similarity:.2f} < {min_similarity}")
    for (region, side), ratio in ratios.items():
        if not ratio_range[0] <= ratio <= ratio_range[1]:
            flags.append(f"{region} {side} volume is {ratio:.2f} x the template's")
    return flags


def label_json_regions(atlas):
    """The atlas's regions as a JSON-ready dict (the format `load_regions_json` reads)."""
    regions = [
        {"name": r.name, "atlas": atlas.name, "labels": {side: list(values) for side, values in r.labels.items()},
         "kind": r.kind, "split_hemisphere": r.split_hemisphere}
        for r in atlas.regions.values()
    ]  # fmt: skip
    return {"regions": regions}


# ----------------------------------------------------------------------------------------------------------------
# The whole labelling of one subject
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Labeling:
    """Output of `label_subject`.

    ``label_images``: space ("reference", "gre") → (label image, affine), split-hemisphere regions' right halves as
    value + 1000; ``table``: the label table naming those values; ``rows``: `roi_statistics` rows with ``space`` and
    ``qc_passed``; ``ratios``: (region, side) → volume / template volume; ``flags``: quality warnings;
    ``transforms``: the kept ANTs transform files (subject → template: affine ``.mat``, then SyN warps), if asked;
    ``grey_matter``: space → (mask, affine) of the grey matter that cortex regions were restricted to.
    """

    label_images: dict
    table: LabelTable
    rows: list
    ratios: dict
    flags: list
    similarity: float
    transforms: list = field(default_factory=list)
    grey_matter: dict = field(default_factory=dict)

    @property
    def passed(self):
        return not self.flags


def region_values(atlas, region_name, side):
    """Label values of a region's side in a label image made by `split_labels_by_hemisphere`."""
    region = atlas.region(region_name)
    if region.split_hemisphere:
        base = region.labels["both"]
        return base if side == "left" else tuple(v + 1000 for v in base)
    return region.labels[side]


def _on_grid(image, shape, affine):
    data, image_affine = image
    return data.shape == tuple(shape) and np.allclose(image_affine, affine, atol=1e-3)


def label_subject(
    reference,
    reference_affine,
    atlas,
    rois,
    *,
    template_contrast="FA",
    maps=None,
    gre_magnitude=None,
    tissue_mask=None,
    cortex_segmentation=True,
    cortex_margin_mm=3.0,
    erosion_voxels=0,
    fa_threshold=0.2,
    seed=0,
    subject="",
    keep_transforms=None,
    progress=None,
):
    """Register the subject to the atlas, bring the regions back, and measure the maps in them.

    Parameters
    ----------
    reference : ndarray, 3D
        The subject's reference in DWI space: FA (registered to the atlas's FA template when it has one, else to
        its T1w template) or a T1-like image (`template_contrast` ``"T1w"``).
    atlas : Atlas
    rois : sequence of str
        Region names of the atlas.
    maps : dict name → (ndarray, affine), optional
        Maps to measure, each on the reference's grid or on the GRE's.
    gre_magnitude : (ndarray, affine), optional
        GRE magnitude (first echo if 4D): rigidly linked to the reference, the labels are also brought onto its grid.
    tissue_mask : (ndarray, affine), optional
        Grey-matter mask on either grid: cortex regions (their label voxels and so their statistics) keep only its
        voxels.
    cortex_segmentation : bool
        Without a `tissue_mask`, segment the grey matter of the GRE magnitude (`grey_matter_mask` inside its brain
        mask) and restrict cortex regions on the GRE grid to it: a propagated cortical ribbon misplaced by a voxel
        spills into CSF or white matter, which this removes.
    cortex_margin_mm : float
        With grey matter (segmented or given), cortex regions are measured only farther than this from the grey
        matter around them (`cortex_core`; the written labels keep them whole); 0 measures them whole.
    keep_transforms : path, optional
        Folder to copy the registration's transform files into (else they are deleted).

    Returns
    -------
    Labeling
    """
    maps = maps or {}
    for roi in rois:
        atlas.region(roi)
    grids = {"reference": (reference.shape, reference_affine)}
    if gre_magnitude is not None:
        gre, gre_affine = gre_magnitude
        gre = gre[..., 0] if gre.ndim == 4 else gre
        grids["gre"] = (gre.shape, gre_affine)
    if tissue_mask is not None:
        tissue_mask = (np.asarray(tissue_mask[0]) > 0, tissue_mask[1])
        if not any(_on_grid(tissue_mask, *grid) for grid in grids.values()):
            raise InputError(f"tissue mask {tissue_mask[0].shape}: on neither the reference's nor the GRE's grid")
    elif cortex_segmentation and gre_magnitude is not None and any(atlas.region(r).kind == "cortex" for r in rois):
        from . import qsm

        tissue_mask = (grey_matter_mask(gre, qsm.brain_mask(gre, geometry.voxel_sizes(gre_affine)), seed=seed), gre_affine)
    use_fa = template_contrast == "FA" and atlas.template_fa is not None
    template, template_affine = io.load_image(atlas.template_fa if use_fa else atlas.template, ndim=3, what="template")
    raw_labels, labels_affine = io.load_image(atlas.labels, ndim=3, what="atlas labels")
    raw_labels = raw_labels.astype(np.int32)
    labels = split_labels_by_hemisphere(raw_labels, labels_affine, atlas)
    report_progress(progress, 0.0, f"registering to the {atlas.name} template ({'FA' if use_fa else 'T1w'}), SyN", log)
    registration = register(reference, reference_affine, template, template_affine, random_seed=seed)
    link = None
    try:
        label_images = {
            "reference": (propagate_labels(labels, labels_affine, reference.shape, reference_affine, registration), reference_affine)
        }
        if gre_magnitude is not None:
            report_progress(progress, 0.8, "linking the GRE to the reference (rigid)", log)
            link = register(gre, gre_affine, reference, reference_affine, transform="Rigid", random_seed=seed)
            label_images["gre"] = (propagate_labels(labels, labels_affine, gre.shape, gre_affine, registration, link=link), gre_affine)
        similarity = registration.similarity
        kept = []
        if keep_transforms is not None:
            Path(keep_transforms).mkdir(parents=True, exist_ok=True)
            for path in registration.forward:
                kept.append(Path(keep_transforms) / Path(path).name)
                with io.atomic_path(kept[-1]) as tmp:
                    shutil.copyfile(path, tmp)
    finally:
        registration.cleanup()
        if link is not None:
            link.cleanup()
    template_masks = region_masks(raw_labels, labels_affine, atlas, rois)
    table = LabelTable(dict(atlas.table.entries))
    for value in np.unique(labels[labels >= 1000]):
        name, rgb = table.entries.get(int(value) - 1000, (f"label_{int(value) - 1000}", (128, 128, 128)))
        table.entries[int(value)] = (f"{name}_right", rgb)
    rows, ratios, grey_matter, emptied = [], {}, {}, []
    for space, (label_image, affine) in label_images.items():
        shape = grids[space][0]
        masks = {key: np.isin(label_image, region_values(atlas, *key)) for key in template_masks}
        if space == "reference":
            ratios = volume_ratios(masks, affine, template_masks, labels_affine)
        if tissue_mask is not None and _on_grid(tissue_mask, shape, affine):
            grey_matter[space] = tissue_mask
            for (region, side), mask in masks.items():
                if atlas.region(region).kind == "cortex":
                    label_image[mask & ~tissue_mask[0]] = 0  # the written labels: the region in grey matter, whole
                    mask &= tissue_mask[0]
                    if not mask.any():
                        emptied.append(f"{region} {side} has no grey-matter voxel in {space} space")
                    core = cortex_core(mask, tissue_mask[0], geometry.voxel_sizes(affine), cortex_margin_mm)
                    masks[(region, side)] = core if core.any() else mask
        here = {name: image[0] for name, image in maps.items() if _on_grid(image, shape, affine)}
        rows += [
            {**row, "space": space}
            for row in roi_statistics(
                here, masks, subject=subject, erosion_voxels=erosion_voxels, fa=here.get("fa"), fa_threshold=fa_threshold,
                kinds={r: atlas.region(r).kind for r in rois},
            )
        ]  # fmt: skip
    unmatched = sorted(set(maps) - {row["map"] for row in rows})
    if unmatched:
        raise InputError(f"map(s) {', '.join(unmatched)}: on neither the reference's nor the GRE's grid")
    flags = quality_flags(similarity, ratios) + emptied
    for row in rows:
        row["qc_passed"] = not flags
    report_progress(progress, 1.0, "labelling done", log)
    return Labeling(label_images, table, rows, ratios, flags, similarity, kept, grey_matter)


def write_labeling(out_dir, labeling):
    """Write ``labels_<space>.nii.gz``, ``grey_matter_<space>.nii.gz`` (if any), ``labels.ctbl``, ``roi_stats.csv``
    and ``quality.json``; return the paths."""
    out_dir = Path(out_dir)
    outputs = []
    for space, (label_image, affine) in labeling.label_images.items():
        outputs.append(out_dir / f"labels_{space}.nii.gz")
        io.save_image(outputs[-1], label_image, affine, dtype=np.int16)
    for space, (mask, affine) in labeling.grey_matter.items():
        outputs.append(out_dir / f"grey_matter_{space}.nii.gz")
        io.save_image(outputs[-1], mask, affine, dtype=np.uint8)
    outputs += [out_dir / "labels.ctbl", out_dir / "roi_stats.csv", out_dir / "quality.json"]
    io.write_color_table(outputs[-3], labeling.table.as_list())
    io.write_table(outputs[-2], labeling.rows)
    io.write_json(
        outputs[-1],
        {
            "template_correlation": labeling.similarity,
            "volume_ratio": {f"{r}_{s}": v for (r, s), v in labeling.ratios.items()},
            "flags": labeling.flags,
            "passed": labeling.passed,
        },
    )
    return outputs
