"""How long the collator takes per micro-batch: the fast reply-span path (one chat-template render per record) and
the exact one (two renders per reply), on a world's instruction data with a model's own processor.

    python -m eval.bench.collate_speed --model runs/demo/world/teacher_init --data runs/demo/world/data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.formats import load_llava_json
from distill.data.templates import get_template
from distill.models.student import load_vlm


def per_batch_ms(collator: SupervisedCollator, records: list[dict], batch: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            collator(records[i:i + batch])
        best = min(best, (time.perf_counter() - start) / (len(records) // batch))
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a VLM artifact folder (its processor is used)")
    parser.add_argument("--data", type=Path, required=True, help="a world's data folder (instruct.json, images/)")
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    _, processor = load_vlm(args.model)
    ds, _ = load_llava_json(args.data / "instruct.json", args.data / "images", limit=args.records)
    records = [ds[i] for i in range(len(ds))]
    encoder = ConversationEncoder(processor, get_template("chatml"), 256)
    collator = SupervisedCollator(encoder, args.data / "images")
    fast = per_batch_ms(collator, records, args.batch)
    encoder._fast_spans = lambda text, messages: None  # every record through the exact path
    exact = per_batch_ms(collator, records, args.batch)
    print(f"| {type(processor).__name__} | {args.batch} | {fast:.1f} | {exact:.1f} |")  # noqa: T201


if __name__ == "__main__":
    main()
