"""How long loading and checking a LLaVA-665k-sized instruction file takes, and its peak memory.

The data (built once under ``--workdir``, reused by later runs): a LLaVA conversation JSON list of ``--records``
records shaped like LLaVA-v1.5-mix-665k: 94% with one image, 6% text-only; 1 to 6 human/gpt turn pairs (mean
about 3); questions of 40-220 characters and answers of 60-480 characters (about 1,400 bytes a record, 0.93 GB at
665k). The images sit in coco / gqa / ocr_vqa / textvqa / vg folders as in LLaVA's layout: ``--unique-images``
files (default one per two records, as the real mix has about one unique image per 1.7 records), each record
drawing one; every file is a hard link to one small JPEG per folder (a directory entry, no data blocks), so the
folder has the real number of entries while the disk cost stays small. Records are in a fixed-seed order.

Each measurement runs the loader in a fresh process (the figure is that process's own peak RSS, its imports
included; the imports alone are reported as ``import RSS``; a file large enough to be read in parallel parts is
read by worker processes, one per CPU up to 8, whose largest peak RSS is ``worker peak``):

- ``cold``: no data cache and no image-check cache: the file is parsed, every record checked, each unique image
  opened once, the Arrow cache written;
- ``new file``: the same records in a file with a new modification time, image-check cache kept (a changed file
  is read and checked again; images already checked are not opened again);
- ``cached``: the data cache is reused (memory-mapped Arrow file; nothing parsed or checked).

``--fit-model DIR`` adds the per-stage fit check (``distill.data.collate.check_fit``) with that model's processor
at ``--max-length`` on the loaded records: ``fit cold`` (nothing cached but the loader's image record) and ``fit
cached``, seconds in the same columns.

    python -m eval.bench.load_data --records 66500 --workdir /tmp/llava_bench --header
    python -m eval.bench.load_data --records 665000 --workdir /tmp/llava_bench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

FOLDERS = {  # LLaVA-665k's image folders and their shares of the image records
    "coco/train2017": 0.55, "gqa/images": 0.14, "ocr_vqa/images": 0.14, "textvqa/train_images": 0.04,
    "vg/VG_100K": 0.13,
}
WORDS = ("the", "a", "image", "shows", "what", "color", "is", "of", "on", "left", "right", "person", "table",
         "sign", "reads", "how", "many", "there", "are", "in", "picture", "describe", "detail", "building", "car")


def _sentences(rng: random.Random, lo: int, hi: int, n: int = 4096) -> list[str]:
    """A pool of ``n`` random sentences of ``lo`` to ``hi`` characters (records draw from it: fast to build)."""
    pool = []
    for _ in range(n):
        target, words = rng.randint(lo, hi), []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(WORDS))
        pool.append(" ".join(words))
    return pool


def build(workdir: Path, records: int, unique_images: int) -> tuple[Path, Path]:
    """The JSON file and image folder for ``records`` records (built once; reused when present)."""
    data, root = workdir / f"llava_{records}.json", workdir / f"images_{unique_images}"
    rng = random.Random(0)
    names = []
    for folder, share in FOLDERS.items():
        names += [f"{folder}/{len(names) + i:012d}.jpg" for i in range(max(1, round(unique_images * share)))]
    if not (root / "DONE").exists():
        shutil.rmtree(root, ignore_errors=True)
        sources = root / "sources"  # outside the record folders; one file per 50,000 links (ext4 allows 65,000)
        sources.mkdir(parents=True)
        for i, name in enumerate(names):
            source = sources / f"{i // 50_000}.jpg"
            if i % 50_000 == 0:
                Image.new("RGB", (64, 48), (rng.randrange(256), 90, 160)).save(source)
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.link(source, root / name)
        (root / "DONE").touch()
    if not data.exists():
        questions, answers = _sentences(rng, 40, 220), _sentences(rng, 60, 480)
        tmp = data.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write("[")
            for i in range(records):
                text_only = rng.random() < 0.06
                turns = []
                for t in range(rng.choice((1, 1, 2, 3, 3, 4, 5, 6))):
                    question = rng.choice(questions) + "?"
                    if t == 0 and not text_only:
                        question = "<image>\n" + question
                    turns += [{"from": "human", "value": question},
                              {"from": "gpt", "value": rng.choice(answers) + "."}]
                record = {"id": f"{i:09d}", "conversations": turns}
                if not text_only:
                    record = {"id": record["id"], "image": rng.choice(names), "conversations": turns}
                f.write(("," if i else "") + json.dumps(record))
            f.write("]")
        tmp.rename(data)
    return data, root


def child(data: str, root: str, cache: str, fit_model: str = "", max_length: str = "2048") -> None:
    """One measurement, in its own process: import, load (and fit), report seconds and peak RSS as JSON."""
    from distill.data.formats import load_llava_json

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    ds, stats = load_llava_json(data, root, cache_dir=cache)
    seconds = time.perf_counter() - start
    if fit_model:
        from distill.data.collate import ConversationEncoder, check_fit
        from distill.data.templates import get_template
        from distill.models.processors import load_processor

        encoder = ConversationEncoder(load_processor(fit_model), get_template("chatml"), int(max_length))
        start = time.perf_counter()
        check_fit(ds, {"student": encoder}, root, "skip", data, cache_dir=cache)
        seconds = time.perf_counter() - start
    assert len(ds) == stats.kept == stats.total, stats.as_dict()
    last = ds[len(ds) - 1]  # the rows read back
    assert last["conversations"] and isinstance(last["images"], list)
    print(json.dumps({"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "worker_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                      "import_gb": import_rss, "records": len(ds)}))


def measure(data: Path, root: Path, cache: Path, *fit: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "eval.bench.load_data", "--child", str(data), str(root), str(cache),
                          *fit],
                         check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=66_500)
    parser.add_argument("--unique-images", type=int, default=None, help="default: records // 2")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distill_load_bench"))
    parser.add_argument("--header", action="store_true")
    parser.add_argument("--fit-model", help="also time the fit check with this model's processor")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    unique = args.unique_images or args.records // 2
    data, root = build(args.workdir, args.records, unique)
    cache = args.workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {"cold": measure(data, root, cache)}
    os.utime(data)  # a changed file: read and checked again, its images not opened again
    runs["new file"] = measure(data, root, cache)
    runs["cached"] = measure(data, root, cache)
    if args.fit_model:
        runs["fit cold"] = measure(data, root, cache, args.fit_model, str(args.max_length))
        runs["fit cached"] = measure(data, root, cache, args.fit_model, str(args.max_length))
    if args.header:
        print("| records | file GB | unique images | run | seconds | peak RSS GB | worker peak GB | import GB |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|")
    size = data.stat().st_size / 1e9
    for name, r in runs.items():
        workers = f"{r['worker_gb']:.2f}" if r["worker_gb"] else "-"
        print(f"| {args.records:,} | {size:.2f} | {unique:,} | {name} | {r['seconds']:.1f} | {r['peak_gb']:.2f} | "
              f"{workers} | {r['import_gb']:.2f} |")


if __name__ == "__main__":
    main()
