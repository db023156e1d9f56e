"""Data Docs that work offline: GX's CDN assets are local files, and every site has the ones its
pages link to (finpipe.docs_assets; tests/test_data_docs_browser.py opens a site offline)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from finpipe.docs_assets import CDN_FILES, CSS_FILES, VENDORED, offline_source
from finpipe.validation import validate_frame
from tests.test_validation import check, clean_bars

# A script, stylesheet or image loaded from the network: the tag's src/href, or a CSS url().
REMOTE = re.compile(
    r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)="(https?://[^"]+)"|url\('?(https?://[^')]+)""",
    re.IGNORECASE,
)
LOCAL_LINK = re.compile(r'(?:href|src)="([^"#?:]+)"')


def _gx_view_files() -> dict[str, str]:
    """Return GX's page templates and the stylesheet they inline, by template name."""
    spec = importlib.util.find_spec("great_expectations")  # no import: it costs seconds
    assert spec is not None and spec.origin is not None
    view = Path(spec.origin).parent / "render" / "view"
    files = [
        *(view / "templates").glob("*.j2"),
        view / "static/styles/data_docs_default_styles.css",
    ]
    return {path.name: path.read_text(encoding="utf-8") for path in files}


def _remote(text: str) -> set[str]:
    return {a or b for a, b in REMOTE.findall(text)}


def test_every_cdn_asset_of_gx_templates_is_served_from_a_local_copy():
    templates = _gx_view_files()
    before = set().union(*(_remote(source) for source in templates.values()))
    # GX's own templates load these from the network (an unknown one would be listed here).
    assert before - set(CDN_FILES) == {
        "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png"
    }
    assert set(CDN_FILES) <= before  # no stale entry: each URL is in a GX template

    after = {name: _remote(offline_source(name, source)) for name, source in templates.items()}

    assert {name: urls for name, urls in after.items() if urls} == {}
    assert "finpipe_asset('vendor/jquery/jquery.min.js')" in offline_source(
        "js_script_imports.j2", templates["js_script_imports.j2"]
    )
    assert all((VENDORED / path).is_file() for path in CDN_FILES.values())


def test_the_scripts_gx_pins_by_integrity_are_byte_for_byte_the_vendored_ones():
    imports = _gx_view_files()["js_script_imports.j2"]
    pinned = re.findall(r'src="(https://[^"]+)" integrity="sha384-([^"]+)"', imports)

    assert len(pinned) == 2  # popper.js and bootstrap.min.js
    for url, digest in pinned:
        vendored = (VENDORED / CDN_FILES[url]).read_bytes()
        assert base64.b64encode(hashlib.sha384(vendored).digest()).decode() == digest, url


def test_every_vendored_file_is_used_and_every_package_carries_its_licence():
    shipped = {
        path.relative_to(VENDORED).as_posix()
        for path in VENDORED.rglob("*")
        if path.is_file() and not path.name.startswith(("LICENSE", "README"))
    }
    used = set(CDN_FILES.values()).union(*CSS_FILES.values())

    assert shipped == used
    packages = sorted(path for path in VENDORED.iterdir() if path.is_dir())
    assert len(packages) == 10
    readme = (VENDORED / "README.md").read_text(encoding="utf-8")
    for package in packages:
        assert list(package.glob("LICENSE*")), f"{package.name} has no licence file"
        assert f"| `{package.name}/` |" in readme


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _local_links(page: Path) -> set[Path]:
    return {(page.parent / link).resolve() for link in LOCAL_LINK.findall(page.read_text("utf-8"))}


def test_a_rejected_batch_site_loads_nothing_from_the_network_and_has_every_file_it_links(
    tmp_path,
):
    bars = clean_bars()
    bars.loc[3, "close"] = np.nan

    report = check(bars, data_docs_dir=tmp_path)

    assert report.success is False
    pages = _pages(tmp_path)
    assert len(pages) == 3  # index, suite, validation
    assert {page.name: _remote(page.read_text("utf-8")) for page in pages} == {
        page.name: set() for page in pages
    }
    linked = set().union(*(_local_links(page) for page in pages))
    # index <-> suite <-> validation pages, and every static file, at each page's depth
    assert sorted(str(path) for path in linked if not path.is_file()) == []
    static = tmp_path.resolve() / "static"
    copied = {path for path in static.rglob("*") if path.is_file()}
    # Only what the pages link to is copied (GX's own static folder is 4 MB a site), with the
    # fonts Font Awesome's stylesheet loads and each package's licence.
    extras = {path for path in copied if path.suffix == ".woff2" or path.name.startswith("LICENSE")}
    assert copied - extras == {path for path in linked if static in path.parents}
    scripts_and_styles = {path for path in copied if path.suffix in {".js", ".css"}}
    assert len(scripts_and_styles) == 12  # GX's 16 CDN files but the 3 Vega scripts, one css twice
    assert not (static / "vendor" / "vega").exists()  # no page draws a chart
    packages = {path.relative_to(static).parts[1] for path in copied if "vendor" in path.parts}
    assert len(packages) == 7
    assert all(list((static / "vendor" / package).glob("LICENSE*")) for package in packages)
    assert (static / "vendor/fontawesome/webfonts/fa-solid-900.woff2").is_file()  # the icons
    assert {"favicon.ico", "logo-long.png"} <= {path.name for path in linked}


def _chart_site(folder: Path) -> None:
    """Build in `folder` the Data Docs of a suite whose validation page draws a chart."""
    # A suite name with a dot: its pages lie one folder deeper (validations/probe/charts/...).
    spec = {
        "name": "probe.charts",
        "expectations": [
            {
                "type": "expect_column_kl_divergence_to_be_less_than",
                "kwargs": {
                    "column": "x",
                    "partition_object": {"bins": [0, 1, 2], "weights": [0.5, 0.5]},
                    "threshold": 0.1,
                },
            }
        ],
    }
    frame = pd.DataFrame({"x": [0.5, 0.6, 1.5, 1.9, 0.2]})
    validate_frame(
        frame, suite_name="probe.charts", batch_name="b", suite_spec=spec, data_docs_dir=folder
    )


def test_a_page_with_a_chart_gets_the_vega_scripts_at_its_depth(tmp_path):
    _chart_site(tmp_path)

    (page,) = (tmp_path / "validations").rglob("*.html")
    assert len(page.relative_to(tmp_path).parts) == 6
    html = page.read_text("utf-8")
    assert "vegaEmbed(" in html
    assert '<script src="../../../../../static/vendor/vega/vega.min.js">' in html
    assert sorted(str(path) for path in _local_links(page) if not path.is_file()) == []
    for name in ("vega/vega.min.js", "vega-lite/vega-lite.min.js", "vega-embed/vega-embed.min.js"):
        assert (tmp_path / "static" / "vendor" / name).is_file()
    assert _remote(html) == set()
    suite_page = tmp_path / "expectations" / "probe" / "charts.html"  # one folder per dot too
    assert sorted(str(path) for path in _local_links(suite_page) if not path.is_file()) == []


def test_no_page_keeps_the_cdn_integrity_attributes_a_page_on_disk_cannot_load(tmp_path):
    bars = clean_bars()
    bars.loc[3, "close"] = np.nan

    check(bars, data_docs_dir=tmp_path)

    pages = {page.name: page.read_text("utf-8") for page in _pages(tmp_path)}
    pinned = {name for name, html in pages.items() if re.search("integrity=|crossorigin=", html)}
    assert (len(pages), pinned) == (3, set())


def test_a_site_built_after_a_chart_site_has_no_vega_scripts(tmp_path):
    _chart_site(tmp_path / "charts")

    check(clean_bars(), data_docs_dir=tmp_path / "plain")

    assert (tmp_path / "charts" / "static" / "vendor" / "vega").is_dir()
    assert sorted(p.name for p in (tmp_path / "plain" / "static" / "vendor").glob("vega*")) == []


def test_a_docs_folder_removed_and_built_again_has_every_page_it_links(tmp_path):
    site = tmp_path / "docs"
    check(clean_bars(), data_docs_dir=site)
    shutil.rmtree(site)  # as ingest does with the site of a group it does not keep

    check(clean_bars(), data_docs_dir=site)

    assert (site / "expectations" / "market_ohlcv.html").is_file()
    linked = set().union(*(_local_links(page) for page in _pages(site)))
    assert sorted(str(path) for path in linked if not path.is_file()) == []


def _files(site: Path, under: str = "") -> dict[str, Path]:
    return {
        path.relative_to(site).as_posix(): path
        for path in (site / under).rglob("*")
        if path.is_file()
    }


def test_sites_side_by_side_share_their_assets_and_each_still_holds_every_file(tmp_path):
    """A year of daily batches kept 250 copies of the same 1.2 MB of scripts, styles and fonts
    in reports/data_docs/<domain>/: a new site's are hard links to its newest neighbour's."""
    first, second = tmp_path / "batch-1", tmp_path / "batch-2"
    check(clean_bars(), data_docs_dir=first)
    # A neighbour's file that is not byte for byte the vendored one is not linked: copied.
    changed = first / "static/vendor/bootstrap/css/bootstrap.min.css"
    changed.unlink()
    changed.write_text("/* edited */")

    check(clean_bars(), data_docs_dir=second)

    old, new = _files(first, "static"), _files(second, "static")
    assert sorted(old) == sorted(new) and len(new) > 20
    linked = {name for name in new if new[name].stat().st_ino == old[name].stat().st_ino}
    assert sorted(set(new) - linked) == ["static/vendor/bootstrap/css/bootstrap.min.css"]
    copy = new["static/vendor/bootstrap/css/bootstrap.min.css"]
    assert copy.read_bytes() == (VENDORED / "bootstrap/css/bootstrap.min.css").read_bytes()
    # Every page still finds each file it links, in its own site.
    pages = _pages(second)
    assert sorted(str(p) for p in set().union(*map(_local_links, pages)) if not p.is_file()) == []
    # and the pages themselves are the site's own files
    assert all(page.stat().st_nlink == 1 for page in pages)


def test_a_quarantined_site_links_its_assets_and_copies_its_pages(tmp_path):
    from finpipe.docs_assets import copy_site

    site, kept = tmp_path / "reports" / "batch", tmp_path / "quarantine" / "data_docs"
    check(clean_bars(), data_docs_dir=site)
    kept.parent.mkdir()

    copy_site(site, kept)

    source, copied = _files(site), _files(kept)
    assert sorted(source) == sorted(copied)
    shared = {name for name in copied if copied[name].stat().st_ino == source[name].stat().st_ino}
    assert shared == {name for name in copied if name.startswith("static/")}
    # a page rewritten in the reports later (GX writes index.html in place) leaves the copy
    index = source["index.html"]
    index.write_text("rewritten")
    assert copied["index.html"].read_text("utf-8") != "rewritten"
