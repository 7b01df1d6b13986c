"""Where an atlas's files come from: a folder, an FSL installation, or a download (once, checked by SHA-256) into
a cache. The official download addresses are data: ``sources.json`` beside this module."""

import hashlib
import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path

from .. import io, outputs, provenance
from ..errors import InputError, OutputError
from .definitions import BUILTIN_ATLASES, Atlas
from .tables import read_label_table

log = logging.getLogger(__name__)


def default_cache_dir():
    """``$ALSQUANT_CACHE``, else ``~/.cache/alsquant``."""
    return Path(os.environ.get("ALSQUANT_CACHE", Path.home() / ".cache" / "alsquant"))


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_url(url, what):
    """Only https (plain http on loopback, for local mirrors and tests): a download's integrity rests on its
    checksum, its privacy and provenance on TLS."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS):
        return parts
    raise InputError(f"{what} {url}: expected an https:// address (http:// only on this machine's loopback)")


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same host and only to an allowed scheme."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), _check_url(newurl, "download redirected to")
        if new.hostname != old.hostname:
            raise InputError(
                f"download {req.full_url}: redirected to another host ({newurl}); refused, give the final address"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url, sha256, cache_dir=None, *, filename=None, timeout=60):
    """Download `url` into the cache (once) and check its SHA-256; return the cached path.

    The file is written to a temporary name and renamed only when its checksum matches, so the cache never holds a
    partial or corrupted file; a cached file whose checksum no longer matches is downloaded again. Only https is
    accepted (http on loopback), and redirects only to the same host.

    Parameters
    ----------
    filename : str, optional
        Name in the cache folder (default: the URL's file name behind the checksum's first 16 digits).
    """
    _check_url(url, "download")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / (filename or f"{sha256[:16]}-{Path(url.split('?')[0]).name}")
    if target.is_file() and provenance.file_sha256(target) == sha256:
        return target
    digest = hashlib.sha256()
    opener = urllib.request.build_opener(_SameHostRedirects)
    try:
        with outputs.atomic_path(target) as tmp, open(tmp, "wb") as out, opener.open(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
            out.flush()
            if digest.hexdigest() != sha256:
                raise InputError(f"download {url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}")
    except OutputError:
        raise
    except OSError as err:  # URLError and HTTPError are OSErrors
        raise InputError(f"download {url} failed: {err}") from None
    return target


OFFICIAL = "official"
"""Pass as `sources` to download from the addresses built into ``atlas_sources.json``."""


def official_sources(name):
    """The built-in download list of atlas `name`: its distributor's files pinned to a commit, with SHA-256,
    licence and citation (``atlas_sources.json`` beside this module)."""
    listed = io.read_json(Path(__file__).with_name("sources.json"))["atlases"]
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
        log.info(
            "atlas %s from %s. %s. Cite: %s", name, sources["distributor"], sources["licence"], sources["citation"]
        )
    else:
        where = "atlas sources" if isinstance(sources, dict) else f"atlas sources {sources}"
    files = (sources if isinstance(sources, dict) else io.read_json(sources)).get("files")
    if not isinstance(files, dict):
        raise InputError(f'{where}: expected {{"files": {{name: {{"url": ..., "sha256": ...}}}}}}')
    definition = BUILTIN_ATLASES[name]
    tables = table_names(definition)
    table = next((t for t in tables if t in files), tables[0])
    needed = [definition.template, definition.labels, table]
    missing = [f for f in needed if f not in files]
    if missing:
        raise InputError(f"{where}: no entry for {', '.join(missing)} (atlas {name} needs {', '.join(needed)})")
    folder = Path(cache_dir or default_cache_dir()) / "atlases" / name
    wanted = needed + (["template_FA.nii.gz"] if "template_FA.nii.gz" in files else [])
    for filename in wanted:
        entry = files[filename]
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("url"), str)
            or len(str(entry.get("sha256", ""))) != 64
        ):
            raise InputError(f"{where}: entry {filename!r} needs a url and a 64-digit sha256")
        fetch(entry["url"], entry["sha256"].lower(), folder, filename=filename)
    return folder, wanted


FSL_TEMPLATE = "data/standard/MNI152_T1_1mm_brain.nii.gz"
FSL_TEMPLATE_FA = "data/standard/FMRIB58_FA_1mm.nii.gz"
"""FSL's MNI152 T1 brain and its FA template (FMRIB58), to which FSL's atlases are aligned."""


def find_atlas(name, *, atlas_dir=None, template=None, template_fa=None, fsldir=None, sources=None, cache_dir=None):
    """Resolve a built-in atlas to files.

    Looks in `atlas_dir` (the user's folder holding the files named in the definition, or FSL's XML table), then in
    ``$FSLDIR/data/atlases`` (FSL's layout), then, when `sources` is given (``"official"`` or a sources file),
    downloads the files into the cache (`fetch_atlas`). `template` overrides the template image (e.g. an MNI152 T1
    for the FSL atlases, which ship without one). The FA template is `template_fa` when given, else
    ``template_FA.nii.gz`` beside the labels (from the user's folders; from the cache only when this call verified
    it against its sources), else, for an atlas found in FSL, FSL's ``FMRIB58_FA_1mm``. FSL's files are found in
    `fsldir` (default ``$FSLDIR``) by FSL's own layout: ``data/atlases/<atlas>``, ``data/atlases/*.xml``,
    ``data/standard``.
    """
    if name not in BUILTIN_ATLASES:
        raise InputError(f"atlas {name!r}: expected one of {', '.join(BUILTIN_ATLASES)}, or give your own files")
    definition = BUILTIN_ATLASES[name]
    candidates = []  # (label image, label-table choices, where an FA template may be: None for nowhere)
    if atlas_dir:
        folder = Path(atlas_dir)
        tables = [folder / t for t in table_names(definition)]
        candidates.append((folder / definition.labels, tables, folder / "template_FA.nii.gz"))
    fsldir = fsldir or os.environ.get("FSLDIR")
    if fsldir and definition.fsl_paths:
        base = Path(fsldir) / "data" / "atlases"
        candidates.append(
            (base / definition.fsl_paths[0], [base / definition.fsl_paths[1]], Path(fsldir) / FSL_TEMPLATE_FA)
        )

    def resolved(labels, tables):
        return labels.is_file() and next((t for t in tables if t.is_file()), None)

    if sources is not None and not any(resolved(*c[:2]) for c in candidates):
        folder, verified = fetch_atlas(name, sources, cache_dir)
        tables = [folder / t for t in table_names(definition)]
        fa = folder / "template_FA.nii.gz" if "template_FA.nii.gz" in verified else None
        candidates.append((folder / definition.labels, tables, fa))
    for labels, tables, fa in candidates:
        table = resolved(labels, tables)
        if table:
            template_path = Path(template) if template else labels.parent / definition.template
            if not template_path.is_file() and fsldir:
                template_path = Path(fsldir) / FSL_TEMPLATE
            if not template_path.is_file():
                raise InputError(
                    f"atlas {name}: template {template_path} not found; give a template image (--template)"
                )
            if template_fa:
                fa = Path(template_fa)
                if not fa.is_file():
                    raise InputError(f"FA template {fa}: file not found")
            return Atlas(
                name,
                template_path,
                labels,
                read_label_table(table),
                {r.name: r for r in definition.regions},
                template_fa=fa if fa is not None and fa.is_file() else None,
                midline_x_mm=definition.midline_x_mm,
                table_file=table,
                space=definition.space,
            )
    looked = ", ".join(str(c[0].parent) for c in candidates) or "nowhere (no atlas folder given, FSLDIR unset)"
    raise InputError(
        f"atlas {name}: files {definition.labels} and {definition.table} not found; looked in {looked}"
        + ("" if sources is not None else "; or give atlas sources (URLs and SHA-256, or 'official') to download them")
    )
