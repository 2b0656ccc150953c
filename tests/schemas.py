"""JSON schemas and OpenAI batch lines shared by the structured-output tests (issue 14)."""

from __future__ import annotations

import json
from typing import Any

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "smoker": {"type": "boolean"},
        },
        "required": ["name", "age", "smoker"],
        "additionalProperties": False,
    },
    "label": {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["label", "score"],
        "additionalProperties": False,
    },
    "record": {
        "type": "object",
        "properties": {
            "patient": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "maxLength": 8},
                    "sex": {"enum": ["f", "m", "x"]},
                },
                "required": ["id", "sex"],
                "additionalProperties": False,
            },
            "drugs": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["patient", "drugs"],
        "additionalProperties": False,
    },
    "entities": {
        "type": "object",
        "properties": {
            "entities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "maxLength": 16},
                        "kind": {"enum": ["drug", "dose", "symptom"]},
                        "negated": {"type": "boolean"},
                    },
                    "required": ["text", "kind", "negated"],
                    "additionalProperties": False,
                },
                "maxItems": 4,
            }
        },
        "required": ["entities"],
        "additionalProperties": False,
    },
}
NAMES = list(SCHEMAS)
QUESTIONS = [
    "Extract the patient from: a 54 year old smoker with chest pain.",
    "Classify the sentiment: the treatment worked well.",
    "Give the record for patient 12: aspirin and ibuprofen.",
    "List the entities: no fever, 40 mg aspirin, cough.",
    "what is the dose of aspirin for an adult ?",
]


ONE_THREAD = {"GENQ_THREADS": "1"}


def request(i: int, body: dict[str, Any], url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": f"r{i:03d}", "method": "POST", "url": url, "body": body})


def schema_request(i: int, max_tokens: int) -> str:
    name = NAMES[i % len(NAMES)]
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": f"Answer with a {name} JSON object."},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (case {i})"},
        ],
        "max_tokens": max_tokens,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
        },
    }
    return request(i, body)
