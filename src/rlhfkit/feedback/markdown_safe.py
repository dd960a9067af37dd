"""Markdown for the guidelines, with raw HTML switched off and only safe link targets.

Guidelines are written by project admins and shown to every labeler; python-markdown passes raw
HTML through by default, so `<script>` in the guidelines would run in a labeler's browser. Here
raw HTML is escaped like any text, and links/images may only point to http(s), mailto or
relative URLs (no `javascript:`).
"""

from __future__ import annotations

import xml.etree.ElementTree as etree

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor
from markupsafe import Markup

_SAFE_SCHEMES = ("http://", "https://", "mailto:")


def _safe_url(url: str) -> bool:
    u = url.strip().lower()
    if u.startswith(_SAFE_SCHEMES):
        return True
    return ":" not in u.split("/", 1)[0] and not u.startswith("//")  # relative, no scheme


class _LinkGuard(Treeprocessor):
    def run(self, root: etree.Element) -> None:
        for el in root.iter():
            for attr in ("href", "src"):
                if attr in el.attrib and not _safe_url(el.attrib[attr]):
                    del el.attrib[attr]
            if el.tag == "a":
                el.set("rel", "noopener noreferrer")


class _SafeExtension(Extension):
    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.treeprocessors.register(_LinkGuard(md), "link_guard", 0)


def render_markdown(text: str) -> Markup:
    html = markdown.markdown(text, extensions=[_SafeExtension(), "tables", "fenced_code", "sane_lists"])
    return Markup(html)  # safe: raw HTML was escaped by the extension
