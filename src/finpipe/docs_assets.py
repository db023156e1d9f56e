"""Data Docs that work offline: the scripts, styles and fonts GX's pages load, as local files.

GX's page templates load jQuery, Bootstrap, bootstrap-table, Font Awesome and Vega from public
CDNs, and the index page builds its table of validations with those scripts: on a machine with
no internet (a bank's normal case) the index listed no validation at all and every page was
unstyled. finpipe ships the very files those URLs name (docs_static/, with their licences; its
README says where each comes from) and reads GX's templates through a loader that points each
CDN URL at the site's own copy under static/vendor/. Each build records the files its pages
link to, and `SiteAssets.install` copies those into the site (hard links to a neighbouring
site's where they are the same bytes), so a site stays whole when it is moved (a quarantined
batch takes its site along) and carries no more than its pages use: the Vega scripts (800 kB)
only where a page draws a chart.

This module does not import great_expectations (`finpipe.gx_runtime` is the one that does): it
works on GX's Jinja environments and on the folder of GX's static files it is given.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jinja2

logger = logging.getLogger(__name__)

# The vendored files (package data): docs_static/<package>/..., each package with its licence.
VENDORED = Path(__file__).parent / "docs_static"
# Where a site keeps them: <site>/static/vendor/<package>/... beside GX's static/images/.
SITE_VENDOR = "vendor"

# GX's CDN URL -> the vendored file that replaces it (under docs_static/). The files are the
# npm packages' own builds at the versions the URLs name; the two bootstrap-table filter-control
# styles GX takes from 1.19.0 come from 1.19.1 like the rest of bootstrap-table, and the dark
# theme is its package's minified build of the stylesheet GX links unminified (880 kB).
CDN_FILES: dict[str, str] = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": (
        "bootstrap/css/bootstrap.min.css"
    ),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": (
        "bootstrap/js/bootstrap.min.js"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": (
        "popper.js/popper.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": (
        "bootstrap-table/bootstrap-table.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": (
        "bootstrap-table/bootstrap-table.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.js": (
        "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.js"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.min.css": (
        "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
    "bootstrap-table-filter-control.css": (
        "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/"
    "bootstrap-datepicker.min.css": "bootstrap-datepicker/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/"
    "bootstrap-datepicker.min.js": "bootstrap-datepicker/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/"
    "bootstrap-prefers-dark.css": "bootstrap-dark/css/bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": (
        "fontawesome/css/all.min.css"
    ),
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed/vega-embed.min.js",
}
# Files a vendored stylesheet loads itself (relative to it), copied along with it.
CSS_FILES: dict[str, tuple[str, ...]] = {
    "fontawesome/css/all.min.css": tuple(
        f"fontawesome/webfonts/{name}.woff2"
        for name in ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")
    ),
}
# Scripts only a page that draws a chart (GX's `graph` content block) needs.
CHART_SCRIPTS = frozenset(url for url, path in CDN_FILES.items() if path.startswith("vega"))

# Other remote references in GX's templates, and what replaces them. The logo came from GX's
# web bucket with the data context id in its query (GX's static folder has the same image);
# the dark theme's logo has no local copy, so the dark navigation bar shows none.
_REWRITES = (
    (
        'static_images_dir + "logo-long.png" | add_data_context_id_to_url',
        "finpipe_asset('images/logo-long.png')",
    ),
    ('static_images_dir + "favicon.ico"', "finpipe_asset('images/favicon.ico')"),
    (
        "url('https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
        "full_logo_dark.png')",
        "none",
    ),
)
# Subresource-integrity and CORS attributes: a file:// page cannot load a script that has them.
_CDN_ATTRIBUTES = re.compile(r'\s+(?:integrity|crossorigin)="[^"]*"')
# A script, stylesheet, image or CSS url() fetched from the network.
REMOTE_ASSET = re.compile(
    r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)\s*=\s*["']?(https?://[^"'\s>]+)"""
    r"""|url\(\s*["']?(https?://[^"')\s]+)""",
    re.IGNORECASE,
)


def remote_assets(text: str) -> list[str]:
    """Return the network URLs an HTML page or template loads as scripts, styles or images."""
    return [a or b for a, b in REMOTE_ASSET.findall(text)]


@functools.lru_cache(maxsize=256)
def offline_source(name: str, source: str) -> str:
    """Return GX template `name`'s `source` with its CDN assets pointed at the site's copies.

    Each URL becomes a call to `finpipe_asset`, which the page environment provides (see
    `SiteAssets.attach`); the Vega scripts load only where `finpipe_charts()` says the page has
    a chart. A remote asset left over (a GX release that changed a URL) is logged once.
    """
    for url in CHART_SCRIPTS:
        local = f"{{{{ finpipe_asset('{SITE_VENDOR}/{CDN_FILES[url]}') }}}}"
        source = source.replace(
            f'<script src="{url}"></script>',
            f'{{% if finpipe_charts() %}}<script src="{local}"></script>{{% endif %}}',
        )
    for url, path in CDN_FILES.items():
        source = source.replace(f'"{url}"', f"\"{{{{ finpipe_asset('{SITE_VENDOR}/{path}') }}}}\"")
    for old, new in _REWRITES:
        source = source.replace(old, new)
    source = _CDN_ATTRIBUTES.sub("", source)
    for url in remote_assets(source):
        logger.warning(
            "Data Docs template %s still loads %s from the network: its pages need internet "
            "access for it (finpipe.docs_assets.CDN_FILES has no local copy of it)",
            name,
            url,
        )
    return source


class _OfflineLoader(jinja2.BaseLoader):
    """GX's template loader, serving each template as `offline_source` rewrites it."""

    def __init__(self, loader: jinja2.BaseLoader) -> None:
        self.loader = loader

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        source, filename, uptodate = self.loader.get_source(environment, template)
        return offline_source(template, source), filename, uptodate

    def list_templates(self) -> list[str]:
        return self.loader.list_templates()


class SiteAssets:
    """The local files the pages of one Data Docs build link to, and their copy into the site.

    `attach` makes a GX page environment serve the offline templates; rendering a page then
    records each file it links (`finpipe_asset`), and `install` copies the recorded files the
    site lacks into its static folder. Not thread-safe: GX runtime builds one site at a time.
    """

    def __init__(self, gx_static: Path) -> None:
        self.gx_static = gx_static  # GX's render/view/static (the favicon and the logo)
        self._linked: set[str] = set()

    def attach(self, environment: jinja2.Environment) -> None:
        """Make `environment` (a GX page view's) render pages that link the site's copies."""
        if not isinstance(environment.loader, _OfflineLoader):
            if environment.loader is None:
                raise ValueError("GX's page environment has no template loader")
            environment.loader = _OfflineLoader(environment.loader)
        environment.globals["finpipe_asset"] = self._link
        environment.globals["finpipe_charts"] = _page_has_charts

    @jinja2.pass_context
    def _link(self, context: jinja2.runtime.Context, name: str) -> str:
        """Return the path from the page being rendered to `static/<name>`, and record it."""
        self._linked.add(name)
        return "../" * _page_depth(context) + f"static/{name}"

    def install(self, static: Path) -> list[str]:
        """Copy into `static` (a site's static folder) each file the pages rendered since the
        last call link to that it lacks, with the licence of each vendored package; return the
        names copied. A file is written under a temporary name and renamed into place.

        Where a sibling site (ingest keeps one per batch, side by side) has the same file, byte
        for byte, the copy is a hard link to it: every site still holds each file it links, and
        a year of daily batches keeps one copy of the 1.2 MB of assets instead of 250.
        Nothing rewrites a static file once installed, so the sites never see each other."""
        wanted = set(self._linked)
        self._linked.clear()
        for name in list(wanted):
            if name.startswith(f"{SITE_VENDOR}/"):
                path = name.removeprefix(f"{SITE_VENDOR}/")
                wanted.update(f"{SITE_VENDOR}/{extra}" for extra in CSS_FILES.get(path, ()))
                package = VENDORED / path.split("/")[0]
                wanted.update(
                    f"{SITE_VENDOR}/{licence.relative_to(VENDORED).as_posix()}"
                    for licence in package.glob("LICENSE*")
                )
        copied = []
        twin = _sibling_static(static)
        for name in sorted(wanted):
            target = static / name
            if target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = self.source(name)
            same = twin / name if twin is not None else None
            if same is None or not _link_if_identical(same, source, target):
                _copy_atomically(source, target)
            copied.append(name)
        return copied

    def source(self, name: str) -> Path:
        """Return the file that `static/<name>` of a site is a copy of."""
        if name.startswith(f"{SITE_VENDOR}/"):
            return VENDORED / name.removeprefix(f"{SITE_VENDOR}/")
        return self.gx_static / name


def _page_depth(context: jinja2.runtime.Context) -> int:
    """Return how many folders below the site's root the page being rendered is, as GX lays
    pages out (GX's own navigation bar climbs as many): validations/<suite path>/<run name>/
    <run time>/<batch>.html, expectations/<suite path>.html and index.html, where a suite named
    a.b has the path a/b."""
    renderer = str(context.get("renderer_type") or "")
    suite_dots = str(context.get("expectation_suite_name") or "").count(".")
    if "ValidationResults" in renderer or "ProfilingResults" in renderer:
        return suite_dots + 4
    if "ExpectationSuite" in renderer:
        return suite_dots + 1
    return 0  # the index page (SiteIndexPageRenderer)


@jinja2.pass_context
def _page_has_charts(context: jinja2.runtime.Context) -> bool:
    """Return whether the page being rendered has a chart (a GX `graph` content block)."""
    return _has_graph(context.get("sections"))


def _has_graph(content: Any) -> bool:
    if isinstance(content, dict):
        return content.get("content_block_type") == "graph" or _any_graph(content.values())
    if isinstance(content, list | tuple):
        return _any_graph(content)
    return False


def _any_graph(items: Iterable[Any]) -> bool:
    return any(_has_graph(item) for item in items)


def _sibling_static(static: Path) -> Path | None:
    """Return the static folder of the newest other site beside the one of `static` (the
    likeliest to hold this version's files), if there is one."""
    site = static.parent
    newest: tuple[int, str] | None = None
    with os.scandir(site.parent) as entries:
        for entry in entries:
            if entry.name == site.name or entry.name.startswith(".") or not entry.is_dir():
                continue  # itself, a folder being staged, a file
            with contextlib.suppress(OSError):  # no static folder, or removed meanwhile
                found = (os.stat(os.path.join(entry.path, "static")).st_mtime_ns, entry.path)
                newest = max(newest or found, found)
    return None if newest is None else Path(newest[1], "static")


def _link_if_identical(same: Path, source: Path, target: Path) -> bool:
    """Hard-link `target` to `same` when it holds what `source` does; return whether it did
    (a file system without hard links, another device or a full link count: it did not)."""
    try:
        if not (same.is_file() and filecmp.cmp(same, source, shallow=False)):
            return False
        _into_place(target, lambda staging: os.link(same, staging))
    except OSError:
        return False
    return True


def copy_site(site: Path, target: Path) -> None:
    """Copy the Data Docs site in `site` to `target` (a new folder): its pages are copied, its
    static files hard-linked where the file system allows (they are never rewritten)."""
    static = Path(site, "static")

    def copy(source: str, destination: str) -> str:
        if static in Path(source).parents:
            with contextlib.suppress(OSError):
                os.link(source, destination)
                return destination
        return shutil.copy2(source, destination)

    shutil.copytree(site, target, copy_function=copy)


def _copy_atomically(source: Path, target: Path) -> None:
    _into_place(target, lambda staging: shutil.copyfile(source, staging))


def _into_place(target: Path, make: Callable[[Path], object]) -> None:
    """Have `make` write a file under a temporary name beside `target`, then rename it into
    place: a reader sees the whole file or none."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        make(staging)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
