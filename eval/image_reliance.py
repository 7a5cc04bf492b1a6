"""Does a model read the image? Teacher-forced answer accuracy per question type, with each question's own image
and with another image (the next question in the batch that is about a different image).

If a type's accuracy is the same either way, the model answers it from the language prior alone. Cheaper and
sharper than generation-based VQA for diagnosing a teacher (one forward per batch, no decoding):

    python -m eval.image_reliance runs/demo/teacher/model --data runs/demo/world/data --limit 600

Prints a markdown table: type, n, accuracy with the true image, with a wrong image, and the difference.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.formats import IMAGE_PLACEHOLDER
from distill.data.templates import get_template
from distill.models.student import load_vlm
from distill.training.kd import split_inputs
from eval.benchmarks import read_jsonl


def _other_image(images: list[str]) -> list[int]:
    """For each position, the nearest later position (cyclically) whose image is another file: VQA files list
    several questions per image in a row, so a plain roll would mostly hand a question its own image back. A batch
    of one image keeps it (nothing to swap with)."""
    n = len(images)
    return [next((j % n for j in range(i + 1, i + n) if images[j % n] != images[i]), i) for i in range(n)]


@torch.no_grad()
def answer_accuracy(model, processor, items: list[dict], image_root: Path, template: str = "chatml",
                    batch_size: int = 64, wrong_image: bool = False) -> dict[str, list[bool]]:
    """Per question type, whether every answer token is the argmax under teacher forcing.

    ``items``: VQA records (``image``, ``question``, ``answer``, ``question_type``). ``wrong_image``: each
    question sees the image of the next item in its batch that has another image.
    """
    collator = SupervisedCollator(ConversationEncoder(processor, get_template(template), max_length=1 << 16),
                                  image_root)
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        shown = _other_image([r["image"] for r in chunk]) if wrong_image else range(len(chunk))
        records = [{"id": str(i), "image": chunk[j]["image"], "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{r['question']}"},
            {"from": "gpt", "value": str(r["answer"])}]} for i, (r, j) in enumerate(zip(chunk, shown))]
        batch = {k: v.to(device) for k, v in collator(records).items()}
        labels = batch.pop("labels")
        batch = split_inputs(batch, dtype=model.dtype)
        pred = model(**batch).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = ((pred == target) | (target == -100)).all(1)
        for r, hit in zip(chunk, ok.tolist()):
            hits[r.get("question_type", "all")].append(bool(hit))
    return hits


def reliance_table(model, processor, items: list[dict], image_root: Path, **kwargs) -> list[dict]:
    """One row per question type (and ``all``): n, accuracy with the true and with a wrong image, difference."""
    true = answer_accuracy(model, processor, items, image_root, **kwargs)
    wrong = answer_accuracy(model, processor, items, image_root, wrong_image=True, **kwargs)
    true["all"] = [h for k in list(true) for h in true[k]]
    wrong["all"] = [h for k in list(wrong) for h in wrong[k]]
    rows = []
    for qtype in sorted(true):
        a, b = sum(true[qtype]) / len(true[qtype]), sum(wrong[qtype]) / len(wrong[qtype])
        rows.append({"type": qtype, "n": len(true[qtype]), "true_image": a, "wrong_image": b, "reliance": a - b})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a VLM artifact folder")
    parser.add_argument("--data", type=Path, required=True, help="a world's data folder (eval/vqa.jsonl, images/)")
    parser.add_argument("--vqa", default="eval/vqa.jsonl", help="VQA file, relative to --data")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    model, processor = load_vlm(args.model)
    if torch.cuda.is_available():
        model.cuda()
    items = read_jsonl(args.data / args.vqa, args.limit)
    rows = reliance_table(model, processor, items, args.data / "images")
    print("| type | n | true image | wrong image | reliance |\n|---|---:|---:|---:|---:|")  # noqa: T201
    for r in rows:
        print(f"| {r['type']} | {r['n']} | {r['true_image']:.3f} | {r['wrong_image']:.3f} | "  # noqa: T201
              f"{r['reliance']:+.3f} |")


if __name__ == "__main__":
    main()
