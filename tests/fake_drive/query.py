"""A parser for the subset of the Drive v3 `q` language the fake supports; anything else is an error."""
from __future__ import annotations

import re
from typing import Callable

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|=|\{|\}|\(|\))|(?P<word>[A-Za-z_]+))")


class QueryError(ValueError):
    """The query uses syntax the fake does not implement (so tests notice instead of passing by luck)."""


def _tokens(q: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(q.rstrip()):
        m = _TOKEN.match(q, pos)
        if not m:
            raise QueryError(f"cannot parse q at {q[pos:]!r}")
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "str":
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        out.append((kind, text))
        pos = m.end()
    return out


def parse(q: str) -> Callable[[dict], bool]:
    """Compile q (terms joined by `and`) into a predicate over fake file resources."""
    toks = _tokens(q)
    preds, i = [], 0
    while i < len(toks):
        pred, i = _term(toks, i)
        preds.append(pred)
        if i < len(toks):
            if toks[i] != ("word", "and"):
                raise QueryError(f"only 'and' is supported between terms, got {toks[i][1]!r}")
            i += 1
    return lambda f: all(p(f) for p in preds)


def _term(toks, i):
    kind, text = toks[i]
    if kind == "str" and toks[i + 1:i + 3] == [("word", "in"), ("word", "parents")]:
        return (lambda f, v=text: v in f.get("parents", [])), i + 3
    if kind == "word" and text in ("name", "mimeType") and toks[i + 1][1] in ("=", "!=") and toks[i + 2][0] == "str":
        field, op, value = text, toks[i + 1][1], toks[i + 2][1]
        return (lambda f: (f.get(field) == value) == (op == "=")), i + 3
    if kind == "word" and text == "trashed" and toks[i + 1][1] == "=" and toks[i + 2][1] in ("true", "false"):
        value = toks[i + 2][1] == "true"
        return (lambda f: f.get("trashed", False) == value), i + 3
    if kind == "word" and text == "appProperties" and toks[i + 1] == ("word", "has"):
        seq = toks[i + 2:i + 11]
        shape = [t[1] if t[0] != "str" else "S" for t in seq]
        if shape != ["{", "key", "=", "S", "and", "value", "=", "S", "}"]:
            raise QueryError("appProperties has { key='k' and value='v' } is the supported form")
        k, v = seq[3][1], seq[7][1]
        return (lambda f: f.get("appProperties", {}).get(k) == v), i + 11
    raise QueryError(f"unsupported term starting at {text!r}")
