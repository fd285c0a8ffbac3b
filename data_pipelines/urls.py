"""Expansion of shard specifications into concrete URLs, checked before a job starts streaming."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

logger = logging.getLogger("data_pipelines")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def is_local(url: str) -> bool:
    """True for plain paths and file: URLs; False for pipe:, http(s):, gs: and other schemes."""
    match = _SCHEME.match(url)
    return match is None or match.group(1).lower() == "file"


def local_path(url: str) -> str:
    """The file path of a local shard URL (`is_local`): a plain path as given; a `file:` URL the way
    webdataset's reader opens it (`url2pathname(urlparse(url).path)`: `file:///d/a%20b.tar` is `/d/a b.tar`,
    `file:d/a.tar` is `d/a.tar`). One helper for every check (start-up, import, class names), so they name
    the file the reader will open. Only a lower-case `file:` is taken as the scheme: `FILE:///x.tar` stays a
    path that does not exist and fails at start-up instead of as unreadable shards later."""
    if not url.startswith("file:"):
        return url
    return url2pathname(urlparse(url).path)


_SOURCE_TOKEN = re.compile(r"::|\[[^\[\]/\s]*\]|'[^']*'|\"[^\"]*\"")
"""What `split_sources` looks for: a `::`, or text whose `::` is no separator -- a bracketed IPv6 host
(`[::1]`: no '/' or space inside, so a '[' in a path cannot hide a real separator), or quoted text."""


def split_sources(spec: str) -> list[str]:
    """The `::`-separated sources of `spec`, as written (not stripped or expanded).

    A `::` is not a separator inside brackets (`http://[::1]:8000/shard-{0..1}.tar`, also in a `pipe:`
    command such as `pipe:curl -s http://[::1]/a.tar`) nor, in a `pipe:` command, inside shell quotes
    (`pipe:perl -e 'Foo::bar()' ...`); elsewhere a quote is an ordinary character. An unquoted `::` in a
    pipe: command still separates sources (`pipe:cat a.tar::b.tar`), so quote one that belongs to it.
    """
    parts, start, pos = [], 0, 0
    while (match := _SOURCE_TOKEN.search(spec, pos)) is not None:
        token = match.group()
        if token == "::":
            parts.append(spec[start:match.start()])
            start = pos = match.end()
        elif token[0] == "[" or spec[start:].lstrip().startswith("pipe:"):
            pos = match.end()
        else:
            pos = match.start() + 1
    return [*parts, spec[start:]]


def expand_sources(spec: str) -> list[list[str]]:
    """The `::`-separated sources of `spec` (`split_sources`), each expanded (see `expand_urls`), for
    weighted mixing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"no shard URLs given (empty spec {spec!r})")
    sources = []
    for part in split_sources(spec):
        if not part.strip():
            raise ValueError(f"shard spec {spec!r} has an empty source between '::'")
        sources.append(expand_urls(part))
    return sources


def known_sizes(urls: list[str]) -> list[int | None]:
    """Samples per shard from a `sizes.json` beside local shards (written by `data synth` / `data import`),
    None where unknown. Used for start-up checks only; nothing depends on it being present."""
    cache: dict[str, dict[str, int]] = {}
    sizes: list[int | None] = []
    for url in urls:
        if not is_local(url):
            sizes.append(None)
            continue
        path = local_path(url)
        folder, name = os.path.split(path)
        if folder not in cache:
            cache[folder] = {}
            sidecar = os.path.join(folder or ".", "sizes.json")
            if os.path.isfile(sidecar):
                try:
                    with open(sidecar, encoding="utf-8") as fh:
                        loaded = json.load(fh)
                    cache[folder] = {str(k): int(v) for k, v in loaded.items()}
                except (OSError, ValueError, AttributeError) as exc:
                    logger.warning("ignoring unreadable %s: %s", sidecar, exc)
        sizes.append(cache[folder].get(name))
    return sizes


def _folder_message(part: str, url: str) -> str:
    """Why a folder is refused as a shard, with a spec for the tar files it holds as the hint."""
    folder = local_path(url)
    try:
        tars = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    except OSError as exc:
        return f"shard spec {part!r}: {url} is a directory, not a tar shard ({exc})"
    numbered = [re.fullmatch(r"(.*?)(\d+)\.tar", n) for n in tars]
    if not tars:
        hint = "it holds no .tar files"
    elif len(tars) == 1:
        hint = f"name the shard: {os.path.join(folder, tars[0])}"
    elif all(numbered) and len({(m.group(1), len(m.group(2))) for m in numbered if m}) == 1:
        first, last = numbered[0], numbered[-1]
        assert first is not None and last is not None
        brace = f"{first.group(1)}{{{first.group(2)}..{last.group(2)}}}.tar"
        hint = f"name its {len(tars)} shards, e.g. {os.path.join(folder, brace)}"
    else:
        hint = f"name its {len(tars)} .tar files ({tars[0]} ... {tars[-1]}) with a brace pattern or '::'"
    return f"shard spec {part!r}: {url} is a directory, not a tar shard; {hint}"


def expand_urls(spec: str) -> list[str]:
    """Expand `dir/shard-{000000..000031}.tar::other/{a,b}.tar` into a list of URLs, in order.

    Several specs are joined with `::` (a separator that cannot occur in a brace pattern and rarely in a
    path; not one inside an IPv6 host's brackets or a pipe: command's quotes, see `split_sources`). Local
    paths are returned as given but must be files, so a typo (or a folder: shard specs name tar files)
    fails at start-up with the spec named instead of as skipped shards later; `pipe:` and remote URLs
    cannot be checked cheaply and are passed through.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"no shard URLs given (empty spec {spec!r})")
    urls: list[str] = []
    for part in split_sources(spec):
        part = part.strip()
        expanded = [u for u in braceexpand.braceexpand(part)] if part else []
        expanded = [u for u in expanded if u.strip()]
        if not expanded:
            raise ValueError(f"shard spec {part!r} (in {spec!r}) expands to no URLs")
        folders = [u for u in expanded if is_local(u) and os.path.isdir(local_path(u))]
        if folders:
            raise ValueError(_folder_message(part, folders[0]))
        missing = [u for u in expanded if is_local(u) and not os.path.isfile(local_path(u))]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"shard spec {part!r}: {len(missing)} of {len(expanded)} local shard(s) do not "
                             f"exist: {', '.join(missing[:3])}{more}")
        urls.extend(expanded)
    return urls


def open_http(url: str, stall_s: int, retry_s: int, mode: str = "rb", bufsize: int = 8192) -> Any:
    """webdataset's `gopen_curl` for reading, plus a low-speed limit (no byte for `stall_s` seconds ends the
    read: curl exits 28) and a bounded retry window (`retry_s`, 0: no retries)."""
    from webdataset.gopen import Pipe, gopen_curl

    if mode[0] != "r":
        return gopen_curl(url, mode=mode, bufsize=bufsize)
    retry = ["--retry", "30", "--retry-delay", "2", "--retry-max-time", str(retry_s)]
    args = ["curl", "--connect-timeout", "30", *(retry if retry_s else []), "--speed-limit", "1",
            "--speed-time", str(stall_s), "-f", "-s", "-L", url]
    return Pipe(args, mode=mode, bufsize=bufsize, ignore_status=[141, 23])  # as gopen_curl: SIGPIPE


def open_shards(sources: Iterable[dict], handler: Callable[[Exception], bool], stall_s: int,
                retry_s: int) -> Iterator[dict]:
    """`tariterators.url_opener`, with http(s) URLs opened by `open_http` (all else as before): webdataset's
    own curl command has no stall limit, so a server that sent nothing blocked a worker for ever."""
    from webdataset import tariterators
    from webdataset.gopen import rewrite_url

    for source in sources:
        url = source["url"]
        target = rewrite_url(url)  # webdataset's GOPEN_REWRITE rules, as gopen applies them
        if not re.match(r"https?://", target, re.IGNORECASE):
            yield from tariterators.url_opener([source], handler=handler)
            continue
        try:
            source.update(stream=open_http(target, stall_s, retry_s))
        except Exception as exn:  # as url_opener: the URL goes into args, for the handler
            exn.args = (*exn.args, url)
            if not handler(exn):
                break
            continue
        yield source
