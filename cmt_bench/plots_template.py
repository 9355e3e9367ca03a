"""An HTML template that makes `dvc plots show` render offline.

DVC's stock page loads vega, vega-lite and vega-embed from a CDN, so it is blank without a network.
This template inlines the three libraries' minified builds (from npm, at pinned versions) and holds
`{plot_divs}` but not `{scripts}`, so DVC adds no CDN tags:

    python -m cmt_bench.plots_template     # npm install into build/npm, write build/dvc_plots_template.html
    dvc plots show --html-template build/dvc_plots_template.html
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

# DVC 3.67 (dvc-render 1.0.2) loads vega 5.20.2, vega-lite 5.2.0 and vega-embed 6.18.2 from the CDN;
# vega-lite 5.2.0 declares vega ^5.21.0 as a peer (npm refuses 5.20.2), so vega is one minor newer.
LIBS = {"vega": ("5.21.0", "build/vega.min.js"),
        "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
        "vega-embed": ("6.18.2", "build/vega-embed.min.js")}
NPM_DIR = Path("build/npm")
TEMPLATE = Path("build/dvc_plots_template.html")
# dvc-render fills these with str.replace; a library containing one would be corrupted
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- {versions}: inlined so the page renders offline -->
{libraries}
<style>
body {{ font-family: system-ui, sans-serif; }}
table {{ border-spacing: 15px; }}
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def _installed(npm_dir: Path, name: str) -> str | None:
    manifest = npm_dir / "node_modules" / name / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.is_file() else None


def install(npm_dir: Path = NPM_DIR) -> None:
    """npm-install the pinned libraries into `npm_dir`/node_modules unless they are there already."""
    if all(_installed(npm_dir, name) == version for name, (version, _) in LIBS.items()):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: the offline plots template needs vega, vega-lite and vega-embed "
                           "from the npm registry (install Node.js and npm, then `make plots-template`)")
    npm_dir.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}@{version}" for name, (version, _) in LIBS.items()]
    out = subprocess.run([npm, "install", "--prefix", str(npm_dir), "--save-exact", "--no-audit", "--no-fund",
                          "--ignore-scripts", "--loglevel=error", *specs], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"npm install {' '.join(specs)} failed:\n{out.stderr[-3000:]}")


def _script(npm_dir: Path, name: str, build: str) -> str:
    js = (npm_dir / "node_modules" / name / build).read_text(encoding="utf8")
    if found := [p for p in PLACEHOLDERS if p in js]:
        raise ValueError(f"{name}/{build} contains {found}, which dvc-render would replace")
    # "</script" inside the code would end the inline <script> element early; "<\/" means the same in JS
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    return f"<script>\n{js}\n</script>"


def template(npm_dir: Path = NPM_DIR) -> str:
    """The template's text, from libraries already installed in `npm_dir`."""
    for name, (version, _) in LIBS.items():
        if (found := _installed(npm_dir, name)) != version:
            raise RuntimeError(f"{name} {version} is not installed in {npm_dir / 'node_modules'} (found {found}): "
                               f"run `python -m cmt_bench.plots_template`")
    return PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}",
                       versions=", ".join(f"{name} {version}" for name, (version, _) in LIBS.items()),
                       libraries="\n".join(_script(npm_dir, name, build) for name, (_, build) in LIBS.items()))


def build(out: Path = TEMPLATE, npm_dir: Path = NPM_DIR) -> Path:
    """Install the libraries if needed and write the template to `out`."""
    install(npm_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(template(npm_dir), encoding="utf8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cmt_bench.plots_template", description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=TEMPLATE, help=f"template to write (default {TEMPLATE})")
    parser.add_argument("--npm-dir", type=Path, default=NPM_DIR, help=f"where npm installs (default {NPM_DIR})")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {build(args.out, args.npm_dir)}")
    except RuntimeError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
