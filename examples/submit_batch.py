"""Submit a JSONL file as a genq job from a script, follow it and write the results.

export GENQ_BROKER_URL=redis://127.0.0.1:6379/0
genq-worker start --profile tiny-random &          # at least one worker somewhere
python examples/submit_batch.py examples/prompts.jsonl results.jsonl --profile tiny-random
"""

from __future__ import annotations

import argparse
import json
import os

from producer import Client


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prompts")
    parser.add_argument("output")
    parser.add_argument("--profile", default="tiny-random")
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()

    client = Client(os.environ.get("GENQ_BROKER_URL"))
    job = client.submit(args.prompts, profile=args.profile, chunk_size=args.chunk_size)
    print(f"submitted {job.id}")
    state = job.wait(progress=True)  # a live bar on a terminal, a line every few seconds otherwise
    print(f"{state.status}: {state.counts.as_dict()}, {state.tokens_per_second:.1f} tok/s")
    with open(args.output, "w", encoding="utf-8") as out:
        for result in job.results():  # input order, each item once
            out.write(json.dumps(result.public(), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
