"""Google credentials and the authorized HTTP transport for the Drive backend (tokens never logged)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google_auth_httplib2
import httplib2
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from sync.config import SyncConfig
from sync.errors import SyncError

log = logging.getLogger("sync")
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
# drive.v3.json auth.oauth2.scopes: drive.file = "See, edit, create, and delete only the specific Google Drive
# files you use with this app"; drive = "See, edit, create, and delete all of your Google Drive files".
DRIVE_FILE_SCOPE = "https://www.googleapis.com/auth/drive.file"
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"


def scope_for(folder: str) -> str:
    """The narrowest scope that reaches sync.folder: a path is created by the runner itself, so drive.file
    (files this app made) suffices; an id:FOLDER_ID was made elsewhere (a shared drive, a folder shared with
    these credentials), which only full drive can see."""
    return DRIVE_SCOPE if folder.startswith("id:") else DRIVE_FILE_SCOPE


def load_credentials(config: SyncConfig):
    """Credentials from sync.credentials (authorized-user or service-account JSON) or the application default.

    Credentials that can be scoped (google-auth's requires_scopes: service accounts, and the unscoped
    metadata-server credentials of Colab and Compute Engine) are asked for scope_for(sync.folder) only.
    Credentials whose scopes were fixed when the user signed in (authorized-user: an ADC file, or
    sync.credentials) keep their grant: an authorized-user file is refreshed with the scopes it lists (none =
    those of the grant), because asking the token endpoint for another scope fails with invalid_scope.
    """
    scope = scope_for(config.folder)
    if not config.credentials:
        try:
            creds, _ = google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
            raise SyncError("sync.backend = 'drive' but no Google credentials were found: in Colab run "
                            "`from google.colab import auth; auth.authenticate_user()` first, or set "
                            "sync.credentials to an authorized-user or service-account JSON file.") from None
        return google.auth.credentials.with_scopes_if_required(creds, [scope])
    path = Path(config.credentials).expanduser()
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SyncError(f"sync.credentials = {config.credentials!r} is not a readable JSON file; point it at an "
                        f"authorized-user or service-account JSON, or leave it empty in Colab.") from None
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            log.warning("using a service account: it has no Drive storage of its own, so uploads fail "
                        "with 'storage quota exceeded' unless sync.folder is in a shared drive.")
            return service_account.Credentials.from_service_account_info(info, scopes=[scope])
        if kind == "authorized_user":
            # from_authorized_user_file would replace the file's token_uri with Google's; keep the file's own.
            scopes = info.get("scopes")
            return user_credentials.Credentials(
                token=None, refresh_token=info["refresh_token"], client_id=info["client_id"],
                client_secret=info["client_secret"], token_uri=info.get("token_uri") or GOOGLE_TOKEN_URI,
                scopes=scopes.split() if isinstance(scopes, str) else scopes,
                quota_project_id=info.get("quota_project_id"))
    except (KeyError, ValueError) as e:
        raise SyncError(f"sync.credentials = {config.credentials!r}: the {kind} JSON lacks a field or has a bad "
                        f"value ({type(e).__name__} {e.args[0] if e.args else ''}); download it again.") from None
    raise SyncError(f"sync.credentials = {config.credentials!r} has type {kind!r}; it must be an "
                    f"'authorized_user' or 'service_account' JSON file.")


def ca_bundle(config: SyncConfig, state_dir: Path) -> str | None:
    """The CA file for TLS: the default bundle plus sync.ca_certs when it is set."""
    if not config.ca_certs:
        return None
    import httplib2.certs
    state_dir.mkdir(parents=True, exist_ok=True)
    bundle = state_dir / "ca-bundle.pem"
    default = Path(httplib2.certs.where()).read_text(encoding="utf-8")
    extra = Path(config.ca_certs).expanduser().read_text(encoding="utf-8")
    bundle.write_text(default.rstrip("\n") + "\n" + extra, encoding="utf-8")
    return str(bundle)


def authorized_http(credentials, config: SyncConfig, ca_certs: str | None) -> google_auth_httplib2.AuthorizedHttp:
    """An httplib2 transport that adds (and refreshes) the bearer token; 308 is a resumable status, not a redirect."""
    http = httplib2.Http(timeout=config.timeout_s, ca_certs=ca_certs)
    http.redirect_codes = http.redirect_codes - {308}
    return google_auth_httplib2.AuthorizedHttp(credentials, http=http)


def drive_base_url(endpoint: str) -> str | None:
    """The Drive v3 base URL for an API root such as https://host:port/ (None = Google's default)."""
    if not endpoint:
        return None
    endpoint = endpoint.rstrip("/") + "/"
    return endpoint if endpoint.endswith("drive/v3/") else endpoint + "drive/v3/"
