"""Where data.dir's images come from: a local folder as it is; a .zip / .tar / .tar.gz / .tgz (a local path,
one on the Drive mount, or an http(s):// URL) fetched and unpacked once; a folder on a FUSE mount such as
Google Drive copied to local disk. All of them land under data.unpack_dir; the scan then reads a local folder.

An archive is unpacked into a temp folder renamed into place at the end, so an interrupted unpack is never
taken for a complete one; a rerun finds the renamed folder and reuses it. No TensorFlow here.
"""
from __future__ import annotations

import errno
import fcntl
import gzip
import http.client
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath

from common.errors import TransientError, is_disk_full
from common.files import file_digest, replace_atomic, write_text_atomic
from runner.data.scan import is_ignored
from runner.errors import DataError, RunnerError, StopRequested
from runner.ui.progress import progress
from sync.errors import IntegrityError
from sync.snapshot import check_relpath

log = logging.getLogger("runner")

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
RECORD = ".source.json"         # inside an unpacked or copied folder: where it came from, size, sha256
DOWNLOADS = ".downloads"        # under unpack_dir: partial downloads (resumed by HTTP Range)
CHUNK = 1 << 20
TIMEOUT_S = 60


class SourceUnavailable(RunnerError, TransientError):
    """The dataset's URL could not be fetched because of the network or the server: retry later (exit 75)."""


def is_url(value: str) -> bool:
    """Whether data.dir names an http(s) URL."""
    return value.startswith(("https://", "http://"))


def is_archive(name: str) -> bool:
    """Whether a path or URL names an archive we unpack (by its ending, query string aside)."""
    return name.split("?")[0].lower().endswith(ARCHIVE_SUFFIXES)


def local_data_dir(data, progress_mode: str = "auto", stop=None) -> Path:
    """The local folder to scan for data.dir (a DataConfig): itself, or its archive unpacked / its Drive
    folder copied into data.unpack_dir (done once; a rerun reuses it). A truthy `stop` (a StopFlag) ends a
    download or an unpack with StopRequested; the part downloaded is kept for the next start."""
    data_dir, unpack_dir, copy_prefix = data.dir, data.unpack_dir, data.copy_prefix
    if is_url(data_dir):
        if not is_archive(data_dir):
            raise DataError(f"data.dir {data_dir} is a URL but not of an archive; a URL must name a "
                            f"{', '.join(ARCHIVE_SUFFIXES)} file (a folder cannot be downloaded).")
        return unpacked(data_dir, Path(unpack_dir), progress_mode, stop=stop)
    path = Path(data_dir)
    if path.is_file() and is_archive(path.name):
        on_mount = bool(copy_prefix) and _is_under(path, Path(copy_prefix))
        return unpacked(data_dir, Path(unpack_dir), progress_mode, copy_first=on_mount, stop=stop)
    if path.is_file():
        raise DataError(f"data.dir {path} is a file but not an archive; point data.dir at a folder of class "
                        f"folders or at a {', '.join(ARCHIVE_SUFFIXES)} file.")
    if copy_prefix and path.is_dir() and _is_under(path, Path(copy_prefix)):
        return dataset_root(copied(path, Path(unpack_dir), progress_mode))
    return dataset_root(path) if path.is_dir() else path


def _is_under(path: Path, prefix: Path) -> bool:
    return path.resolve().is_relative_to(prefix.resolve())


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _stem(name: str) -> str:
    base = PurePosixPath(name.split("?")[0]).name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] or "data"
    return base or "data"


def unpacked(source: str, unpack_dir: Path, progress_mode: str, copy_first: bool = False, stop=None) -> Path:
    """The dataset root of an archive (path or URL) unpacked under unpack_dir: reused when already there.
    A local archive is keyed by its path, size and modification time, a URL by itself; `copy_first` (an
    archive on a slow mount) copies it to local disk first, so the mount is read once, not twice. Two
    processes unpacking the same source take turns (a lock file): the second reuses what the first made."""
    if is_url(source):
        key = _key(source)
    else:
        info = Path(source).stat()
        key = _key(f"{Path(source).resolve()}|{info.st_size}|{info.st_mtime_ns}")
    target = unpack_dir / f"{_stem(source)}-{key}"
    if (target / RECORD).is_file():
        log.info("data.dir %s: using its unpacked copy %s", source, target)
        return dataset_root(target)
    _prepare_folder(unpack_dir)
    lock = unpack_dir / f".{target.name}.lock"
    with _exclusive(lock, source):
        if not (target / RECORD).is_file():  # else another process unpacked it while this one waited
            _unpack_once(source, key, target, unpack_dir, progress_mode, copy_first, stop)
        lock.unlink(missing_ok=True)  # safe once the target is complete: every later process finds it first
    return dataset_root(target)


def _unpack_once(source: str, key: str, target: Path, unpack_dir: Path, progress_mode: str, copy_first: bool,
                 stop) -> None:
    for leftover in unpack_dir.glob(f".partial-{target.name}-*"):  # a killed unpack: never used, removed
        shutil.rmtree(leftover, ignore_errors=True)
    download = unpack_dir / DOWNLOADS / f"{key}-{Path(source.split('?')[0]).name}"
    if is_url(source) and download.is_file() and download.with_suffix(".json").is_file():
        archive = download  # downloaded whole before a stop or a kill during its unpack
    elif is_url(source):
        archive = fetch(source, download, progress_mode, stop)
    elif copy_first:
        archive = _copy_file(Path(source), download, progress_mode)
    else:
        archive = Path(source)
    record = {"source": source, "size": archive.stat().st_size, "sha256": file_digest(archive)}
    if is_url(source):
        record.update(json.loads(archive.with_suffix(".json").read_text(encoding="utf-8")))
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{target.name}-", dir=unpack_dir))
    try:
        log.info("unpacking %s (%d MB) into %s", source, record["size"] >> 20, target)
        try:
            unpack_archive(archive, partial, source, progress_mode, stop)
        except DataError as e:
            if archive != Path(source):  # a damaged download or copy is fetched again next time
                shutil.rmtree(unpack_dir / DOWNLOADS, ignore_errors=True)
            if is_url(source) and record.get("size_confirmed") is False and "damaged or incomplete" in str(e):
                raise SourceUnavailable(f"data.dir {source}: the download is not a whole archive, and the "
                                        f"server did not say how long it is, so the connection was probably "
                                        f"cut before the end ({e}). It is downloaded again next time.") from None
            raise
        write_text_atomic(partial / RECORD, json.dumps(record, indent=1))
        replace_atomic(partial, target)  # only now is it there: an interrupted unpack leaves a .partial folder
    except OSError as e:
        raise _unwritable(unpack_dir, e, f"unpacking {source}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if archive != Path(source):
        shutil.rmtree(unpack_dir / DOWNLOADS, ignore_errors=True)


@contextmanager
def _exclusive(lock_path: Path, source: str):
    """Hold an exclusive lock on lock_path (waiting for another process that holds it)."""
    try:
        handle = open(lock_path, "a+b")
    except OSError as e:
        raise _unwritable(lock_path.parent, e, f"locking {source}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("data.dir %s is being unpacked by another process; waiting for it", source)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_file(source: Path, dest: Path, progress_mode: str) -> Path:
    """Copy one large file with a progress bar (to a temp name, then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.copying")
    bar = progress(source.stat().st_size, "copying data.dir to local disk", "B", progress_mode)
    try:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        raise _unwritable(dest.parent, e, f"copying {source}") from None
    finally:
        bar.close()
    replace_atomic(tmp, dest)
    return dest


def dataset_root(folder: Path) -> Path:
    """The folder itself, or its single top-level folder when that one holds folders (flower_photos.tgz holds
    flower_photos/<class>/): the same rule for an unpacked archive, a copied Drive folder and a local folder.
    A lone folder of images only is a class, not a root."""
    entries = [p for p in folder.iterdir() if not is_ignored(p.name)]
    if len(entries) == 1 and entries[0].is_dir() and any(
            p.is_dir() and not is_ignored(p.name) for p in entries[0].iterdir()):
        return entries[0]
    return folder


def unpack_archive(archive: Path, dest: Path, source: str, progress_mode: str, stop=None) -> None:
    """Extract a zip or tar archive into dest, refusing any member that is absolute, climbs out with '..',
    links out of dest, or is a device (tarfile's 'data' filter, and sync's snapshot path check). Every
    byte's checksum is verified: a zip member's CRC-32 as it is extracted, a compressed tar's whole stream
    (gzip's CRC-32 and length, bzip2's and xz's checks) read to its end, so a damaged archive is refused
    before anything of it is used. A truthy `stop` ends the unpack with StopRequested."""
    def refuse(name: str, why: str) -> DataError:
        return DataError(f"data.dir {source}: member {name!r} {why}; refused (the archive was not unpacked). "
                         f"Rebuild the archive from the dataset folder (e.g. `tar czf data.tgz my_dataset/`).")

    def check_stop() -> None:
        if stop:
            raise StopRequested(stop.signal_name, f"unpacking {source}")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for m in members:
                    _check_name(m.filename, refuse)
                    if (m.external_attr >> 16) & 0o170000 == 0o120000:
                        raise refuse(m.filename, "is a symbolic link")
                bar = progress(len(members), "unpacking", "file", progress_mode)
                for m in members:
                    check_stop()
                    zf.extract(m, dest)  # reads the member to its end: a wrong CRC-32 raises BadZipFile
                    bar.update()
                bar.close()
            return
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_name(m.name, refuse)
            bar = progress(len(members), "unpacking", "file", progress_mode)
            for m in members:
                check_stop()
                tar.extract(m, dest, filter="data")
                bar.update()
            bar.close()
            while tar.fileobj.read(CHUNK):  # to the stream's end, where gzip / bz2 / xz check what they read
                check_stop()
    except tarfile.FilterError as e:
        raise refuse(getattr(e, "tarinfo", None).name if getattr(e, "tarinfo", None) else "?", f"is unsafe ({e})") \
            from None
    except (tarfile.ReadError, zipfile.BadZipFile, EOFError, tarfile.CompressionError, gzip.BadGzipFile,
            zlib.error, lzma.LZMAError) as e:
        raise DataError(f"data.dir {source} is not a readable {', '.join(ARCHIVE_SUFFIXES)} archive "
                        f"({type(e).__name__}: {e}): it is damaged or incomplete. Download or build it "
                        f"again.") from None
    except (tarfile.TarError, zipfile.LargeZipFile) as e:
        raise DataError(f"data.dir {source}: the archive could not be unpacked ({e}).") from None


def _check_name(name: str, refuse) -> None:
    normal = PurePosixPath(name.rstrip("/"))
    if str(normal) in (".", ""):  # the archive's own top folder ("./")
        return
    try:
        check_relpath(name.rstrip("/") or name)
    except IntegrityError:
        if not normal.parts or normal.parts[0] != ".sync":
            raise refuse(name, "is an absolute path, climbs out with '..', or uses '\\' as a separator") from None


def fetch(url: str, dest: Path, progress_mode: str, stop=None) -> Path:
    """Download url to dest, resuming a partial download with an HTTP Range request only while the server's
    file is the one it was started on (If-Range with the ETag or Last-Modified saved beside the partial file,
    and Content-Range's start and total checked); a 200 answer, or a file that changed, starts over from
    byte 0. Its size is checked against the server's; dest.json records the ETag and whether the server
    stated the size. A truthy `stop` (a StopFlag) ends the download with StopRequested, the part kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):  # a second time only when the server's file changed under a partial download
        try:
            return _download(url, dest, progress_mode, stop)
        except _StartOver as e:
            log.warning("data.dir %s: %s; downloading it again from the start", url, e)
            dest.with_suffix(".part").unlink(missing_ok=True)
            dest.with_suffix(".part.json").unlink(missing_ok=True)
    raise SourceUnavailable(f"data.dir {url}: the file on the server changed while it was being downloaded; "
                            f"the download starts over next time.")


class _StartOver(Exception):
    """The partial download cannot be continued: the server's file is not the one it was started on."""


def _validator(headers) -> dict:
    """What identifies the server's file for If-Range: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    return {"etag": etag if etag and not etag.startswith("W/") else None, "last_modified": modified}


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of a `Content-Range: bytes first-last/total` header."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if not match:
        return None
    return int(match[1]), None if match[3] == "*" else int(match[3])


def _download(url: str, dest: Path, progress_mode: str, stop) -> Path:
    part, part_info = dest.with_suffix(".part"), dest.with_suffix(".part.json")
    saved = _read_json(part_info) if part.exists() else {}
    have = part.stat().st_size if part.exists() else 0
    if_range = saved.get("etag") or saved.get("last_modified")
    headers = {"Range": f"bytes={have}-", "If-Range": if_range} if have and if_range else {}
    if have and not if_range:
        log.info("data.dir %s: the partial download has nothing that identifies the server's file; starting "
                 "over", url)
        have = 0
    try:
        with _raising_on_signal(stop, f"downloading {url}"), \
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
            validator = _validator(response.headers)
            length = response.headers.get("Content-Length")
            if response.status == 206:
                first, total = _content_range(response.headers.get("Content-Range")) or (None, None)
                if first != have:
                    raise _StartOver(f"the server resumed at byte {first}, not at {have}")
                if saved.get("total") is not None and total is not None and total != saved["total"]:
                    raise _StartOver(f"its size changed from {saved['total']} to {total} bytes")
                if saved.get("etag") and validator["etag"] and validator["etag"] != saved["etag"]:
                    raise _StartOver("its ETag changed")
                total = total if total is not None else saved.get("total")
            else:  # 200: the whole file (the server ignored Range, or If-Range said it changed)
                have, total = 0, int(length) if length is not None else None
                write_text_atomic(part_info, json.dumps(dict(validator, url=url, total=total)))
            bar = progress(total or 0, "downloading", "B", progress_mode, initial=have)
            try:
                with open(part, "ab" if have else "wb") as out:
                    while chunk := response.read1(CHUNK):  # what has arrived: a stop keeps all of it
                        out.write(chunk)
                        bar.update(len(chunk))
            finally:
                bar.close()
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial download is already whole (or the file changed): start over
            raise _StartOver(f"the server refused the range from byte {have} (HTTP 416)") from None
        if e.code in (408, 429) or e.code >= 500:
            raise SourceUnavailable(f"data.dir {url}: the server answered HTTP {e.code} ({e.reason}); the "
                                    f"download is kept to resume.") from None
        raise DataError(f"data.dir {url}: the server answered HTTP {e.code} ({e.reason}). Check the URL (it "
                        f"must download the archive itself, not a page about it).") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        # HTTPException: IncompleteRead (a chunked download cut), a connection dropped mid-response
        raise SourceUnavailable(f"data.dir {url} could not be downloaded ({getattr(e, 'reason', None) or e!r}); "
                                f"the part downloaded is kept and resumed next time.") from None
    except OSError as e:
        raise _unwritable(dest.parent, e, f"downloading {url}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise SourceUnavailable(f"data.dir {url}: the download ended at {size} of {total} bytes; it is "
                                f"resumed next time.")
    info = _read_json(part_info)
    write_text_atomic(dest.with_suffix(".json"), json.dumps({"etag": info.get("etag"), "url": url,
                                                             "size_confirmed": total is not None}))
    replace_atomic(part, dest)
    part_info.unlink(missing_ok=True)
    return dest


def _raising_on_signal(stop, phase: str):
    """A block in which SIGTERM / SIGINT raise StopRequested at once, even in a read waiting on the network."""
    return stop.raising(phase) if stop is not None else nullcontext()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def copied(folder: Path, unpack_dir: Path, progress_mode: str) -> Path:
    """A local copy of a folder on a slow mount (Google Drive), brought up to date: files missing or changed
    (by size and modification time) are copied, files gone from the source are removed. Each file is copied
    to a temp name and renamed, so a kill leaves no half file; the next start finishes the copy."""
    target = unpack_dir / f"{folder.name}-{_key(str(folder.resolve()))}"
    _prepare_folder(target)
    wanted: dict[str, os.stat_result] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_ignored(d)]
        for name in files:
            if not is_ignored(name):
                path = Path(root) / name
                try:
                    wanted[path.relative_to(folder).as_posix()] = path.stat()
                except FileNotFoundError:  # deleted or moved since it was listed
                    log.warning("%s went from data.dir while it was listed; not copied", path)
    stale = [rel for rel, info in wanted.items() if not _same(target / rel, info)]
    total = sum(wanted[rel].st_size for rel in stale)
    if stale:
        log.info("copying %d files (%d MB) of %s to %s", len(stale), total >> 20, folder, target)
    bar = progress(total, "copying data.dir to local disk", "B", progress_mode) if stale else None
    try:
        for rel in stale:
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.copying")
            try:
                shutil.copy2(folder / rel, tmp)
            except FileNotFoundError:  # deleted, or its class folder renamed, while the copy ran
                if (folder / rel).exists():
                    raise
                log.warning("%s went from data.dir during the copy; left out (the next start copies what is "
                            "there then)", folder / rel)
                tmp.unlink(missing_ok=True)
                del wanted[rel]
                continue
            replace_atomic(tmp, dest)
            bar.update(wanted[rel].st_size)
    except OSError as e:
        raise _unwritable(target, e, f"copying {folder}") from None
    finally:
        if bar is not None:
            bar.close()
    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        rel = path.relative_to(target).as_posix()
        if path.is_file() and rel not in wanted and rel != RECORD:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    write_text_atomic(target / RECORD, json.dumps({"source": str(folder), "files": len(wanted)}))
    return target


def _same(path: Path, info: os.stat_result) -> bool:
    try:
        mine = path.stat()
    except OSError:
        return False
    return mine.st_size == info.st_size and mine.st_mtime_ns == info.st_mtime_ns


def _prepare_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(folder, e, "creating it") from None


# what a network file system's mount (Google Drive's on Colab) answers when it cannot serve a read right now
MOUNT_HICCUPS = {errno.EIO, errno.ENOTCONN, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET, errno.ECONNABORTED,
                 errno.EAGAIN}


def _unwritable(folder: Path, e: OSError, doing: str) -> RunnerError | TransientError:
    """The error for a failed copy or write under data.unpack_dir: a full disk or a folder that cannot be written
    (exit 2), or a mount that failed to serve a read (exit 75: the same command resumes the copy)."""
    if e.errno in MOUNT_HICCUPS:
        return TransientError(f"{doing} failed: {e.strerror or e} (errno {e.errno}), which is what a network mount "
                              f"such as Google Drive's says when it cannot serve a file right now. Run the same "
                              f"command again: what was copied is kept and the copy goes on from there.")
    why = "the disk is full" if is_disk_full(e) else (e.strerror or str(e))
    if not (is_disk_full(e) or e.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR)):
        raise e
    return DataError(f"data.unpack_dir {folder}: {doing} failed ({why}). Free some space or set "
                     f"data.unpack_dir (--set data.unpack_dir=...) to a folder on a disk with room for the "
                     f"dataset.")
