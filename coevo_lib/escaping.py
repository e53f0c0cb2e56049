"""Environment text made literal for Jupyter's Markdown and HTML renderers.

Observations are shop pages, ScienceWorld descriptions and SQL results: prices (``$38.03 | $75.10``),
``*``, ``_``, ``<tags>``, pipes and backticks all occur. JupyterLab renders the span between two
dollar signs as LaTeX (MathJax runs on Markdown and on HTML outputs), so every place that shows
environment text escapes it here. What JupyterLab 4.6 does with each form was checked in headless
Chromium (tests/test_browser.py keeps checking it):

- MathJax typesets the rendered DOM of Markdown and HTML outputs, where an escaped ``\\$`` or an
  entity ``&#36;`` is a plain dollar again: escaping alone does not stop it. It skips elements with
  the class ``tex2jax_ignore`` / ``mathjax_ignore``, so rendered environment text sits inside one:
  ``markdown_block`` (a raw ``<div>`` around Markdown, blank lines keep the inside Markdown) and
  ``html_block``.
- Inside, Markdown special punctuation gets CommonMark's backslash escape, except brackets and
  parentheses, which become entities: ``\\[`` and ``\\(`` are math delimiters to JupyterLab's math
  splitter, which runs on the source before Markdown.
"""

from __future__ import annotations

import html
import re

# CommonMark lets any ASCII punctuation be backslash-escaped; these are the ones that change rendering
# (emphasis, code, links and autolinks, raw HTML, headings and lists at a line start, table cells,
# entities, strikethrough, math, JupyterLab's @@n@@ math placeholders).
MARKDOWN_SPECIAL = re.compile(r"[\\`*_{}\[\]()<>#+\-.!|$~&:@]")
# Escaped as entities: a backslash before them is a MathJax delimiter (see the module doc).
MARKDOWN_ENTITIES = {"[": "&#91;", "]": "&#93;", "(": "&#40;", ")": "&#41;"}
MATHJAX_IGNORE = "tex2jax_ignore mathjax_ignore"


def one_line(text: str, limit: int | None = None) -> str:
    """Whitespace runs (newlines included) collapsed to single spaces, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(str(text).split())
    return flat if limit is None or len(flat) <= limit else flat[: max(limit - 1, 0)] + "…"


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown: no emphasis, code, links, HTML, table cells or math come out of it."""
    return MARKDOWN_SPECIAL.sub(lambda m: MARKDOWN_ENTITIES.get(m[0], "\\" + m[0]), str(text))


def markdown_block(markdown: str) -> str:
    """Markdown that MathJax leaves alone (see the module doc); put escaped environment text in it."""
    return f'<div class="{MATHJAX_IGNORE}">\n\n{markdown}\n\n</div>\n'


def markdown_code(text: str) -> str:
    """``text`` as an inline code span; the fence is one backtick longer than any run of backticks inside."""
    text = one_line(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") or not text.strip() else text
    return f"{fence}{padded}{fence}"


def html_text(text: str) -> str:
    """``text`` with HTML's special characters as entities (put it inside an ``html_block``: see the module doc)."""
    return html.escape(str(text), quote=True)


def html_block(inner_html: str, tag: str = "div", style: str = "") -> str:
    """An element MathJax leaves alone, around already escaped HTML."""
    style_attribute = f' style="{html_text(style)}"' if style else ""
    return f'<{tag} class="{MATHJAX_IGNORE}"{style_attribute}>{inner_html}</{tag}>'
