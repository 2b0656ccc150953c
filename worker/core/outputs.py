"""Writing results: JSONL in the native form, the OpenAI batch output form or Anthropic's.

* auto (the default of `genq run` and `genq collect`): each line in the shape of the API its
  request was written for (:attr:`Item.api`): native lines native, OpenAI and Azure lines
  openai, Anthropic lines anthropic.
* native: one :meth:`ItemResult.public` object per line.
* openai: the shape of OpenAI Batch API output lines — ``{"id", "custom_id", "response",
  "error"}``, where ``response.body`` is a ``response`` for Responses requests
  (:func:`worker.core.shapes.response_body`), a ``chat.completion`` for chat items and a
  ``text_completion`` for prompt items (``chat.completion`` when the item is unknown), its
  ``model`` the base model and adapter that answered (``base:adapter``), its ``choices`` one per
  sample with logprobs in the endpoint's own shape (:mod:`worker.core.choices`).  Ids
  (``batch_req_…``, ``req_…``, ``chatcmpl-…``/``cmpl-…``) are derived from the item id, so the
  same results always give the same ids.
* anthropic: Message Batches result lines, ``{"custom_id", "result"}``
  (:func:`worker.core.shapes.anthropic_row`).

All JSON is UTF-8 with ``ensure_ascii=False``, one object per line.  :func:`write_results` writes
the whole file atomically; :func:`append_row` writes one line at a time for the embedded runner,
whose output :func:`read_done` reads back on resume (ignoring a last line cut short by a crash).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, TextIO

from worker.core.choices import openai_choices
from worker.core.errors import InputError, OutputPathError
from worker.core.schema import Item, ItemResult
from worker.core.shapes import anthropic_row, response_body
from worker.core.states import CountField, ErrorCode

__all__ = [
    "OUTPUT_FORMATS",
    "OutputFormat",
    "append_row",
    "check_output_path",
    "dumps_row",
    "iter_rows",
    "read_done",
    "result_row",
    "row_count_field",
    "row_format",
    "trim_partial_line",
    "write_results",
    "write_split",
]

OutputFormat = Literal["auto", "native", "openai", "anthropic"]
OUTPUT_FORMATS: tuple[str, ...] = ("auto", "native", "openai", "anthropic")


def row_format(item: Item | None, fmt: OutputFormat) -> OutputFormat:
    """The shape of ``item``'s row: ``fmt``, or for ``auto`` the one of the item's own API."""
    if fmt != "auto":
        return fmt
    api = item.api if item is not None else None
    if api is None:
        return "native"
    return "anthropic" if api == "anthropic" else "openai"


def result_row(
    result: ItemResult,
    item: Item | None,
    fmt: OutputFormat,
    *,
    model: str,
    created: int | None = None,
) -> dict[str, Any]:
    """One output line as a dict.  ``created`` (Unix seconds) defaults to now (openai only)."""
    shape = row_format(item, fmt)
    if shape == "native":
        return result.public()
    if shape == "openai":
        return _openai_row(
            result, item, model=model, created=int(time.time()) if created is None else created
        )
    if shape == "anthropic":
        return anthropic_row(result, _stable_hex(result.id), model=model)
    raise ValueError(f"unknown output format {fmt!r} (expected one of {', '.join(OUTPUT_FORMATS)})")


def row_count_field(row: dict[str, Any]) -> CountField:
    """The counter an output row stands for (the inverse of :func:`result_row`): native rows
    carry ``status``, OpenAI rows an ``error`` (null when the request succeeded), Anthropic rows
    a ``result.type``."""
    result = row.get("result")
    if isinstance(result, dict) and "custom_id" in row:
        return ANTHROPIC_COUNTS.get(result.get("type"), CountField.ERRORED)
    ok = row["status"] == "ok" if "status" in row else row.get("error") is None
    if ok:
        return CountField.SUCCEEDED
    error = row.get("error") or {}
    code = error.get("type", error.get("code")) if isinstance(error, dict) else None
    if code == ErrorCode.CANCELLED:
        return CountField.CANCELLED
    if code == ErrorCode.EXPIRED:
        return CountField.EXPIRED
    return CountField.ERRORED


ANTHROPIC_COUNTS: dict[object, CountField] = {
    "succeeded": CountField.SUCCEEDED,
    "canceled": CountField.CANCELLED,
    "expired": CountField.EXPIRED,
}


@contextlib.contextmanager
def replaced_together(targets: Sequence[str | os.PathLike[str]]) -> Iterator[Sequence[TextIO]]:
    """A temporary file beside each of ``targets`` (``<target>.tmp``), open for writing; when the
    block ends they are flushed, fsynced and moved over their targets, all of them only once all
    are complete.  On an error the temporary files are removed and the targets left as they were."""
    tmps = [os.fspath(t) + ".tmp" for t in targets]
    try:
        with contextlib.ExitStack() as stack:
            fhs = [stack.enter_context(open(t, "w", encoding="utf-8", newline="\n")) for t in tmps]
            yield fhs
            for fh in fhs:
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, target in zip(tmps, targets, strict=True):
            os.replace(tmp, target)
    except BaseException:
        for tmp in tmps:
            _remove_quietly(tmp)
        raise


def write_results(
    pairs: Iterable[tuple[ItemResult, Item | None]],
    path: str | os.PathLike[str],
    fmt: OutputFormat = "native",
    *,
    model: str,
) -> int:
    """Write all rows to ``path`` atomically (``path.tmp``, fsync, rename); return rows written.

    An existing file is replaced only once the new one is complete; on error the temporary file
    is removed and the old file is left as it was.
    """
    created = int(time.time())
    count = 0
    with replaced_together([path]) as (fh,):
        for result, item in pairs:
            fh.write(dumps_row(result_row(result, item, fmt, model=model, created=created)))
            count += 1
    return count


def write_split(
    pairs: Iterable[tuple[ItemResult, Item | None]],
    path: str | os.PathLike[str],
    errors: str | os.PathLike[str],
    fmt: OutputFormat = "native",
    *,
    model: str,
) -> tuple[int, int]:
    """Like :func:`write_results`, with errored items in ``errors`` instead (OpenAI's output and
    error files); returns (rows in ``path``, rows in ``errors``).  Both files are replaced only
    once both are complete."""
    created = int(time.time())
    counts = [0, 0]
    with replaced_together([path, errors]) as files:
        for result, item in pairs:
            which = 0 if result.ok else 1
            files[which].write(dumps_row(result_row(result, item, fmt, model=model, created=created)))
            counts[which] += 1
    return counts[0], counts[1]


def append_row(fh: IO[str], row: dict[str, Any]) -> None:
    """Append one JSON line in a single write and flush it (the file is a text, UTF-8 handle)."""
    fh.write(dumps_row(row))
    fh.flush()


def read_done(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Rows of an existing output file by item id (``custom_id`` for openai rows, else ``id``).

    A missing file gives ``{}``.  A last line that is cut short or garbled (a crash mid-write) is
    ignored; a bad line anywhere else raises :class:`InputError` naming it.  When an id appears
    twice the first row wins, as in the job store.  (:func:`iter_rows` reads them one at a time.)
    """
    done: dict[str, dict[str, Any]] = {}
    for row_id, row, _raw in iter_rows(path):
        done.setdefault(row_id, row)
    return done


def iter_rows(path: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """``(id, row, line)`` for each row of an output file, in file order, one at a time (the
    rules of :func:`read_done`; ``line`` is the row's bytes as written, newline included)."""
    source = os.fspath(path)
    bad: InputError | None = None
    try:
        fh = open(source, "rb")  # noqa: SIM115 - a missing file is no rows; closed below
    except FileNotFoundError:
        return
    with fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            if bad is not None:  # the bad line was not the last one
                raise bad
            try:
                row_id, row = _parse_row(raw)
            except ValueError as exc:
                bad = InputError(f"not a result row: {exc}", line=n, source=source)
                continue
            yield row_id, row, raw


def trim_partial_line(path: str | os.PathLike[str]) -> int:
    """Cut bytes after the last newline (a row cut short by a crash); return how many were cut.

    Call before appending to a file that :func:`read_done` read, so that a new row does not get
    glued onto the remains of an unfinished one.  A missing file is left alone (0).
    """
    try:
        with open(path, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - 65536)
                fh.seek(start)
                newline = fh.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end < size:
                fh.truncate(end)
            return size - end
    except FileNotFoundError:
        return 0


def check_output_path(path: str | os.PathLike[str], *, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before any work is done, an output path that cannot be written: a directory, a
    folder that does not exist, one this process may not write in, or one of the ``inputs``."""
    target = Path(path)
    shown = os.fspath(path)
    if target.is_dir():
        raise OutputPathError(f"cannot write results to {shown}: it is a directory")
    for source in inputs:
        same = target.resolve() == Path(source).resolve()
        with contextlib.suppress(OSError):  # a hard link or another path to the same file
            same = same or (target.exists() and target.samefile(source))
        if same:
            raise OutputPathError(f"cannot write results to {shown}: it is the input file; choose another -o")
    folder = target.parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write results to {shown}: the folder {folder} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"cannot write results to {shown}: permission denied")
    probe = folder / f".{target.name}.genq-probe-{os.getpid()}"
    try:
        probe.touch()
    except OSError as exc:
        raise OutputPathError(f"cannot write results to {shown}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# --- helpers -------------------------------------------------------------------------------


def dumps_row(row: dict[str, Any]) -> str:
    """One JSONL line: UTF-8 text, compact, newline-terminated."""
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def _parse_row(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The id and the row of one output line; ``ValueError`` when it is not one."""
    row = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    row_id = row.get("custom_id", row.get("id"))
    if not isinstance(row_id, str):
        raise ValueError("no string 'id' or 'custom_id'")
    return row_id, row


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _stable_hex(item_id: str, length: int = 24) -> str:
    return hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:length]


def _openai_row(result: ItemResult, item: Item | None, *, model: str, created: int) -> dict[str, Any]:
    digest = _stable_hex(result.id)
    row: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": result.id}
    if result.status == "error":
        error = result.error
        code = error.type if error else "error"
        message = error.message if error else "the item failed"
        row.update(response=None, error={"code": code, "message": message})
        return row
    if item is not None and item.api == "responses":
        body = response_body(result, item, digest, model=model, created=created)
    else:
        body = _openai_body(result, item, digest, model=model, created=created)
    row.update(response={"status_code": 200, "request_id": f"req_{digest}", "body": body}, error=None)
    return row


def _openai_body(
    result: ItemResult, item: Item | None, digest: str, *, model: str, created: int
) -> dict[str, Any]:
    chat = item is None or item.messages is not None
    usage = result.usage
    return {
        "id": f"chatcmpl-{digest}" if chat else f"cmpl-{digest}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": result.model or model,
        "choices": openai_choices(result, chat=chat),
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }
