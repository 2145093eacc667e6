"""The multipart upload, parsed while it streams in: the audio part goes straight to a file on disk, the other
fields (small) to memory, and the body's bytes are counted as they arrive, so an upload over the limit is refused
(413) as soon as the limit is passed: the whole body is never read, nor held in memory.

A ``Content-Length`` over the limit is refused before a byte of the body is read.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .protocol import APIError, invalid

FILE_FIELD = "file"
MAX_FIELDS = 64  # form fields besides the file
MAX_FIELD_BYTES = 66 * 1024  # one field's value (a prompt is refused above 64 KiB anyway)
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}$")


def too_large(limit: int) -> APIError:
    """413, answered with ``Connection: close``: the server stops reading the body (uvicorn would otherwise read
    the rest of it, discarding it, to keep the connection)."""
    error = APIError(
        413,
        f"the upload is over this server's {limit / 2**20:g} MB limit (--max-upload-mb); send a shorter or more "
        "compressed file",
        param=FILE_FIELD,
        code="file_too_large",
    )
    error.close_connection = True
    return error


@dataclass
class Upload:
    """The form: text fields by name, and the file part on disk (``path`` None: no file part was sent)."""

    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    filename: str | None = None
    size: int = 0  # bytes of the file part
    _dir: str | None = None

    def close(self) -> None:
        """Remove the file (its folder is this upload's own)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _Parts:
    """python-multipart's callbacks: one part at a time, the file part written through, fields kept."""

    def __init__(self, upload: Upload, tmp_dir: str | None):
        self.upload, self.tmp_dir = upload, tmp_dir
        self.header_name, self.header_value = b"", b""
        self.disposition = b""
        self.name: str | None = None
        self.value = bytearray()
        self.sink: BinaryIO | None = None  # the open file of the file part
        self.skip = False  # a second file part (or a file under another name): counted, not kept
        self.fields = 0
        self.ended = False  # the closing boundary came

    def on_part_begin(self) -> None:
        self.disposition, self.name, self.value, self.sink, self.skip = b"", None, bytearray(), None, False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise invalid("a multipart part has no name in its Content-Disposition header", code="invalid_multipart")
        self.name = options[b"name"].decode("utf-8", errors="replace")
        filename = options.get(b"filename")
        if self.name == FILE_FIELD:
            if self.upload.path is not None:
                raise invalid("send one 'file' part, not several", FILE_FIELD)
            self.upload._dir = self.upload._dir or tempfile.mkdtemp(prefix="canary-openai-", dir=self.tmp_dir)
            name = filename.decode("utf-8", errors="replace") if filename else "upload"
            suffix = m.group(0) if (m := _SUFFIX.search(name)) else ""
            self.upload.filename = os.path.basename(name) or "upload"
            self.upload.path = Path(self.upload._dir) / f"audio{suffix}"
            self.sink = open(self.upload.path, "wb")  # closed at the part's end, or by read_upload
        elif filename is not None:
            self.skip = True
        else:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise invalid(f"the form has more than {MAX_FIELDS} fields", code="invalid_multipart")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is not None:
            self.sink.write(data[start:end])
            self.upload.size += end - start
        elif not self.skip:
            if len(self.value) + end - start > MAX_FIELD_BYTES:
                raise invalid(f"form field '{self.name}' is over {MAX_FIELD_BYTES // 1024} KiB", self.name)
            self.value.extend(data[start:end])

    def on_part_end(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        elif not self.skip and self.name is not None:
            self.upload.fields[self.name] = self.value.decode("utf-8", errors="replace")

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None


async def read_upload(
    headers: Mapping[str, str], body: AsyncIterator[bytes], *, max_bytes: int, tmp_dir: str | None = None
) -> Upload:
    """Parse a ``multipart/form-data`` body as it arrives. ``headers``: the request's (lower-case names).
    Raises :class:`APIError`: 413 past ``max_bytes`` of body, 400 for a body that is not a multipart form."""
    length = headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes)
    content_type, options = parse_options_header(headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise invalid(
            "send the audio as a multipart/form-data upload (curl -F file=@audio.wav -F model=...)", code="invalid_body"
        )
    upload = Upload()
    parts = _Parts(upload, tmp_dir)
    callbacks = {name: getattr(parts, name) for name in dir(parts) if name.startswith("on_")}
    parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
        if not parts.ended:
            raise invalid("the multipart body ends before its closing boundary", code="invalid_multipart")
    except FormParserError as e:
        parts.close()
        upload.close()
        raise invalid(f"the multipart body is malformed ({e})", code="invalid_multipart") from None
    except BaseException:
        parts.close()
        upload.close()
        raise
    return upload
