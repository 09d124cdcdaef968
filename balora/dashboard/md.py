"""Text from files put into Streamlit's Markdown (st.error, st.warning, st.info, st.caption...).

Every alert and caption renders its body as Markdown, so a module name, a file name or a run
name written into one is read as Markdown too: a tensor key `x ![a](https://host/p.png)` makes
the viewer's browser fetch that image (telling its owner who opened the file, and when), and
`[fix it here](https://host)` shows a link the page never wrote. Anything that comes from an
adapter, an upload, a run folder or the URL goes through `text` (prose) or `code` (a name shown
as code) before it is placed in Markdown.

Plotly reads a few HTML tags in every label, title and legend entry (<a href>, <b>, <br>), so a
module name `<a href="https://host">fix</a>` is a link on the chart: `plot_label` shows it as text.
"""

from __future__ import annotations

import re

# What makes Markdown do something beyond plain words: images, links and Streamlit's
# :color[...] directives all need [ ], HTML and <url> autolinks need < >, code spans a backtick,
# $LaTeX$ a dollar, emphasis * or ~ (an underscore inside a word, as in q_proj, never emphasises).
# A backslash before any of them shows it as itself.
_SPECIAL = re.compile(r"[\\`*~\[\]<>$]")
_TICKS = re.compile(r"`+")


def _one_line(value) -> str:
    return " ".join(str(value).splitlines())  # a line break could start a heading, list or block


def text(value) -> str:
    """`value` as Markdown that shows it verbatim: every character that could format, link or
    load something is escaped."""
    return _SPECIAL.sub(lambda m: "\\" + m.group(), _one_line(value))


def code(value) -> str:
    """`value` as an inline code span (nothing inside one is interpreted), fenced by more
    backticks than it holds in a row, so a backtick in it cannot close the span early."""
    value = _one_line(value)
    fence = "`" * (max((len(t) for t in _TICKS.findall(value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def plot_label(value) -> str:
    """`value` as a Plotly label that shows it verbatim: Plotly decodes these entities, never tags."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
