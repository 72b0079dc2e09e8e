"""The admin API call the end-to-end scripts share (stdlib only)."""

import json
import urllib.request


def admin(base, token, method, path, body=None):
    """Calls Realm's admin API and returns the decoded JSON response."""
    req = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)
