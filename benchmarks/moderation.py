"""Moderation classifiers side by side on the same held-out test split, and refusal judges
against hand labels.

    python benchmarks/moderation.py --base quickstart/runs/quickstart --sft-base quickstart/runs/quickstart-sft

The data is the shipped build of `scripts/build_moderation_set.py` (train / validation / test
split by template: the test phrasing is never seen in training). Each classifier trains on
train, has its thresholds calibrated per category on validation for a 5% false-positive rate
(`lmforge.safety.calibration`), and is measured once on test:

- lmforge's `train-classifier` head on `--base`, frozen and fine-tuned, and fine-tuned from
  `--sft-base` (the quickstart's safety-SFT model, itself trained on the train split only);
- a linear model on TF-IDF features (scikit-learn logistic regression, word and char n-grams);
- alt-profanity-check (one score: "harmful at all" only), at its own 0.8 and calibrated;
- lmforge's rules (PII and secrets patterns: they are not meant for these categories).

The refusal judges (shipped classifier, phrase patterns) are scored against
`lmforge/data/moderation/refusal_handlabelled.jsonl`. Writes the `moderation` section of
BENCHMARKS.md and `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.jsonl import load_jsonl  # noqa: E402
from lmforge.safety import calibration, refusal  # noqa: E402
from lmforge.safety.moderation_data import CATEGORIES, OUT  # noqa: E402


def split(name: str) -> tuple[list[str], list[list[str]]]:
    rows = [r for _, r in load_jsonl(OUT / f"moderation_{name}.jsonl.gz")]
    return [r["text"] for r in rows], [r["labels"] for r in rows]


def measure(name: str, scorer, categories, data, target_fpr, fixed=None) -> dict:
    (val_x, val_y), (test_x, test_y) = data["validation"], data["test"]
    start = time.perf_counter()
    test_scores = scorer.scores(test_x)
    ms = (time.perf_counter() - start) * 1000 / len(test_x)
    thresholds = fixed or calibration.calibrate(scorer.scores(val_x), val_y, categories, target_fpr)
    return {"name": name, "ms_per_text": ms, **calibration.report(test_scores, test_y, thresholds)}


class AnyHarm:
    """A single-score backend (profanity) or a pattern backend (rules) asked: harmful at all?"""

    def __init__(self, moderator, key=None):
        self.moderator, self.key = moderator, key

    def scores(self, texts):
        if hasattr(self.moderator, "spans"):
            return [{"harmful": float(bool(self.moderator.spans(t)))} for t in texts]
        return [{"harmful": s[self.key]} for s in self.moderator.scores(texts)]


def binary_labels(data):
    return {k: (x, [["harmful"] if y else [] for y in ys]) for k, (x, ys) in data.items()}


def lmforge_head(base: str, train_base: bool, work: Path, args) -> tuple[object, float]:
    from lmforge.safety.classifier import ClassifierConfig, load_classifier, run

    out = work / f"{'finetuned' if train_base else 'frozen'}-{len(list(work.iterdir()))}"
    start = time.perf_counter()
    run(ClassifierConfig(model=base, data=str(OUT / "moderation_train.jsonl.gz"),  # train-classifier's defaults
                         val_data=str(OUT / "moderation_validation.jsonl.gz"), out=str(out), train_base=train_base,
                         target_fpr=args.target_fpr))
    return load_classifier(out), time.perf_counter() - start


def run_all(args) -> dict:
    from lmforge.safety.moderation import ProfanityModerator
    from lmforge.safety.rules import RulesModerator
    from lmforge.safety.tfidf import TfidfClassifier

    data = {s: split(s) for s in ("train", "validation", "test")}
    rows = []
    start = time.perf_counter()
    tfidf = TfidfClassifier(CATEGORIES).fit(*data["train"])
    rows.append({**measure("TF-IDF + logistic regression (scikit-learn)", tfidf, CATEGORIES, data, args.target_fpr),
                 "train_s": time.perf_counter() - start})
    with tempfile.TemporaryDirectory() as tmp:
        heads = [(args.base, False, "lmforge classifier, frozen base"), (args.base, True, "lmforge classifier, fine-tuned base"),
                 (args.sft_base, True, "lmforge classifier, fine-tuned from the safety-SFT model")]
        for base, train_base, label in heads:
            if base:
                model, seconds = lmforge_head(base, train_base, Path(tmp), args)
                rows.append({**measure(label, model, CATEGORIES, data, args.target_fpr, fixed=model.thresholds),
                             "train_s": seconds})
    binary = binary_labels(data)
    profanity = AnyHarm(ProfanityModerator(), "profanity")
    rows.append(measure("alt-profanity-check at its 0.8", profanity, ["harmful"], binary, args.target_fpr,
                        fixed={"harmful": 0.8}))
    rows.append(measure("alt-profanity-check, calibrated", profanity, ["harmful"], binary, args.target_fpr))
    rows.append(measure("lmforge rules (PII, secrets)", AnyHarm(RulesModerator()), ["harmful"], binary,
                        args.target_fpr, fixed={"harmful": 0.5}))
    judges = {name: refusal.judge_agreement(refusal.load_judge(name)) for name in ("classifier", "patterns")}
    return {"rows": rows, "judges": judges, "sizes": {k: len(v[0]) for k, v in data.items()},
            "target_fpr": args.target_fpr, "base": args.base}


def _f(value, pct=False):
    if value is None:
        return "-"
    return f"{value:.0%}" if pct else f"{value:.2f}"


def markdown(result: dict, command: str) -> str:
    sizes = result["sizes"]
    lines = [
        "### Moderation: classifiers side by side on the held-out test split (CPU)",
        "",
        f"`{command}`. Data: the shipped moderation build, split by template (train {sizes['train']}, "
        f"validation {sizes['validation']}, test {sizes['test']} texts; test phrasing unseen in training). "
        f"Thresholds calibrated per category on validation for a {result['target_fpr']:.0%} false-positive rate, "
        "then measured once on test. \"Harmful at all\" is the gateway's question: F1 over harmful texts, "
        "false-positive rate over safe ones (hard negatives included).",
        "",
        "| classifier | harmful at all: F1 | precision | recall | FPR on safe | macro F1 (6 categories) | ms / text | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        b = row["binary"]
        macro = row["macro_f1"] if len(row["categories"]) > 1 else None
        lines.append(f"| {row['name']} | {_f(b['f1'])} | {_f(b['precision'])} | {_f(b['recall'])} | {_f(b['fpr'], True)} "
                     f"| {_f(macro)} | {row['ms_per_text']:.2f} | {_f(row.get('train_s'))} |")
    per_category = [r for r in result["rows"] if len(r["categories"]) > 1]
    lines += ["", "Per category on test (precision / recall / F1, calibrated threshold):", "",
              "| category | " + " | ".join(r["name"] for r in per_category) + " |",
              "|---|" + "---|" * len(per_category)]
    for c in CATEGORIES:
        cells = [f"{_f(r['categories'][c]['precision'])} / {_f(r['categories'][c]['recall'])} / "
                 f"**{_f(r['categories'][c]['f1'])}** (t={r['categories'][c]['threshold']:.2f})" for r in per_category]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Refusal judges against the hand-labelled replies (`lmforge/data/moderation/refusal_handlabelled.jsonl`):", "",
              "| judge | agreement | Cohen's kappa | false refusals | missed refusals | n |", "|---|---|---|---|---|---|"]
    for name, j in result["judges"].items():
        lines.append(f"| {name} | {j['agreement']:.0%} | {j['kappa']:.2f} | {j['false_refusals']} | {j['missed_refusals']} | {j['n']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="lmforge model for the trained classifier (e.g. quickstart/runs/quickstart)")
    p.add_argument("--sft-base", help="an lmforge model tuned on the train split (e.g. quickstart/runs/quickstart-sft)")
    p.add_argument("--target-fpr", type=float, default=0.05)
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = p.parse_args(argv)
    result = run_all(args)
    command = "python benchmarks/moderation.py" + (f" --base {args.base}" if args.base else "") + (
        f" --sft-base {args.sft_base}" if args.sft_base else "")
    text = markdown(result, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.no_write:
        write_section("moderation", text)


if __name__ == "__main__":
    main()
