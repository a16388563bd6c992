"""The one exception type for mistakes a user can make.

A `UserError` carries a sentence that says what went wrong, where (file, row,
config key) and what to do.  The CLI prints it without a traceback and exits 2;
anything else that escapes is our bug and keeps its traceback.  What a user gave (a value, a key, a file
name) goes into a sentence through `visible`, so nothing in it can drive the terminal.
"""


class UserError(Exception):
    """A problem with the user's input (config, data file, model path)."""


def visible(text, limit: int | None = 200) -> str:
    """`text` safe to print on a terminal: every character that is not printable (control characters such as
    ESC, line and paragraph separators, bidi overrides, lone surrogates) written as an escape (\\x1b, \\n,
    \\u202e, \\ud800), and cut to `limit` characters with the full length noted."""
    text = str(text)
    cut = ""
    if limit is not None and len(text) > limit:
        cut, text = f"... ({len(text):,} characters in all)", text[:limit]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    return text + cut


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def visible_names(names, limit: int = 20) -> str:
    """Column or key names for a sentence: escaped, comma-separated, the first `limit` of them."""
    names = list(names)
    shown = ", ".join(visible(name, 60) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
