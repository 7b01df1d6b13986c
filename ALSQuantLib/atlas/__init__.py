"""Atlas labelling with ANTs and automatic ROI measurement.

Atlases are data, not code: an atlas is a template image, a label image and a label table (names, colours).
Regions are data too: a named set of labels of one atlas, per side (e.g. ``CST`` = Eve labels 29 left, 117 right).

The study's approach: the subject is registered to the atlas template (rigid → affine → SyN, antspyx), and the
*inverse* transform brings the atlas labels into the subject's own space (generic-label interpolation), where the
maps are measured.

No atlas file is shipped: users point to their own files, or they are found in an FSL installation
(``$FSLDIR/data/atlases``), or downloaded once from their official source with a SHA-256 check into a cache.

The package, by job: `tables` (label tables), `definitions` (built-in atlases and regions, ``atlases.json``),
`sources` (folders, FSL, downloads and the cache, ``sources.json``), `registration` (ANTs), `measure` (region
masks, ROI statistics, the cortex core, quality flags) and `labeling` (`LabelingOptions` and `label_subject`).
"""

from ..registration import Registration, from_ants, register, to_ants
from .definitions import (
    BUILTIN_ATLASES,
    STUDY_MAPS,
    Atlas,
    AtlasDefinition,
    Region,
    label_json_regions,
    load_regions_json,
)
from .labeling import (
    ATLAS_SOURCES_HELP,
    Labeling,
    LabelingOptions,
    atlas_for,
    automatic_atlas,
    label_subject,
    register_subject,
    template_brain_mask,
)
from .measure import (
    MIN_IN_VIEW,
    PLAUSIBLE_RANGES,
    QUALITY_LIMITS,
    contrast_fingerprint,
    cortex_core,
    outside_brain_shares,
    plausible,
    quality_flags,
    region_masks,
    region_values,
    roi_statistics,
    split_labels_by_hemisphere,
    volume_ratios,
)
from .registration import propagate_labels, template_points_to_subject, warp_to_subject
from .sources import OFFICIAL, default_cache_dir, fetch, fetch_atlas, find_atlas, official_sources, table_names
from .tables import LabelTable, read_color_table, read_fsl_xml, read_index_table, read_label_table

__all__ = [
    "ATLAS_SOURCES_HELP",
    "BUILTIN_ATLASES",
    "MIN_IN_VIEW",
    "OFFICIAL",
    "QUALITY_LIMITS",
    "STUDY_MAPS",
    "Atlas",
    "AtlasDefinition",
    "LabelTable",
    "Labeling",
    "LabelingOptions",
    "Region",
    "Registration",
    "atlas_for",
    "automatic_atlas",
    "contrast_fingerprint",
    "cortex_core",
    "default_cache_dir",
    "fetch",
    "fetch_atlas",
    "find_atlas",
    "from_ants",
    "label_json_regions",
    "label_subject",
    "register_subject",
    "load_regions_json",
    "official_sources",
    "outside_brain_shares",
    "propagate_labels",
    "quality_flags",
    "read_color_table",
    "read_fsl_xml",
    "read_index_table",
    "read_label_table",
    "region_masks",
    "region_values",
    "register",
    "roi_statistics",
    "plausible",
    "PLAUSIBLE_RANGES",
    "split_labels_by_hemisphere",
    "table_names",
    "template_brain_mask",
    "template_points_to_subject",
    "to_ants",
    "volume_ratios",
    "warp_to_subject",
]
