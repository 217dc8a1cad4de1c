"""Moved to surgery.io.loadable (issue 24: analyze no longer imports train); kept for callers."""

from surgery.io.loadable import check_loadable  # noqa: F401
