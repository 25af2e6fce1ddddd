"""Pieces every HTML page robustkit writes shares: the style sheet, number formats, and the
inline script that lets a headless browser check the page.

The script counts the ``<img>`` elements that loaded and writes ``"loaded K/M"`` into
``document.title`` and into ``<body data-loaded="K/M">`` once the page has finished loading, so
``chromium --headless --dump-dom`` shows whether every image was found.

Example:
    >>> page = [head("robustkit inspect"), "<h1>...</h1>", *table(["a", "b"], [[1, 2]]), tail()]
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["IMAGE_CHECK_SCRIPT", "ci", "head", "num", "table", "tail"]

IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.title = "loaded " + ok + "/" + imgs.length;
  document.body.setAttribute("data-loaded", ok + "/" + imgs.length);
});
</script>"""

_STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:"
          "collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:2px 6px;"
          "font-size:13px}td.n{text-align:right}img{max-width:100%}code{background:#f3f3f3}")


def num(v: Any) -> str:
    """A number with 4 significant digits; ``–`` for ``None``."""
    return "–" if v is None else f"{v:.4g}"


def ci(interval: Sequence[float] | None) -> str:
    """``[lo, hi]`` with 4 significant digits; ``–`` for ``None``."""
    return "–" if interval is None else f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def head(title: str) -> str:
    """Everything up to and including ``<body>``."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]],
          numeric: Sequence[bool] | None = None) -> list[str]:
    """An HTML table; cells are escaped text (``str(cell)``), right-aligned where ``numeric``."""
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        flags = numeric or [False] * len(row)
        out.append("<tr>" + "".join(f"<td{' class=n' if f else ''}>{e(str(c))}</td>"
                                    for c, f in zip(row, flags, strict=True)) + "</tr>")
    out.append("</table>")
    return out


def tail() -> str:
    """The image-check script and the closing tags."""
    return f"{IMAGE_CHECK_SCRIPT}\n</body></html>\n"
