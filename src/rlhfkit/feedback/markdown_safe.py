"""Markdown for the guidelines, with raw HTML switched off and only safe link targets.

Guidelines are written by project admins and shown to every labeler; python-markdown passes raw
HTML through by default, so `<script>` in the guidelines would run in a labeler's browser. Here
raw HTML is escaped like any text, and links/images may only point to http(s), mailto or
relative URLs: an allow-list, checked on the URL as the browser will read it (see `_safe_url`).
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as etree

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor
from markdown.util import AMP_SUBSTITUTE
from markupsafe import Markup

_SAFE_SCHEMES = ("http:", "https:", "mailto:")
_IGNORED = re.compile(r"[\x00-\x20\x7f-\x9f\s]+")  # controls and whitespace: browsers drop most of them


def _safe_url(url: str) -> bool:
    """Whether a link target is http(s), mailto or relative, as the browser will read it.

    The browser decodes character references in the attribute (`javascript&#58;` is
    `javascript:`) and drops tabs and newlines anywhere in a URL (`java<TAB>script:`), so the check
    runs on the decoded URL with all control characters and whitespace removed. Anything with a
    scheme other than the allowed ones is refused, rather than a list of bad schemes (there is
    always one more: data:, vbscript:, ...).
    """
    u = _IGNORED.sub("", html.unescape(url.replace(AMP_SUBSTITUTE, "&"))).lower()
    if u.startswith(_SAFE_SCHEMES):
        return True
    u = u.replace("\\", "/")  # browsers read a backslash as a slash in http(s) URLs
    return ":" not in re.split(r"[/?#]", u, maxsplit=1)[0] and not u.startswith("//")  # relative, no scheme


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
