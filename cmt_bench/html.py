"""The report as one self-contained HTML file: Markdown converted with `markdown` (tables), local
images inlined as base64 data URIs and a small embedded stylesheet, so the page renders with no
network and no sibling files (it can be mailed or attached as an artifact on its own).
"""
from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path
from urllib.parse import unquote

import markdown as md
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 1200px; margin: 0 auto; padding: 16px 24px; background: #fff; }
h1, h2, h3 { line-height: 1.25; margin: 1.2em 0 0.5em; }
h1 { font-size: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.3em; }
h2 { font-size: 1.4em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eff1f3;
       padding: 0.1em 0.3em; border-radius: 4px; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
"""

# A URL with a scheme (http:, https:, file:, ...) or protocol-relative (//host): not a local file.
_REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)
# Any tag that would make the browser fetch from the network (raw HTML can slip through Markdown).
_FETCHING = re.compile(r"""<(?:img|script|link|iframe|source|video|audio|embed|object)\b[^>]*?"""
                       r"""\b(?:src|href|data)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""",
                       re.IGNORECASE)


def data_uri(src: str, base_dir: Path) -> str:
    """The image at `src` (relative to `base_dir`) as a base64 data URI."""
    if src.startswith("data:"):
        return src
    if _REMOTE.match(src):
        raise ValueError(f"report image {src!r} is not a local file: the HTML report must render offline, "
                         f"so save the image beside the report and reference it by relative path")
    path = Path(base_dir) / unquote(src)
    if not path.is_file():
        raise FileNotFoundError(f"report image {src!r} is missing: no file {path}")
    mime = mimetypes.guess_type(path.name)[0]
    if mime is None or not mime.startswith("image/"):
        raise ValueError(f"report image {src!r} is not a known image type ({path.suffix or 'no suffix'})")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class _InlineImages(Treeprocessor):
    def __init__(self, md_: md.Markdown, base_dir: Path):
        super().__init__(md_)
        self.base_dir = base_dir

    def run(self, root):
        for img in root.iter("img"):
            img.set("src", data_uri(img.get("src", ""), self.base_dir))


class _InlineImagesExtension(Extension):
    def __init__(self, base_dir: Path):
        super().__init__()
        self.base_dir = base_dir

    def extendMarkdown(self, md_: md.Markdown) -> None:
        # after "inline" (20), which turns ![alt](src) into <img>
        md_.treeprocessors.register(_InlineImages(md_, self.base_dir), "inline_images", 15)


def render(markdown_text: str, base_dir: Path, title: str) -> str:
    """A complete HTML document from the report's Markdown; images resolve against `base_dir`.
    Raises FileNotFoundError for a missing image and ValueError for one that is not local."""
    body = md.markdown(markdown_text, extensions=["tables", _InlineImagesExtension(Path(base_dir))],
                       output_format="html")
    if match := _FETCHING.search(body):
        raise ValueError(f"the report would load from the network and not render offline: {match.group(0)[:120]!r}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
