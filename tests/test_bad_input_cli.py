"""Bad input through the real ``genq submit`` CLI against a real Redis.

Every kind of bad line or file must give exit status 2, one ``genq: error:`` line on stderr that
names the file, the line and the field (where one applies), no traceback, and leave Redis without
any list (no task message) and without any ``genq:`` key (no job).  ``--skip-invalid`` instead
records such lines as errored ``invalid_input`` items of the job.

Most cases run in-process through click's ``CliRunner`` against one Redis server for the whole
module (flushed before each test); the issue's done-when case runs ``python -m producer.cli`` in a
real subprocess.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from producer.cli import cli
from producer.inputs import InputLimits
from tests.helpers import RedisServer, genq
from worker.core.profiles import load_profile
from worker.core.settings import reset_settings
from worker.store import blocks

PROFILE = "tiny-random"
QUEUE = f"genq.{PROFILE}.any"
MAX_LINE = InputLimits().max_line_bytes
CHAT_URL = "/v1/chat/completions"
BOM = b"\xef\xbb\xbf"


def _profile_limit() -> int:
    reset_settings()
    try:
        return load_profile(PROFILE).limits.max_new_tokens
    finally:
        reset_settings()


LIMIT = _profile_limit()


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module (no append-only file: nothing here restarts it)."""
    srv = RedisServer(tmp_path_factory.mktemp("bad-input-redis"), appendonly=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def r(server: RedisServer) -> Iterator[redis.Redis]:
    """A client on the module's Redis, emptied before the test."""
    client = server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


def invoke(server: RedisServer, *args: str) -> Result:
    """``genq ARGS`` in this process, with GENQ_BROKER_URL pointing at ``server``."""
    reset_settings()  # the settings are read once per process: make them see this broker
    try:
        return CliRunner().invoke(cli, list(args), env={"GENQ_BROKER_URL": server.url})
    finally:
        reset_settings()


def submit(server: RedisServer, path: Path, *extra: str) -> Result:
    return invoke(server, "submit", str(path), "--profile", PROFILE, *extra)


def write(tmp_path: Path, content: str | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def good(n: int) -> str:
    return json.dumps({"id": f"g{n}", "prompt": f"good prompt {n}"})


def oa_good(n: int) -> str:
    return json.dumps(
        {
            "custom_id": f"r{n}",
            "method": "POST",
            "url": CHAT_URL,
            "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {n}"}]},
        }
    )


def oa(**fields: Any) -> str:
    """An OpenAI batch line: a valid chat request, with ``fields`` replaced (None removes one)."""
    line: dict[str, Any] = {
        "custom_id": "bad",
        "method": "POST",
        "url": CHAT_URL,
        "body": {"messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(fields)
    return json.dumps({k: v for k, v in line.items() if v is not None})


def file_with(bad: str | bytes, *, at: int, total: int = 5, openai: bool = False) -> bytes:
    """``total`` lines, all good except line ``at`` (1-based), which is ``bad``."""
    make = oa_good if openai else good
    rows = [
        (bad if isinstance(bad, bytes) else bad.encode("utf-8")) if n == at else make(n).encode("utf-8")
        for n in range(1, total + 1)
    ]
    return b"\n".join(rows) + b"\n"


def list_keys(client: redis.Redis) -> list[str]:
    return sorted(k for k in client.scan_iter(count=1000) if client.type(k) == "list")


def assert_one_chunk_waiting(client: redis.Redis) -> None:
    """The job's one chunk waits in its backlog, the job in its level's ring of ``any`` jobs (no
    worker has dispatched it to a mode's queue yet): nothing else is in any Redis list."""
    lists = list_keys(client)
    backlogs = [k for k in lists if k.endswith(":backlog")]
    assert len(backlogs) == 1 and client.llen(backlogs[0]) == 1, lists
    assert set(lists) - set(backlogs) == {f"genq:ring:{QUEUE}"}, lists


def genq_keys(client: redis.Redis) -> list[str]:
    return sorted(client.scan_iter(match="genq:*", count=1000))


def assert_nothing_enqueued(client: redis.Redis) -> None:
    assert list_keys(client) == [], "a refused submit left a message in a Redis list"
    assert genq_keys(client) == [], "a refused submit left genq: keys (a job record) behind"


def error_line(result: Result) -> str:
    """The one error line of a refused submit; fails unless the refusal is clean."""
    assert result.exit_code == 2, f"exit {result.exit_code}, output: {result.output!r}"
    assert isinstance(result.exception, SystemExit), f"unexpected exception {result.exception!r}"
    assert "Traceback" not in result.output
    assert result.stdout == "", f"a refused submit printed a job id: {result.stdout!r}"
    # the job id is announced before anything is written; then one error line
    lines = [line for line in result.stderr.splitlines() if not line.startswith("job ")]
    assert len(lines) == 1, f"expected one message, got {lines!r}"
    assert lines[0].startswith("genq: error: "), lines[0]
    return lines[0]


def assert_refused(
    result: Result,
    client: redis.Redis,
    *,
    source: Path | None,
    line: int | None,
    field: str | None,
    words: Sequence[str],
) -> str:
    """A refused submit: one clear message with the file, line and field; nothing in Redis."""
    message = error_line(result)
    where = [str(source)] if source is not None else []
    if line is not None:
        where.append(f"line {line}")
    if field is not None:
        where.append(f"field '{field}'")
    if where:
        assert message.startswith("genq: error: " + ", ".join(where) + ": "), message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    assert "Input should" not in message and "pydantic" not in message, message
    assert_nothing_enqueued(client)
    return message


# --- one bad line, each kind a test --------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    bad: str | bytes
    at: int
    field: str | None
    words: tuple[str, ...]
    openai: bool = False


NATIVE_CASES: dict[str, Bad] = {
    "invalid_json": Bad('{"prompt": "x"', 3, None, ("invalid JSON", "column")),
    "trailing_garbage": Bad('{"prompt": "x"} extra', 2, None, ("invalid JSON",)),
    "not_an_object_array": Bad('["prompt", "x"]', 3, None, ("must be a JSON object, not an array",)),
    "not_an_object_string": Bad('"just a prompt"', 4, None, ("must be a JSON object, not the string",)),
    "not_an_object_null": Bad("null", 1, None, ("must be a JSON object, not null",)),
    "neither_prompt_nor_messages": Bad(
        '{"id": "n", "max_new_tokens": 5}', 3, None, ("exactly one of 'prompt' and 'messages'", "neither")
    ),
    "both_prompt_and_messages": Bad(
        json.dumps({"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}),
        3,
        None,
        ("exactly one of 'prompt' and 'messages'", "both"),
    ),
    "empty_prompt": Bad('{"prompt": ""}', 3, "prompt", ("must not be empty",)),
    "whitespace_prompt": Bad('{"prompt": " \\t\\n "}', 2, "prompt", ("must not be empty",)),
    "prompt_not_string": Bad('{"prompt": 42}', 3, "prompt", ("must be a string, not the number 42",)),
    "messages_not_list": Bad('{"messages": "hi"}', 3, "messages", ("must be a list of messages",)),
    "id_not_string": Bad('{"id": 7, "prompt": "x"}', 3, "id", ("must be a string, not the number 7",)),
    "message_bad_role": Bad(
        '{"messages": [{"role": "robot", "content": "hi"}]}', 3, "messages[0].role", ("must be one of",)
    ),
    "message_without_user": Bad(
        '{"messages": [{"role": "system", "content": "be brief"}]}',
        3,
        "messages",
        ("at least one message with role 'user'",),
    ),
    "message_content_not_string": Bad(
        '{"messages": [{"role": "user", "content": 5}]}', 3, "messages[0].content", ("must be a string",)
    ),
    "duplicate_id": Bad('{"id": "g1", "prompt": "again"}', 4, "id", ('duplicate id "g1"', "line 1")),
    "duplicate_key": Bad('{"prompt": "a", "prompt": "b"}', 3, "prompt", ("appears twice",)),
    "non_utf8_bytes": Bad(b'{"prompt": "caf\xe9"}', 3, None, ("not valid UTF-8", "0xe9")),
    "bom_not_at_start": Bad(BOM + b'{"prompt": "x"}', 3, None, ("invalid JSON",)),
    "nan_number": Bad('{"prompt": "x", "temperature": NaN}', 3, None, ("NaN is not a valid JSON number",)),
    "over_long_line": Bad(
        json.dumps({"prompt": "a" * MAX_LINE}), 3, None, (f"longer than {MAX_LINE} bytes",)
    ),
    "unknown_field_typo": Bad(
        '{"prompt": "x", "max_tokens": 5}',
        3,
        "max_tokens",
        ("unknown field", "did you mean 'max_new_tokens'"),
    ),
    "max_new_tokens_zero": Bad(
        '{"prompt": "x", "max_new_tokens": 0}', 3, "max_new_tokens", ("greater than 0",)
    ),
    "max_new_tokens_negative": Bad(
        '{"prompt": "x", "max_new_tokens": -5}', 3, "max_new_tokens", ("greater than 0", "-5")
    ),
    "max_new_tokens_above_limit": Bad(
        json.dumps({"prompt": "x", "max_new_tokens": LIMIT + 1}),
        3,
        "max_new_tokens",
        (f"at most {LIMIT} (the profile's limit)", f"got {LIMIT + 1}"),
    ),
    "max_new_tokens_not_integer": Bad(
        '{"prompt": "x", "max_new_tokens": "12"}', 3, "max_new_tokens", ("must be an integer",)
    ),
    "temperature_negative": Bad(
        '{"prompt": "x", "temperature": -0.5}', 3, "temperature", ("greater than or equal to 0",)
    ),
    "temperature_not_number": Bad('{"prompt": "x", "temperature": "hot"}', 3, "temperature", ("number",)),
    "top_p_zero": Bad('{"prompt": "x", "top_p": 0}', 3, "top_p", ("greater than 0",)),
    "top_p_above_one": Bad('{"prompt": "x", "top_p": 1.5}', 3, "top_p", ("less than or equal to 1",)),
    "seed_float": Bad('{"prompt": "x", "seed": 1.5}', 3, "seed", ("must be an integer", "1.5")),
    "seed_string": Bad('{"prompt": "x", "seed": "42"}', 3, "seed", ("must be an integer",)),
    "stop_number": Bad('{"prompt": "x", "stop": 42}', 3, "stop", ("must be a string or a list of strings",)),
    "stop_object": Bad('{"prompt": "x", "stop": {"a": 1}}', 3, "stop", ("must be a string or a list",)),
    "stop_list_of_numbers": Bad('{"prompt": "x", "stop": ["ok", 1]}', 3, "stop[1]", ("must be a string",)),
    "mixed_formats": Bad(oa(custom_id="x"), 3, None, ("do not mix formats", "decided by line 1")),
}

OPENAI_CASES: dict[str, Bad] = {
    "openai_without_custom_id": Bad(oa(custom_id=None), 3, "custom_id", ("is required",), openai=True),
    "openai_without_body": Bad(oa(body=None), 3, "body", ("it is missing",), openai=True),
    "openai_body_not_object": Bad(oa(body="hi"), 3, "body", ("must be an object",), openai=True),
    "openai_unsupported_url": Bad(
        oa(url="/v1/embeddings"), 3, "url", (CHAT_URL, '"/v1/embeddings"'), openai=True
    ),
    "openai_without_url": Bad(oa(url=None), 3, "url", ("it is missing",), openai=True),
    "openai_method_not_post": Bad(oa(method="GET"), 3, "method", ('must be "POST"',), openai=True),
    "openai_duplicate_custom_id": Bad(
        oa(custom_id="r2"), 4, "custom_id", ('duplicate id "r2"', "line 2"), openai=True
    ),
    "openai_unsupported_body_field": Bad(
        oa(body={"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
        3,
        "body.tools",
        ("not supported",),
        openai=True,
    ),
    "openai_max_tokens_above_limit": Bad(
        oa(body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": LIMIT + 1}),
        3,
        "body.max_tokens",
        (f"at most {LIMIT}",),
        openai=True,
    ),
    "openai_n_above_profile_limit": Bad(
        oa(body={"messages": [{"role": "user", "content": "hi"}], "n": 9}),
        3,
        "body.n",
        ("at most 8",),
        openai=True,
    ),
    "openai_prompt_on_chat_url": Bad(
        oa(body={"prompt": "hi"}),
        3,
        "body.prompt",
        ("is not part of a /v1/chat/completions request",),
        openai=True,
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in {**NATIVE_CASES, **OPENAI_CASES}.items()])
def test_bad_line_is_refused(case: Bad, server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    path = write(tmp_path, file_with(case.bad, at=case.at, openai=case.openai))
    result = submit(server, path)
    assert_refused(result, r, source=path, line=case.at, field=case.field, words=case.words)


def test_only_the_first_bad_line_is_reported(server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    """Two bad lines: the message is about the first one only (one message, not a list)."""
    content = "\n".join([good(1), '{"prompt": ""}', good(3), '{"prompt": 5}']) + "\n"
    path = write(tmp_path, content)
    message = assert_refused(
        submit(server, path), r, source=path, line=2, field="prompt", words=("must not be empty",)
    )
    assert "line 4" not in message


# --- bad files and bad options -------------------------------------------------------------


@dataclass(frozen=True)
class BadFile:
    content: str | bytes | None
    """None: no file at all; "<dir>": a directory."""
    args: tuple[str, ...]
    field: str | None
    words: tuple[str, ...]
    names_file: bool = True


GOOD_FILE = "\n".join(good(n) for n in range(1, 4)) + "\n"

FILE_CASES: dict[str, BadFile] = {
    "empty_file": BadFile("", (), None, ("no items",)),
    "only_blank_lines": BadFile("\n  \n\t\r\n\n", (), None, ("no items",)),
    "missing_file": BadFile(None, (), None, ("file not found",)),
    "directory": BadFile("<dir>", (), None, ("is a directory",)),
    "unknown_profile": BadFile(
        GOOD_FILE,
        ("--profile", "no-such-profile"),
        None,
        ("unknown profile 'no-such-profile'", PROFILE),
        False,
    ),
    "missing_profile_file": BadFile(
        GOOD_FILE,
        ("--profile", "/nonexistent/p.yaml"),
        None,
        ("/nonexistent/p.yaml", "does not exist"),
        False,
    ),
    "unknown_mode": BadFile(
        GOOD_FILE, ("--mode", "gpu"), "mode", ("unknown mode 'gpu'", "any, nf4 or fp32"), False
    ),
    "chunk_size_zero": BadFile(GOOD_FILE, ("--chunk-size", "0"), "chunk_size", ("at least 1",), False),
    "option_max_new_tokens_zero": BadFile(
        GOOD_FILE, ("--max-new-tokens", "0"), "max_new_tokens", ("--max-new-tokens", "greater than 0"), False
    ),
    "option_max_new_tokens_above_limit": BadFile(
        GOOD_FILE,
        ("--max-new-tokens", str(LIMIT + 1)),
        "max_new_tokens",
        (f"above the profile's limit of {LIMIT}",),
        False,
    ),
    "option_temperature_negative": BadFile(
        GOOD_FILE,
        ("--temperature", "-1"),
        "temperature",
        ("--temperature", "greater than or equal to 0"),
        False,
    ),
    "option_top_p_above_one": BadFile(
        GOOD_FILE, ("--top-p", "1.5"), "top_p", ("--top-p", "less than or equal to 1"), False
    ),
}


def _file_case_path(case: BadFile, tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    if case.content == "<dir>":
        path.mkdir()
    elif case.content is not None:
        write(tmp_path, case.content)
    return path


def _file_case_message(result: Result, client: redis.Redis, case: BadFile, path: Path) -> str:
    message = error_line(result)
    for w in case.words:
        assert w in message, f"{w!r} not in {message!r}"
    if case.names_file:
        assert message.startswith(f"genq: error: {path}: "), message
    if case.field is not None:
        assert f"field '{case.field}'" in message, message
    assert "line " not in message, f"a file-level error names a line: {message!r}"
    assert_nothing_enqueued(client)
    return message


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in FILE_CASES.items()])
def test_bad_file_or_option_is_refused(
    case: BadFile, server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    path = _file_case_path(case, tmp_path)
    _file_case_message(submit(server, path, *case.args), r, case, path)


@pytest.mark.parametrize(
    "name", ["empty_file", "missing_file", "directory", "unknown_profile", "unknown_mode"]
)
def test_skip_invalid_does_not_excuse_a_bad_file(
    name: str, server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    """--skip-invalid is about lines: a file or option that is wrong is still refused."""
    case = FILE_CASES[name]
    path = _file_case_path(case, tmp_path)
    _file_case_message(submit(server, path, "--skip-invalid", *case.args), r, case, path)


# --- what is accepted ----------------------------------------------------------------------


def stored_items(client: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    raw = client.execute_command("HGETALL", f"genq:job:{job_id}:inputs", NEVER_DECODE=True)
    found = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else raw
    lines = [line for n in range(len(found)) for _, line in blocks.unpack(n, found[f"b{n}".encode()])]
    return [json.loads(line) for line in lines]


def job_state(server: RedisServer, job_id: str) -> dict[str, Any]:
    result = invoke(server, "status", job_id, "--json")
    assert result.exit_code == 0, result.output
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def submitted_id(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output!r} {result.exception!r}"
    assert "Traceback" not in result.output
    return result.stdout.strip().splitlines()[-1]


def test_bom_at_start_and_blank_lines_are_accepted(
    server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    """A BOM before line 1 is stripped; blank and whitespace-only lines (also CRLF ones) are
    skipped but still count for line numbers."""
    content = (
        BOM
        + b'{"id": "a", "prompt": "first"}\r\n'
        + b"\n"
        + b"   \t \r\n"
        + b'{"id": "b", "prompt": "second"}\n'
        + b"\n"
        + b'{"id": "c", "messages": [{"role": "user", "content": "third"}]}'  # no final newline
    )
    path = write(tmp_path, content)
    job_id = submitted_id(submit(server, path))
    state = job_state(server, job_id)
    assert state["counts"]["total"] == 3 and state["counts"]["pending"] == 3
    items = stored_items(r, job_id)
    assert [(it["id"], it["line"]) for it in items] == [("a", 1), ("b", 4), ("c", 6)]
    assert items[0]["prompt"] == "first"
    assert_one_chunk_waiting(r)


def test_line_of_exactly_the_limit_is_accepted(server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    """The boundary of the over-long-line case: MAX_LINE bytes pass, MAX_LINE + 1 do not."""
    skeleton = json.dumps({"prompt": ""})
    line = json.dumps({"prompt": "a" * (MAX_LINE - len(skeleton))})
    assert len(line.encode()) == MAX_LINE
    job_id = submitted_id(submit(server, write(tmp_path, good(1) + "\n" + line + "\n")))
    assert job_state(server, job_id)["counts"]["total"] == 2
    r.flushall()
    longer = json.dumps({"prompt": "a" * (MAX_LINE - len(skeleton) + 1)})
    path = write(tmp_path, good(1) + "\n" + longer + "\n", name="longer.jsonl")
    assert_refused(submit(server, path), r, source=path, line=2, field=None, words=("longer than",))


# --- --skip-invalid ------------------------------------------------------------------------

MIXED_LINES = [
    good(1),
    good(2),
    '{"prompt": "broken"',  # 3: invalid JSON
    good(4),
    '{"id": "g1", "prompt": "again"}',  # 5: duplicate id
    json.dumps({"id": "big", "prompt": "x", "max_new_tokens": LIMIT + 1}),  # 6: above the limit
    "",  # 7: blank, skipped
    good(8),
    "[1, 2]",  # 9: not an object
]
MIXED_BAD = {3: None, 5: "id", 6: "max_new_tokens", 9: None}
"""Bad line → the field its error names."""


def test_skip_invalid_records_bad_lines_as_errored_items(
    server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    path = write(tmp_path, "\n".join(MIXED_LINES) + "\n")
    result = submit(server, path, "--skip-invalid")
    job_id = submitted_id(result)
    assert "submitted 8 items in 1 chunks (4 pending)" in result.stderr
    state = job_state(server, job_id)
    assert state["counts"] == {
        "total": 8,
        "succeeded": 0,
        "errored": 4,
        "cancelled": 0,
        "expired": 0,
        "pending": 4,
    }
    assert state["status"] == "in_progress"
    items = stored_items(r, job_id)
    line_of = {it["index"]: it["line"] for it in items}
    assert sorted(line_of.values()) == [1, 2, 3, 4, 5, 6, 8, 9]
    results = {int(k): json.loads(v) for k, v in r.hgetall(f"genq:job:{job_id}:results").items()}
    assert sorted(line_of[i] for i in results) == sorted(MIXED_BAD)
    for index, res in results.items():
        n = line_of[index]
        assert res["status"] == "error" and res["line"] == n
        assert res["error"]["type"] == "invalid_input"
        field = MIXED_BAD[n]
        where = f"line {n}" + (f", field '{field}'" if field else "")
        assert res["error"]["message"].startswith(where + ": "), res["error"]["message"]
    by_line = {res["line"]: res for res in results.values()}
    assert by_line[5]["id"] == "line-5"  # its own id "g1" is line 1's
    assert by_line[6]["id"] == "big"  # readable and unused: kept
    assert "line 1 has the same id" in by_line[5]["error"]["message"]
    # the good items wait for a worker: one chunk message, no result yet
    assert_one_chunk_waiting(r)
    ok_ids = {it["id"] for it in items if it.get("invalid") is None}
    assert ok_ids == {"g1", "g2", "g4", "g8"}


def test_skip_invalid_collect_writes_the_errored_lines(
    server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    """Without a worker, collect already writes the invalid lines (and says 4 are pending)."""
    path = write(tmp_path, "\n".join(MIXED_LINES) + "\n")
    job_id = submitted_id(submit(server, path, "--skip-invalid"))
    out = tmp_path / "out.jsonl"
    result = invoke(server, "collect", job_id, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 4 results" in result.stderr and "4 pending" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["line"] for row in rows] == sorted(MIXED_BAD)
    assert all(row["status"] == "error" and row["error"]["type"] == "invalid_input" for row in rows)


def test_skip_invalid_with_only_bad_lines_enqueues_nothing(
    server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    """Every line bad: the job is recorded (all errored, completed) but no task message is sent."""
    path = write(tmp_path, '{"prompt": ""}\nnot json\n{"prompt": 1}\n')
    job_id = submitted_id(submit(server, path, "--skip-invalid"))
    state = job_state(server, job_id)
    assert state["status"] == "completed"
    assert state["counts"]["total"] == 3 and state["counts"]["errored"] == 3
    assert state["counts"]["pending"] == 0
    assert list_keys(r) == []


# --- the done-when, through a real `genq` process ---------------------------------


def test_done_when_third_line_malformed_subprocess(
    server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    """`genq submit` of a file whose third line is malformed exits non-zero with a message naming
    line 3, leaving no message in any Redis list."""
    path = write(tmp_path, "\n".join([good(1), good(2), '{"prompt": "three",', good(4)]) + "\n")
    proc = genq(server.url, "submit", str(path), "--profile", PROFILE, check=False)
    assert proc.returncode != 0
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("job ")  # the id, said before anything is written
    assert lines[1:] == [lines[1]] and lines[1].startswith(f"genq: error: {path}, line 3: invalid JSON")
    assert_nothing_enqueued(r)
    # the same file with --skip-invalid goes through: three items to run, line 3 recorded
    proc = genq(server.url, "submit", str(path), "--profile", PROFILE, "--skip-invalid", check=False)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert_one_chunk_waiting(r)
    results = list(r.hgetall(f"genq:job:{job_id}:results").values())
    assert len(results) == 1 and json.loads(results[0])["line"] == 3


# --- job options: refused in plain words, nothing enqueued ------------------------------------


@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_expires_in_not_positive_is_refused(
    seconds: str, server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    path = write(tmp_path, GOOD_FILE)
    message = error_line(submit(server, path, "--expires-in", seconds))
    assert "expires" in message
    assert_nothing_enqueued(r)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--max-new-tokens", "0"), id="max_new_tokens_zero"),
        pytest.param(("--seed", "-1"), id="seed_negative"),
        pytest.param(("--stop", ""), id="stop_empty"),
    ],
)
def test_job_option_errors_are_in_plain_words(
    args: tuple[str, ...], server: RedisServer, r: redis.Redis, tmp_path: Path
) -> None:
    message = error_line(submit(server, write(tmp_path, GOOD_FILE), *args))
    assert_nothing_enqueued(r)
    assert args[0] in message
    assert "Input should" not in message and "Value error" not in message, message
