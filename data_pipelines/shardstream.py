"""Raw samples from WebDataset tar shards, with every shard failure counted instead of raised.

Built from webdataset's own stages (`url_opener` -> tar members -> grouping by key) so local paths,
`pipe:` commands and http(s) URLs all work. These additions make failures visible and bounded:

* one handler, shared by all stages, turns exceptions into a single `bad_shard` count per shard (a
  truncated member otherwise raises twice) and keeps going with the next shard;
* a truncated tar whose cut falls on a header boundary ends *silently* in Python's streaming tar reader
  (and so does a corrupt header, or a second tar appended with `cat`), so each shard's byte stream is
  watched and, when the tar reader stops, the rest is drained and checked: a complete tar ends with the
  end-of-archive marker (two zero blocks) and only zeros after it;
* a shard that ends badly drops its last sample when it lacks a member the sample before it had (its
  other members were cut off): that loss is part of the `bad_shard`, not a `missing_caption`;
* keys holding a '.' (`photo.0001.jpg`, `IMG_1.HEIC.jpg`, as plain `tar` of camera files has them) break
  webdataset's rule (key = name up to its first dot): a run of them became ONE sample, or every image was
  filed under `heic.jpg`. Names valid for webdataset keep its rule (`KEY.jpg`, `KEY.neg.txt`, `KEY.seg.png`,
  `KEY.left.jpg KEY.right.jpg`); a key is read as `KEY.X` (counted `dotted_key`, kept) only when a sample's
  first two members share the middle X and it has no plain `KEY.ext` (a role like `seg` names one member),
  and then each new X under KEY is a new sample. Such a sample has no `jpg`/`txt` of its own, so it could
  not train as webdataset reads it: a webdataset user loses nothing and gets the samples the files form.
  Names that do not settle it (one member per X) are read as webdataset does, counted `dotted_key_merged`;
* a member whose extension the current sample already has (`a.jpg a.txt a.jpg a.txt`, e.g. two exports
  concatenated) starts a new sample under the same key, counted as `duplicate_key` (webdataset's
  `group_by_keys` would drop the second sample's members);
* members are read by `_tar_members` (webdataset's `tar_file_iterator` plus a byte limit): once a
  sample's members add up to more than `max_bytes`, the rest of it is not read -- the streaming tar
  reader skips over it in small blocks, so a 100 GB member costs no memory -- and the sample carries
  `TOO_LARGE_KEY` instead, which the consumers count as `too_large`. The sample itself is still yielded,
  so sample positions inside a shard (and resume) do not depend on the limit. Tar metadata headers (pax,
  GNU long names) bigger than the limit make the shard a `bad_shard`;
* http(s) shards are read by curl with a stall limit (`HTTP_STALL_S`, see `urls.open_shards`): webdataset's
  own curl command has none, so a server that accepted the connection and then sent nothing blocked the
  worker for ever instead of becoming a `bad_shard`.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import webdataset as wds
from webdataset import tariterators

from .settings import DEFAULT_MAX_SAMPLE_BYTES
from .stats import BAD_SHARD, DOTTED_KEY, DOTTED_KEY_MERGED, DUPLICATE_KEY, TOO_LARGE_KEY, SkipCounter
from .tarend import WatchedStream
from .urls import open_shards

_END = "__end_of_shard__"
"""Key of the item `_expand` yields after each shard: "" for a clean end, else why the shard ended badly."""
_SAMPLE, _REPEAT, _DOTTED = "__sample__", "__repeat__", "__dotted__"
"""Tags `_members_of` puts on each member: the sample's number in the shard, and whether it repeats the
key of the sample before it; an item with `_DOTTED` says sample `_SAMPLE` has the key `KEY._DOTTED`."""


_SKIP_META = re.compile(r"__[^/]*__($|/)")
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class MetadataTooLarge(ValueError):
    """A pax or GNU long-name header larger than the byte limit (tarfile would read it whole)."""


def _limited_tarinfo(max_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses metadata headers over `max_bytes` before tarfile reads them whole."""

    class LimitedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's own hook
            if max_bytes and self.size > max_bytes and self.type in _META_TYPES:
                raise MetadataTooLarge(f"tar header {self.name!r} of {self.size} bytes > max_sample_bytes="
                                       f"{max_bytes}")
            return super()._proc_member(tarfile_)

    return LimitedTarInfo


def _tar_members(fileobj: Any, max_bytes: int, handler: Callable[[Exception], bool],
                 select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_iterator` with a per-sample byte limit (see the module docstring).

    Sizes are summed over the members of one sample (consecutive members of one key until an extension
    repeats; see `_Sample`), selected or not, so every reader of a shard (training, tokenizer, inspect)
    skips the same samples. Samples are delimited here, once, and `_group` follows the `_SAMPLE` tags.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_limited_tarinfo(max_bytes)) as stream:
        yield from _members_of(stream, fileobj, max_bytes, handler, select_files)
        if isinstance(fileobj, WatchedStream):
            fileobj.archive_end = stream.offset  # where the tar reader stopped: its end-of-archive marker


class _Sample:
    """The sample `_members_of` is reading: number, key (`prefix`, or `prefix.dot` for a dotted key),
    extensions, bytes so far, and what the names past the key's first dot (the middle X of `K.X.ext`) show."""

    def __init__(self, number: int = -1, prefix: str | None = None, dot: str | None = None,
                 repeat: bool = False) -> None:
        self.number, self.prefix, self.dot, self.repeat = number, prefix, dot, repeat
        self.extensions: set[str] = set()
        self.count = self.run = self.total = 0  # members; members in a row with this middle; bytes
        self.middle, self.plain, self.flagged = "", False, False

    def after(self, prefix: str, suffix: str) -> _Sample | None:
        """The new sample a member `prefix.suffix` starts, or None when it belongs to this one."""
        middle, _, last = suffix.lower().rpartition(".")
        if prefix != self.prefix:
            return _Sample(self.number + 1, prefix)
        if self.dot is not None:  # key `prefix.dot`: another middle is new key, a known extension a repeat
            same = middle == self.dot.lower()
            if same and last not in self.extensions:
                return None
            return _Sample(self.number + 1, prefix, suffix.rpartition(".")[0] or None, same)
        if suffix.lower() in self.extensions:
            return _Sample(self.number + 1, prefix, repeat=True)
        if middle and not self.plain and self.middle not in ("", middle) and self.run > 1:  # mixed (`_noted`)
            return _Sample(self.number + 1, prefix, suffix.rpartition(".")[0])
        return None

    def add(self, suffix: str, size: int) -> bool:
        """Count a member in; True when it shows that the key holds a dot: the sample's first two members
        share one middle (`K.X.jpg K.X.txt`), so it is no role such as `seg` of one member."""
        middle, _, last = suffix.lower().rpartition(".")
        self.run = self.run + 1 if middle and middle == self.middle else 1
        self.middle, self.plain = middle, self.plain or not middle
        self.count, self.total = self.count + 1, self.total + size
        found = self.dot is None and self.count == self.run == 2
        if found:
            self.dot = suffix.rpartition(".")[0]
            self.extensions = {e.rpartition(".")[2] for e in self.extensions}
        self.extensions.add(suffix.lower() if self.dot is None else last)
        return found


def _members_of(stream: tarfile.TarFile, fileobj: Any, max_bytes: int, handler: Callable[[Exception], bool],
                select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    sample = _Sample()
    for tarinfo in stream:
        stream.members = []  # the streaming reader would otherwise keep every header of the shard
        fname = tarinfo.name
        try:
            if not tarinfo.isreg() or fname is None or _SKIP_META.match(fname) or (
                    "/" not in fname and fname.startswith("__") and fname.endswith("__")):
                continue
            prefix, suffix = tariterators.base_plus_ext(fname)
            if prefix is None:
                continue  # names without an extension belong to no sample (as in webdataset)
            sample = sample.after(prefix, suffix) or sample
            if sample.add(suffix, tarinfo.size) or (sample.dot is not None and sample.count == 1):
                yield {_DOTTED: sample.dot, _SAMPLE: sample.number, "fname": fname}
            number, repeat, total = sample.number, sample.repeat, sample.total
            if max_bytes and total > max_bytes:
                if not sample.flagged:
                    sample.flagged = True
                    # `_group` files `KEY.__too_large__` under TOO_LARGE_KEY in the sample
                    yield {"fname": f"{prefix}.{TOO_LARGE_KEY}",
                           "data": f"{fname}: {tarinfo.size} bytes ({total} in the sample so far) > "
                                   f"max_sample_bytes={max_bytes}", _SAMPLE: number, _REPEAT: repeat}
                continue  # never read: the next header read skips over it in small blocks
            if select_files is not None and not select_files(fname):
                continue
            data = stream.extractfile(tarinfo).read()
            yield {"fname": fname, "data": data, _SAMPLE: number, _REPEAT: repeat}
        except Exception as exn:
            if exn.args:
                exn.args = (f"{exn.args[0]} @ {fileobj}",) + exn.args[1:]
            if handler(exn):
                continue
            break


def _expand(sources: Iterable[dict], max_bytes: int, handler: Callable[[Exception], bool],
            select_files: Callable[[str], bool] | None) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` over `_tar_members`: files tagged with `__url__`, and after each
    shard an `_END` item ("" when the tar reader ended normally, else the error)."""
    for source in sources:
        url = source["url"]
        try:
            for member in _tar_members(source["stream"], max_bytes, handler, select_files):
                member["__url__"] = url
                yield member
            yield {_END: ""}
        except Exception as exn:
            exn.args = exn.args + (source.get("stream"), url)
            if not handler(exn):
                break
            yield {_END: f"{type(exn).__name__}"}


def _group(files: Iterable[dict], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples from tagged members (webdataset's `group_by_keys`, following `_members_of`'s sample
    boundaries): a repeated key is a new sample, counted as `duplicate_key`; a sample `_members_of` found
    to have a dotted key is keyed `KEY.X`, its members by their last extension; at a bad end of a shard
    the last sample is dropped unless it has every member name the sample before it had."""
    current: dict[str, Any] | None = None
    number, dot = -1, (-1, "")
    previous: set[str] = set()
    for item in files:
        if _END in item:
            if current is not None and (not item[_END] or (previous and previous <= current.keys())):
                yield _noted(current, skips)
            current, previous, dot = None, set(), (-1, "")
            continue
        prefix, suffix = tariterators.base_plus_ext(item["fname"])
        if _DOTTED in item:
            dot = (item[_SAMPLE], item[_DOTTED])
            skips.skip(DOTTED_KEY, f"{item['__url__']}: {item['fname']}: read as key {prefix}.{dot[1]} (the "
                                   f"key holds a '.'), not {prefix!r} by webdataset's first-dot rule")
            if current is not None and number == dot[0]:
                current = {k.rpartition(".")[2]: v for k, v in current.items()}  # `__key__` etc. have no '.'
                current["__key__"] = f"{prefix}.{dot[1]}"
            continue
        if current is None or item[_SAMPLE] != number:
            if current is not None:
                previous = set(current)
                yield _noted(current, skips)
            key = f"{prefix}.{dot[1]}" if dot[0] == item[_SAMPLE] else prefix
            if item[_REPEAT]:
                skips.skip(DUPLICATE_KEY, f"{item['__url__']}: key {key!r} again right after itself "
                                          f"(at {item['fname']}): read as a new sample")
            current, number = {"__key__": key, "__url__": item["__url__"]}, item[_SAMPLE]
        ext = suffix.lower()
        current[ext.rpartition(".")[2] if dot[0] == number else ext] = item["data"]
    if current is not None:
        yield _noted(current, skips)


def _noted(sample: dict[str, Any], skips: SkipCounter) -> dict[str, Any]:
    """`sample`, counted as `dotted_key_merged` when its members are all `KEY.X.ext` with several X: keys
    that may hold a '.', which the names did not settle (see the module docstring)."""
    names = sorted(k for k in sample if not k.startswith("__"))
    if len({k.rpartition(".")[0] for k in names} | {""}) > 2 and all("." in k for k in names):
        skips.skip(DOTTED_KEY_MERGED, f"{sample['__url__']}: {len(names)} members of key "
                   f"{sample['__key__']!r} ({', '.join(names[:3])}{', ...' * (len(names) > 3)}) read as ONE "
                   f"sample by webdataset's first-dot rule: if the keys hold a '.', rename the files")
    return sample


class _ShardErrors:
    """Exception handler for the webdataset stages: count each failing shard once, always continue."""

    def __init__(self, urls: Iterable[str], skips: SkipCounter) -> None:
        self.urls = set(urls)
        self.skips = skips
        self.current: WatchedStream | None = None
        self.counted: set[str] = set()

    def bad(self, url: str, why: str) -> None:
        if url in self.counted:
            return
        self.counted.add(url)
        self.skips.skip(BAD_SHARD, f"{url}: {why}")

    def __call__(self, exn: Exception) -> bool:
        url = next((a for a in exn.args if isinstance(a, str) and a in self.urls), None)
        if url is None:
            url = self.current.url if self.current is not None else "?"
        if isinstance(exn, OSError) and exn.strerror:  # args[0] is the errno: "IsADirectoryError: 21"
            why = exn.strerror + (f": {exn.filename}" if exn.filename else "")
        else:  # the stages append the stream and URL to args: str(exn) would print that tuple
            why = exn.args[0] if exn.args else ""
        self.bad(url, f"{type(exn).__name__}: {why}")
        return True

    # pipeline stages -------------------------------------------------------------------------------
    def watch(self, sources: Iterable[dict]) -> Iterator[dict]:
        """Between url_opener and the tar reader: wrap each opened stream so its end can be checked."""
        for source in sources:
            if self.current is not None:
                self.current.close()  # the previous shard failed mid-way; do not leak its handle
            self.current = WatchedStream(source["stream"], source["url"])
            source["stream"] = self.current
            yield source
        if self.current is not None:
            self.current.close()

    def check_ends(self, files: Iterable[dict]) -> Iterator[dict]:
        """After the tar reader (`_expand`): at each clean end of a shard, check the tar is complete and
        has nothing after its end; a shard found bad here ends with why, for `_group`."""
        for item in files:
            if _END in item and not item[_END] and self.current is not None:
                why = self.current.finish()
                if why:
                    self.bad(self.current.url, why)
                    item = {_END: why}
            yield item


HTTP_STALL_S = 60
"""An http(s) shard that delivers no byte for this many seconds is abandoned (curl exits 28) and counted
as `bad_shard`; with the retries below, a dead server costs at most about 3 x this per shard."""
HTTP_RETRY_S = 120
"""curl retries transient failures (timeouts, 408/429/5xx) of an http(s) shard for up to this many
seconds after its first try (0: no retries), as webdataset's `--retry 30` did, but bounded."""


def shard_samples(
    urls: list[str],
    skips: SkipCounter,
    select_files: Callable[[str], bool] | None = None,
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> Iterator[dict[str, Any]]:
    """Samples (`__key__`, `__url__`, extension -> bytes) of `urls` in order; failures go to `skips`.

    `select_files` filters tar members by name before their bytes are read (the tokenizer reads captions
    only). A sample whose members add up to more than `max_bytes` (`data.max_sample_bytes`; 0: no limit)
    is yielded with only the members read before the limit and `TOO_LARGE_KEY` set to why; consumers
    count it as `too_large` (`decode.split_sample` does).
    """
    if not urls:
        return iter(())
    errors = _ShardErrors(urls, skips)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        partial(open_shards, handler=errors, stall_s=HTTP_STALL_S, retry_s=HTTP_RETRY_S),
        errors.watch,
        partial(_expand, max_bytes=max_bytes, handler=errors, select_files=select_files),
        errors.check_ends,
        partial(_group, skips=skips),
    )
    return iter(pipeline)
