"""A streaming ``multipart/related`` reader for STOW-RS (RFC 2046, RFC 2387).

Delimiter search across chunk edges and part-header parsing are python-multipart's
``MultipartParser``. This module adds what a STOW-RS body needs and that parser does
not do: it skips a preamble, insists on the closing delimiter (a body cut short must
not look complete), and spools each part's body into a ``SpooledTemporaryFile``, so a
part of any size costs at most ``spool_bytes`` of memory and a request of any size is
never held whole.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

MiB = 1024 * 1024
#: A part's body stays in memory up to this size, then moves to a temporary file.
SPOOL_BYTES = 8 * MiB
#: More parts than this in one request is refused (each one costs a result entry).
MAX_PARTS = 50_000
#: Part headers: STOW-RS parts carry a handful (Content-Type, -Length, -ID, -Location…).
MAX_HEADER_COUNT = 16
MAX_HEADER_BYTES = 4096
#: RFC 2046 allows 70 characters; some clients go further, so be lenient.
MAX_BOUNDARY = 200


class MultipartError(ValueError):
    """The body is not the well-formed multipart message its Content-Type announces."""


def media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """A Content-Type's media type (lower case) and parameters (names lower case, unquoted)."""
    kind, params = parse_options_header(value or "")
    return kind.decode("latin-1"), {
        k.decode("latin-1"): v.decode("latin-1") for k, v in params.items()
    }


@dataclass
class Part:
    """One complete body part. Its ``body`` is positioned at the start; ``close()`` frees it."""

    headers: dict[str, str]
    body: BinaryIO
    size: int

    @property
    def content_type(self) -> str | None:
        """The part's media type without parameters, or None when it declares none."""
        value = self.headers.get("content-type")
        return media_type(value)[0] if value else None

    def close(self) -> None:
        self.body.close()


@dataclass
class _Building:
    spool: tempfile.SpooledTemporaryFile[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    size: int = 0


class MultipartReader:
    """Feed it the body chunk by chunk; it hands back each part once its delimiter arrives.

    A part is complete only when the delimiter after it has been read, so a body cut
    off mid-part never yields that part. A parse error is raised by the next ``feed()``
    or by ``finish()``, after the parts completed before it have been handed back:
    the caller decides what to do with those.
    """

    def __init__(
        self,
        boundary: str,
        *,
        spool_bytes: int = SPOOL_BYTES,
        spool_dir: Path | None = None,
        max_parts: int = MAX_PARTS,
    ) -> None:
        if not boundary or len(boundary) > MAX_BOUNDARY or not boundary.isascii():
            raise MultipartError(
                f"the multipart boundary must be 1 to {MAX_BOUNDARY} ASCII characters"
            )
        self._spool_bytes = spool_bytes
        self._spool_dir = spool_dir
        self._max_parts = max_parts
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        # A virtual CRLF before the body lets "--boundary" at its very start match too.
        self._preamble: bytes | None = b"\r\n"
        self._received = 0
        self._parts = 0
        self._current: _Building | None = None
        self._done: list[Part] = []
        self._error: MultipartError | None = None
        self._parser = MultipartParser(
            boundary.encode("ascii"),
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_name,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
            max_header_count=MAX_HEADER_COUNT,
            max_header_size=MAX_HEADER_BYTES,
        )

    def feed(self, chunk: bytes) -> list[Part]:
        """Parse the next ``chunk``; the parts it completed (the caller must close them)."""
        if self._error is not None:
            raise self._error
        self._received += len(chunk)
        data: bytes | None = chunk
        if self._preamble is not None:
            data = self._skip_preamble(chunk)
        if data:
            try:
                self._parser.write(data)
            except MultipartError as exc:
                self._fail(exc)
            except FormParserError as exc:
                self._fail(MultipartError(f"the multipart body is malformed ({exc})"))
        done, self._done = self._done, []
        return done

    def finish(self) -> None:
        """Call at the end of the body: raises unless it ended with the closing delimiter."""
        if self._error is not None:
            raise self._error
        if self._received == 0:
            raise MultipartError("the request body is empty")
        if self._preamble is not None:
            raise MultipartError("the body contains no multipart boundary")
        if self._parser.state != MultipartState.END:
            error = MultipartError("the body ended before the closing multipart boundary")
            self._fail(error)
            raise error

    def close(self) -> None:
        """Free the part being received, if any, and parts not yet handed back."""
        if self._current is not None:
            self._current.spool.close()
            self._current = None
        for part in self._done:
            part.close()
        self._done = []

    # -- internals -----------------------------------------------------------
    def _skip_preamble(self, chunk: bytes) -> bytes | None:
        """Drop everything before the first delimiter; the body from its ``--`` on."""
        assert self._preamble is not None
        data = self._preamble + chunk
        at = data.find(self._delimiter)
        if at < 0:
            # Keep just enough to recognise a delimiter split across chunks.
            self._preamble = data[-(len(self._delimiter) - 1) :]
            return None
        self._preamble = None
        return data[at + 2 :]

    def _fail(self, error: MultipartError) -> None:
        self._error = error
        if self._current is not None:
            self._current.spool.close()
            self._current = None

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise MultipartError(
                f"more than {self._max_parts} parts in one request; send them in several"
            )
        directory = str(self._spool_dir) if self._spool_dir else None
        # Closed by whoever ends up holding it: the caller via Part.close(), or close()/_fail().
        spool = tempfile.SpooledTemporaryFile(max_size=self._spool_bytes, dir=directory)  # noqa: SIM115
        self._current = _Building(spool)

    def _header_name(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.value += data[start:end]

    def _header_end(self) -> None:
        current = self._current
        assert current is not None
        name = current.name.decode("latin-1").strip().lower()
        current.headers[name] = current.value.decode("latin-1").strip()
        current.name.clear()
        current.value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.spool.write(memoryview(data)[start:end])
        self._current.size += end - start

    def _part_end(self) -> None:
        current = self._current
        assert current is not None
        self._current = None
        current.spool.seek(0)
        # SpooledTemporaryFile reads and seeks like a binary file; typeshed types it as IO[bytes].
        body = cast(BinaryIO, current.spool)
        self._done.append(Part(current.headers, body, current.size))
