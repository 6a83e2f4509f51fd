"""What a request may carry: a body of at most 1 MiB, with its length given.

No route takes more than a small JSON object; a 50 MB body was parsed in full and
kept 150 MB in a worker. :class:`BodyLimit` refuses an announced body over
:data:`MAX_BODY_BYTES` with 413 before anything reads it, and a body of unknown
length (``Transfer-Encoding``, which would win over a ``Content-Length``) with 411,
so that no body is read beyond the limit.
"""

from __future__ import annotations

import falcon

MAX_BODY_BYTES = 1024 * 1024


class BodyLimit:
    """falcon middleware: the body limit, checked before routing and authentication."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.get_header("Transfer-Encoding"):  # it wins over a Content-Length (RFC 9112)
            raise falcon.HTTPLengthRequired(
                title="Length required",
                description="Send a body with a Content-Length header "
                f"(at most {MAX_BODY_BYTES} bytes), not in chunks.",
            )
        length = req.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise falcon.HTTPContentTooLarge(
                title="Body too large",
                description=f"The body has {length} bytes; at most {MAX_BODY_BYTES} are accepted.",
            )
