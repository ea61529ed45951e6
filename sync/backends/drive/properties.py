"""Drive's size limit on file properties, checked before any request (Drive answers a permanent 400)."""
from __future__ import annotations

from typing import Mapping

from sync.errors import SyncError

# "Maximum of 124 bytes size per property (including both key and value) in UTF-8 encoding"
# (https://developers.google.com/drive/api/guides/properties, "Limits of custom file properties").
PROPERTY_BYTES = 124
# What the user controls in a property's value, and so how to shorten it.
FIXES = {"run_id": "the run id is the name of the run directory (run.dir): use a shorter name, at most "
                   f"{PROPERTY_BYTES - len('run_id')} bytes"}


def check_properties(name: str, properties: Mapping[str, str]) -> None:
    """Raise SyncError naming the property and the fix when one exceeds Drive's 124 bytes of key plus value."""
    for key, value in properties.items():
        size = len(key.encode("utf-8")) + len(str(value).encode("utf-8"))
        if size > PROPERTY_BYTES:
            fix = FIXES.get(key, "a sync bug: report it with this message")
            raise SyncError(f"the Drive property {key!r} of {name} holds {size} bytes (key plus value, "
                            f"UTF-8); Drive keeps at most {PROPERTY_BYTES} bytes per property: {fix}.")
