"""Atlas label tables: label value → (name, colour), read from Slicer colour tables, FSL XML or index files."""

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..errors import InputError


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
    first = next(
        (
            line
            for line in io._existing(path, "label table").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ),
        "",
    )
    if first.split() and first.split()[0].isdigit():
        return read_color_table(path)
    return read_index_table(path)
