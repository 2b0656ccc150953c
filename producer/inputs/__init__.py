"""Reading job inputs: JSONL in the native format or a hosted API's batch format (OpenAI chat and
completions, Azure OpenAI, OpenAI Responses, Anthropic Message Batches), with line-numbered errors.

Two entry points share one validator (:mod:`.reader`):

* :func:`stream_items` streams a file in binary, line by line, and yields items one at a time
  (memory stays flat: about 12 bytes an item, for duplicate ids), and
* :func:`stream_records` takes dicts from the Python API; there "line" is the 1-based
  position of the record.

:func:`read_items` and :func:`items_from_records` are the same, read into a list.  The formats
live in :mod:`.native`, :mod:`.openai` (and Azure), :mod:`.responses` and :mod:`.anthropic`, the
rules for a hosted API's request body in :mod:`.bodies`, the checks they share in :mod:`.checks`, line reading
in :mod:`.lines` and the wording of problems in :mod:`.words`.

A submit validates the whole input before it publishes anything.  Without ``skip_invalid`` the first bad
line raises :class:`~worker.core.errors.InputError` naming the source, the line and the field, so a
caller can guarantee that nothing is enqueued.  With ``skip_invalid`` each bad line becomes an
:class:`~worker.core.schema.Item` whose ``invalid`` is set (recorded as errored, never generated) and
its error is listed in :attr:`ReadResult.invalid`.

Decisions worth knowing:

* The format (one per file) is decided by the first line that holds a JSON object; a later line
  that is clearly of another format is an error.  A line with ``params`` is Anthropic's; one with
  any of ``custom_id``, ``method``, ``url`` or ``body`` is the Responses API's when ``url`` is
  ``/v1/responses``, Azure's when it is ``/chat/completions`` or ``/completions``, else OpenAI's;
  one with ``prompt`` or ``messages`` is native.
* Blank (whitespace-only) lines are skipped; they still count for line numbers, not for indices.
* One UTF-8 byte-order mark at the very start of the file is stripped; anywhere else it is
  invalid JSON.  ``NaN``/``Infinity``, duplicate keys in one object and unpaired surrogate escapes
  (``"\\ud800"``, which cannot be written back as UTF-8) are refused.
* ``null`` for an optional field means "not set".
* Every item id is unique.  An invalid line keeps its own id when it is readable and unused;
  otherwise it gets ``line-<n>`` (made unique if a real id already took that name).
* Message content may be a list of text parts (joined with newlines) in every format; image,
  audio and file parts are refused.  Hosted-API messages may use the ``developer`` role (read
  as ``system``).
"""

from producer.inputs.checks import InputLimits
from producer.inputs.reader import (
    FILE_OUTPUT,
    InputFormat,
    ItemStream,
    ReadResult,
    items_from_records,
    read_items,
    stream_items,
    stream_records,
)
from producer.inputs.words import translate

__all__ = [
    "FILE_OUTPUT",
    "InputFormat",
    "InputLimits",
    "ItemStream",
    "ReadResult",
    "items_from_records",
    "read_items",
    "stream_items",
    "stream_records",
    "translate",
]
