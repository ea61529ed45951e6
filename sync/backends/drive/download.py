"""Downloads from Drive: ranged chunks appended to a partial file (resumed after a kill), md5-checked."""
from __future__ import annotations

from pathlib import Path

from googleapiclient.errors import HttpError

from sync.backends.drive.client import ALL_DRIVES, DriveClient
from sync.errors import IntegrityError
from sync.snapshot import file_digest
from common.files import replace_atomic


def download(client: DriveClient, found: dict, name: str, dest: Path, chunk: int) -> None:
    """Download the file resource found in ranged chunks (resuming a partial file) and check its md5 before
    renaming it to dest."""
    size, md5 = int(found.get("size", 0)), found.get("md5Checksum", "")
    part = dest.with_name(f"{dest.name}.{md5[:12]}.partial")
    uri = client.files.get_media(fileId=found["id"], **ALL_DRIVES).uri
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    with open(part, "ab") as out:
        while have < size:
            end = min(have + chunk, size) - 1
            data = client.call(lambda: _range(client, uri, have, end), f"downloading {name}")
            out.write(data)
            out.flush()
            have += len(data)
    if md5 and file_digest(part, "md5") != md5:
        part.unlink()
        raise IntegrityError(f"{name} downloaded with the wrong md5; it was not used.")
    replace_atomic(part, dest)


def _range(client: DriveClient, uri: str, start: int, end: int) -> bytes:
    """Bytes [start, end] of a media URI (one HTTP request; errors are raised for the retry policy)."""
    resp, content = client.http.request(uri, "GET", headers={"Range": f"bytes={start}-{end}"})
    if resp.status == 206:
        return content
    if resp.status == 200:
        return content[start:end + 1]
    raise HttpError(resp, content, uri=uri)
