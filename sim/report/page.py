"""The report as one HTML page: the markdown rendered by Python-Markdown (tables extension)."""

from __future__ import annotations

import html

import markdown

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
         "padding:2px 6px;font-size:90%}img{max-width:100%}")


def markdown_to_html(text: str, title: str) -> str:
    """A standalone page: the report's headings, tables, lists, images and paragraphs."""
    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
