"""The HTTP status of each refusal: one table for ``POST /api/jobs`` and the
WebSocket ``submit_reply``, which tells the same status so that both paths
raise the same error in the client."""
from __future__ import annotations

from distexec_kernel import protocol as P

STATUS_FOR_CODE = {"too_large": 413, "rate_limited": 429, "queue_full": 429, "forbidden": 403,
                   "not_found": 404, "group_cancelled": 409, "conflict": 409}


def http_status(exc: P.ProtocolError) -> int:
    """The status a refusal gets: its own if it carries one, else its code's, else 400."""
    return getattr(exc, "status", None) or STATUS_FOR_CODE.get(exc.code, 400)
