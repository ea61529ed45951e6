"""data.dir as users have it: an archive (local or at a URL) unpacked once, safely, and reused; a folder on the
Drive mount copied to local disk once. Served from a tiny HTTP server on 127.0.0.1."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from common.errors import EXIT_TRANSIENT, EXIT_USER_ERROR, status_of
from common.files import file_digest
from runner.data import sources
from runner.run.config import DataConfig, load_config
from runner.errors import DataError
from runner.prepare import scan
from runner.data.sources import RECORD, SourceUnavailable, local_data_dir
from runner.training.loop import StopFlag
from tests.helpers import write_photo_archive, write_synthetic_dataset

PER_CLASS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder served, its base URL): a local HTTP server in a thread."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def flower_tgz(served):
    folder, url = served
    archive = write_photo_archive(folder / "flower_photos.tgz", "flower_photos", PER_CLASS)
    return archive, f"{url}/flower_photos.tgz"


@pytest.fixture(scope="module")
def macos_zip(served, tmp_path_factory):
    """A zip made by macOS's Finder: class folders at the top, plus __MACOSX/ and ._* members."""
    folder, url = served
    data = write_synthetic_dataset(tmp_path_factory.mktemp("zipsrc"), num_classes=2, per_class=PER_CLASS, size=32)
    with zipfile.ZipFile(folder / "clothes.zip", "w") as zf:
        for path in sorted(data.rglob("*.jpg")):
            rel = path.relative_to(data).as_posix()
            zf.write(path, rel)
            zf.writestr(f"__MACOSX/{Path(rel).parent}/._{path.name}", b"\x00\x05\x16\x07")
    return folder / "clothes.zip", f"{url}/clothes.zip"


def data_config(source, unpack_dir, copy_prefix="") -> DataConfig:
    return DataConfig(dir=str(source), unpack_dir=str(unpack_dir), copy_prefix=str(copy_prefix))


def leftovers(unpack_dir: Path) -> list[Path]:
    """What an unpack left in unpack_dir besides its lock file (kept after a failed unpack; harmless)."""
    return [p for p in unpack_dir.iterdir() if not p.name.endswith(".lock")]


def class_counts(root: Path) -> dict[str, int]:
    return {p.name: len(list(p.glob("*.jpg"))) for p in sorted(root.iterdir()) if p.is_dir()}


def test_a_tgz_url_is_downloaded_verified_unpacked_to_its_top_folder_and_reused(flower_tgz, tmp_path, monkeypatch):
    archive, url = flower_tgz
    root = local_data_dir(data_config(url, tmp_path / "unpack"), "lines")
    assert root.name == "flower_photos"
    assert class_counts(root) == {"hat": PER_CLASS, "pants": PER_CLASS, "shoes": PER_CLASS}
    record = json.loads((root.parent / RECORD).read_text())
    assert record["sha256"] == file_digest(archive) and record["size"] == archive.stat().st_size
    assert [p.name for p in (tmp_path / "unpack").iterdir()] == [root.parent.name]  # no download left behind
    monkeypatch.setattr(sources, "fetch", lambda *a: pytest.fail("a rerun downloaded again"))
    assert local_data_dir(data_config(url, tmp_path / "unpack"), "lines") == root


def test_the_run_scans_a_zip_url_through_prepare(macos_zip, tmp_path):
    _, url = macos_zip
    config = load_config(None, [f"data.dir={url}", f"run.dir={tmp_path / 'run'}",
                                f"data.unpack_dir={tmp_path / 'unpack'}", "data.min_images_per_class=2"])
    assert config.data.dir == url  # a URL is not taken for a relative path
    dataset, _, _ = scan(config, StopFlag())
    assert dataset.classes == ["class_0000", "class_0001"] and len(dataset.images) == 2 * PER_CLASS
    assert not dataset.skipped  # __MACOSX/ and ._* are litter, not classes or bad images


def test_a_missing_url_is_exit_2_and_an_unreachable_server_exit_75(served, tmp_path):
    _, url = served
    with pytest.raises(DataError, match="HTTP 404") as missing:
        local_data_dir(data_config(f"{url}/nothing.tgz", tmp_path), "lines")
    assert status_of(missing.value)[0] == EXIT_USER_ERROR and f"{url}/nothing.tgz" in str(missing.value)
    with socket_closed() as port:
        with pytest.raises(SourceUnavailable) as down:
            local_data_dir(data_config(f"http://127.0.0.1:{port}/data.zip", tmp_path), "lines")
    assert status_of(down.value)[0] == EXIT_TRANSIENT


class socket_closed:
    """A port on 127.0.0.1 nothing listens on."""
    def __enter__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_a_damaged_archive_is_exit_2_naming_it(flower_tgz, tmp_path):
    damaged = tmp_path / "flower_photos.tgz"
    damaged.write_bytes(flower_tgz[0].read_bytes()[:3000])
    with pytest.raises(DataError, match="damaged or incomplete") as error:
        local_data_dir(data_config(damaged, tmp_path / "unpack"), "lines")
    assert str(damaged) in str(error.value)
    assert not leftovers(tmp_path / "unpack")  # nothing half-unpacked is left


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("data/a/ok.jpg")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _link(name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = tarfile.SYMTYPE, target
    return member


def _device(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = tarfile.CHRTYPE
    return member


@pytest.mark.parametrize("member", [tarfile.TarInfo("../../escaped.jpg"), tarfile.TarInfo("/tmp/absolute.jpg"),
                                    _link("data/a/out", "/etc"), _link("data/a/up", "../../.."),
                                    _device("data/a/dev")], ids=["dotdot", "absolute", "link-abs", "link-up", "device"])
def test_an_unsafe_archive_member_is_refused_and_nothing_is_unpacked(member, tmp_path):
    archive = _tar_with(tmp_path / "evil.tgz", member)
    with pytest.raises(DataError, match="refused") as error:
        local_data_dir(data_config(archive, tmp_path / "unpack"), "lines")
    assert member.name in str(error.value) and status_of(error.value)[0] == EXIT_USER_ERROR
    assert not leftovers(tmp_path / "unpack") and not (tmp_path / "escaped.jpg").exists()


def test_a_killed_unpack_is_never_used_and_the_rerun_completes_it(flower_tgz, tmp_path, monkeypatch):
    archive = tmp_path / "flower_photos.tgz"
    shutil.copy(flower_tgz[0], archive)
    real_extract, count = tarfile.TarFile.extract, [0]

    def dies_midway(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 8:
            raise KeyboardInterrupt  # the VM going away mid-unpack (no cleanup runs after a SIGKILL either:)
        return real_extract(self, *args, **kwargs)
    monkeypatch.setattr(tarfile.TarFile, "extract", dies_midway)
    monkeypatch.setattr(sources.shutil, "rmtree", lambda *a, **k: None)  # ... so the partial folder stays
    with pytest.raises(KeyboardInterrupt):
        local_data_dir(data_config(archive, tmp_path / "unpack"), "lines")
    left = leftovers(tmp_path / "unpack")
    assert len(left) == 1 and left[0].name.startswith(".partial-")  # never a folder that looks complete
    monkeypatch.undo()
    root = local_data_dir(data_config(archive, tmp_path / "unpack"), "lines")
    assert class_counts(root) == {"hat": PER_CLASS, "pants": PER_CLASS, "shoes": PER_CLASS}
    assert [p.name for p in (tmp_path / "unpack").iterdir()] == [root.parent.name]  # the leftover is gone


def test_a_folder_on_the_drive_mount_is_copied_once_then_kept_up_to_date(tmp_path, monkeypatch):
    drive = tmp_path / "drive"
    data = write_synthetic_dataset(drive / "MyDrive" / "pets", num_classes=2, per_class=3, size=24)
    config = data_config(data, tmp_path / "unpack", copy_prefix=drive)
    local = local_data_dir(config, "lines")
    assert not local.is_relative_to(drive) and class_counts(local) == {"class_0000": 3, "class_0001": 3}
    copies, copy2 = [], shutil.copy2
    monkeypatch.setattr(sources.shutil, "copy2", lambda src, dst: copies.append(src) or copy2(src, dst))
    assert local_data_dir(config, "lines") == local and copies == []  # unchanged: nothing read again
    (data / "class_0000" / "img_000.jpg").unlink()
    copy2(data / "class_0001" / "img_000.jpg", data / "class_0001" / "new.jpg")
    local_data_dir(config, "lines")
    assert copies == [data / "class_0001" / "new.jpg"]
    assert class_counts(local) == {"class_0000": 2, "class_0001": 4}
    assert local_data_dir(data_config(data, tmp_path / "unpack", copy_prefix=""), "lines") == data  # '' = no copy


def test_a_read_the_drive_mount_cannot_serve_exits_75_and_the_next_start_finishes_the_copy(tmp_path, monkeypatch):
    import errno
    from common.errors import EXIT_TRANSIENT, status_of
    drive = tmp_path / "drive"
    data = write_synthetic_dataset(drive / "MyDrive" / "pets", num_classes=2, per_class=3, size=24)
    config = data_config(data, tmp_path / "unpack", copy_prefix=drive)
    copy2, copied = shutil.copy2, []

    def flaky(src, dst):  # the FUSE mount answers EIO for the fourth file, as Drive's does when it times out
        if len(copied) == 3:
            raise OSError(errno.EIO, "Input/output error")
        copied.append(src)
        return copy2(src, dst)
    monkeypatch.setattr(sources.shutil, "copy2", flaky)
    with pytest.raises(Exception) as failure:
        local_data_dir(config, "lines")
    assert status_of(failure.value)[0] == EXIT_TRANSIENT
    assert str(data) in str(failure.value) and "Run the same command again" in str(failure.value)
    monkeypatch.setattr(sources.shutil, "copy2", lambda src, dst: copied.append(src) or copy2(src, dst))
    local = local_data_dir(config, "lines")
    assert class_counts(local) == {"class_0000": 3, "class_0001": 3}
    assert len(copied) == 6 and len(set(copied)) == 6  # the three copied before the failure were kept


def test_a_photo_or_class_deleted_while_the_drive_copy_runs_is_left_out_with_a_warning_not_a_crash(
        tmp_path, monkeypatch, caplog):
    drive = tmp_path / "drive"
    data = write_synthetic_dataset(drive / "MyDrive" / "pets", num_classes=3, per_class=3, size=24)
    config = data_config(data, tmp_path / "unpack", copy_prefix=drive)
    copy2 = shutil.copy2

    def deleted_meanwhile(src, dst):  # the user tidies the folder in Drive's web page during the copy
        if Path(src).name == "img_001.jpg" and Path(src).parent.name == "class_0000":
            Path(src).unlink()
        if Path(src).parent.name == "class_0002" and Path(src).parent.exists():
            shutil.rmtree(Path(src).parent)
        return copy2(src, dst)
    monkeypatch.setattr(sources.shutil, "copy2", deleted_meanwhile)
    local = local_data_dir(config, "lines")
    assert class_counts(local) == {"class_0000": 2, "class_0001": 3}
    assert "img_001.jpg went from data.dir during the copy" in caplog.text
    monkeypatch.undo()
    assert local_data_dir(config, "lines") == local  # the next start copies what is there then


@pytest.mark.parametrize("on_drive", [False, True], ids=["local-folder", "drive-folder"])
def test_a_folder_whose_only_entry_is_one_folder_of_classes_takes_it_as_the_root_like_an_archive(tmp_path, on_drive):
    drive = tmp_path / "drive"
    data = drive / "MyDrive" / "download"
    write_synthetic_dataset(data / "flower_photos", num_classes=2, per_class=3, size=24)
    (data / ".DS_Store").write_bytes(b"litter")
    root = local_data_dir(data_config(data, tmp_path / "unpack", copy_prefix=drive if on_drive else ""), "lines")
    assert root.name == "flower_photos" and class_counts(root) == {"class_0000": 3, "class_0001": 3}
    lone_class = tmp_path / "lone"
    write_synthetic_dataset(lone_class, num_classes=1, per_class=3, size=24)  # lone/class_0000/*.jpg
    assert local_data_dir(data_config(lone_class, tmp_path / "unpack"), "lines") == lone_class  # a class, not a root


class ArchiveServer:
    """A download server on 127.0.0.1 serving `files` (name → bytes, replaceable while it runs) with a strong
    ETag, Range and If-Range as RFC 9110 has them; faults on request: `cut_at` (bytes sent before the
    connection drops), `chunked` (Transfer-Encoding: chunked), `no_length` (no Content-Length),
    `ignore_if_range` (a server that serves a Range whatever If-Range says), `hold_at` (bytes sent before it
    waits for `release`). `requests` lists (Range, If-Range) of each GET."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.cut_at = self.hold_at = None
        self.chunked = self.no_length = self.ignore_if_range = False
        self.held, self.release = threading.Event(), threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *args: None  # a client that hung up mid-body is what some tests do
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    @staticmethod
    def etag(data: bytes) -> str:
        return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'

    def handle(self, request) -> None:
        data = self.files[request.path.lstrip("/")]
        asked, if_range = request.headers.get("Range", ""), request.headers.get("If-Range", "")
        self.requests.append((asked, if_range))
        start = int(asked[6:-1]) if asked else 0
        if start and if_range and if_range != self.etag(data) and not self.ignore_if_range:
            start = 0  # the file changed: RFC 9110 says send it whole, with 200
        request.send_response(206 if start else 200)
        request.send_header("ETag", self.etag(data))
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.chunked:
            request.send_header("Transfer-Encoding", "chunked")
        elif not self.no_length:
            request.send_header("Content-Length", str(len(data) - start))
        request.send_header("Connection", "close")
        request.end_headers()
        body = data[start:]
        if self.hold_at is not None:
            self.send(request, body[:self.hold_at])
            self.held.set()
            self.release.wait(60)
            body = body[self.hold_at:]
        end = len(body) if self.cut_at is None else self.cut_at
        self.send(request, body[:end])
        if end == len(body) and self.chunked:
            request.wfile.write(b"0\r\n\r\n")
        request.close_connection = True

    def send(self, request, body: bytes) -> None:
        if self.chunked and body:
            request.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
        else:
            request.wfile.write(body)
        request.wfile.flush()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def archive_server():
    server = ArchiveServer()
    yield server
    server.close()


def test_an_interrupted_download_exits_75_and_resumes_where_it_stopped(flower_tgz, archive_server, tmp_path):
    data = flower_tgz[0].read_bytes()
    archive_server.files["flowers.tgz"] = data
    archive_server.cut_at = len(data) // 2
    dest = tmp_path / "flowers.tgz"
    with pytest.raises(SourceUnavailable) as cut:
        sources.fetch(archive_server.url("flowers.tgz"), dest, "lines")
    assert status_of(cut.value)[0] == EXIT_TRANSIENT
    assert dest.with_suffix(".part").stat().st_size == len(data) // 2
    archive_server.cut_at = None
    sources.fetch(archive_server.url("flowers.tgz"), dest, "lines")
    assert archive_server.requests[1] == (f"bytes={len(data) // 2}-", ArchiveServer.etag(data))
    assert dest.read_bytes() == data and not dest.with_suffix(".part").exists()


@pytest.mark.parametrize("server_honours_if_range", [True, False], ids=["if-range", "range-only-server"])
def test_a_download_resumed_after_the_servers_file_changed_is_the_new_file_never_a_splice(
        flower_tgz, archive_server, tmp_path, server_honours_if_range):
    old = flower_tgz[0].read_bytes()
    new = write_photo_archive(tmp_path / "new.tgz", "flower_photos", PER_CLASS + 1).read_bytes()
    archive_server.files["flowers.tgz"] = old
    archive_server.cut_at = len(old) // 2
    dest = tmp_path / "flowers.tgz"
    with pytest.raises(SourceUnavailable):
        sources.fetch(archive_server.url("flowers.tgz"), dest, "lines")
    archive_server.files["flowers.tgz"] = new  # republished while the first half waited
    archive_server.cut_at, archive_server.ignore_if_range = None, not server_honours_if_range
    sources.fetch(archive_server.url("flowers.tgz"), dest, "lines")
    assert dest.read_bytes() == new
    assert archive_server.requests[1][1] == ArchiveServer.etag(old)  # If-Range sent with the Range


def test_a_server_that_answers_a_range_with_the_whole_file_is_downloaded_from_the_start(flower_tgz, archive_server,
                                                                                       tmp_path):
    data = flower_tgz[0].read_bytes()
    archive_server.files["flowers.tgz"] = data
    dest = tmp_path / "flowers.tgz"
    dest.with_suffix(".part").write_bytes(b"left by something else" * 10)  # no validator saved with it
    sources.fetch(archive_server.url("flowers.tgz"), dest, "lines")
    assert dest.read_bytes() == data and archive_server.requests == [("", "")]


def test_a_chunked_download_cut_mid_stream_exits_75_not_1(flower_tgz, archive_server, tmp_path):
    data = flower_tgz[0].read_bytes()
    archive_server.files["flowers.tgz"] = data
    archive_server.chunked, archive_server.cut_at = True, len(data) // 3
    with pytest.raises(SourceUnavailable) as cut:  # http.client.IncompleteRead underneath
        local_data_dir(data_config(archive_server.url("flowers.tgz"), tmp_path / "unpack"), "lines")
    assert status_of(cut.value)[0] == EXIT_TRANSIENT


def test_a_download_cut_without_content_length_exits_75_and_is_fetched_again(flower_tgz, archive_server, tmp_path):
    data = flower_tgz[0].read_bytes()
    archive_server.files["flowers.tgz"] = data
    archive_server.no_length, archive_server.cut_at = True, len(data) // 2
    config = data_config(archive_server.url("flowers.tgz"), tmp_path / "unpack")
    with pytest.raises(SourceUnavailable, match="did not say how long it is") as cut:
        local_data_dir(config, "lines")
    assert status_of(cut.value)[0] == EXIT_TRANSIENT  # not 2 ("damaged"): --supervise retries it
    archive_server.cut_at = None
    root = local_data_dir(config, "lines")
    assert class_counts(root) == {"hat": PER_CLASS, "pants": PER_CLASS, "shoes": PER_CLASS}


def test_a_tgz_whose_gzip_crc_is_wrong_is_refused_and_nothing_is_unpacked(flower_tgz, tmp_path):
    data = bytearray(flower_tgz[0].read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32 of the uncompressed bytes
    damaged = tmp_path / "flower_photos.tgz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged or incomplete") as error:
        local_data_dir(data_config(damaged, tmp_path / "unpack"), "lines")
    assert "CRC" in str(error.value) and status_of(error.value)[0] == EXIT_USER_ERROR
    assert not leftovers(tmp_path / "unpack")


def test_a_zip_member_whose_crc_is_wrong_is_refused(macos_zip, tmp_path):
    with zipfile.ZipFile(macos_zip[0]) as zf:
        member = next(m for m in zf.infolist() if m.filename.endswith(".jpg") and m.compress_type == 0)
        offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data = bytearray(macos_zip[0].read_bytes())
    data[offset + member.file_size // 2] ^= 0xFF  # one byte of a stored photo
    damaged = tmp_path / "clothes.zip"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="CRC") as error:
        local_data_dir(data_config(damaged, tmp_path / "unpack"), "lines")
    assert status_of(error.value)[0] == EXIT_USER_ERROR and not leftovers(tmp_path / "unpack")


def test_two_runs_unpacking_one_url_at_once_take_turns_and_download_it_once(flower_tgz, archive_server, tmp_path):
    archive_server.files["flowers.tgz"] = flower_tgz[0].read_bytes()
    archive_server.hold_at = 1000  # the first download waits half-way until the second run has started
    config = data_config(archive_server.url("flowers.tgz"), tmp_path / "unpack")
    results, errors = [], []

    def run():
        try:
            results.append(local_data_dir(config, "lines"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    assert archive_server.held.wait(60)
    threads[1].start()
    threads[1].join(1.0)  # the second waits on the first (or, without a lock, downloads beside it)
    archive_server.release.set()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert class_counts(results[0]) == {"hat": PER_CLASS, "pants": PER_CLASS, "shoes": PER_CLASS}
    assert len(archive_server.requests) == 1


def test_sigterm_during_a_download_stops_it_at_once_keeping_the_part_for_the_next_start(flower_tgz, archive_server,
                                                                                       tmp_path):
    import os
    import signal
    import time
    from runner.errors import StopRequested
    from runner.training.loop import StopFlag
    data = flower_tgz[0].read_bytes()
    archive_server.files["flowers.tgz"] = data
    archive_server.hold_at = len(data) // 2  # then the server goes quiet: the read waits on the network
    config = data_config(archive_server.url("flowers.tgz"), tmp_path / "unpack")
    stop, previous = StopFlag(), signal.getsignal(signal.SIGTERM)
    stop.install()
    def sigterm_once_bytes_arrived():
        while not any(p.stat().st_size for p in (tmp_path / "unpack").rglob("*.part")):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=sigterm_once_bytes_arrived, daemon=True).start()
    try:
        with pytest.raises(StopRequested) as stopped:
            local_data_dir(config, "lines", stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert stopped.value.signal_name == "SIGTERM" and "downloading" in stopped.value.phase
    parts = list((tmp_path / "unpack").rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(data)  # kept to resume
    assert not [p for p in (tmp_path / "unpack").iterdir() if not p.name.startswith(".")]  # nothing unpacked
    kept = parts[0].stat().st_size
    archive_server.release.set()
    archive_server.hold_at = None
    root = local_data_dir(config, "lines", StopFlag())
    assert class_counts(root) == {"hat": PER_CLASS, "pants": PER_CLASS, "shoes": PER_CLASS}
    assert archive_server.requests[-1][0] == f"bytes={kept}-"  # resumed, not downloaded again


def test_an_archive_on_the_drive_mount_is_copied_to_local_disk_once_then_unpacked(flower_tgz, tmp_path, monkeypatch):
    drive = tmp_path / "drive"
    (drive / "MyDrive").mkdir(parents=True)
    archive = shutil.copy(flower_tgz[0], drive / "MyDrive" / "flower_photos.tgz")
    opened, real_open = [], tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda name, *a, **k: opened.append(Path(name)) or real_open(name, *a, **k))
    root = local_data_dir(data_config(archive, tmp_path / "unpack", copy_prefix=drive), "lines")
    assert class_counts(root) == {"hat": PER_CLASS, "pants": PER_CLASS, "shoes": PER_CLASS}
    assert opened and not any(p.is_relative_to(drive) for p in opened)  # unpacked from the local copy
    assert [p.name for p in (tmp_path / "unpack").iterdir()] == [root.parent.name]  # the copy is gone after


@pytest.mark.slow
def test_sigterm_to_the_runner_during_a_url_download_exits_130_keeping_the_part(flower_tgz, archive_server,
                                                                               tmp_path):
    import signal
    import time
    from common.errors import EXIT_STOPPED
    from tests.helpers import local_mobilenet_args, start_resume
    data = flower_tgz[0].read_bytes()
    archive_server.files["flowers.tgz"] = data
    archive_server.hold_at = len(data) // 2  # then the server goes quiet until the test ends
    unpack = tmp_path / "unpack"
    process = start_resume(*local_mobilenet_args(tmp_path / "run", tmp_path / "cache", f"data.unpack_dir={unpack}",
                                                 data_dir=archive_server.url("flowers.tgz")))
    try:
        while not any(p.stat().st_size for p in unpack.rglob("*.part")) and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == EXIT_STOPPED, output
    parts = list(unpack.rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(data), output  # kept for the next start
    assert not [p for p in unpack.iterdir() if not p.name.startswith(".")]  # nothing unpacked
