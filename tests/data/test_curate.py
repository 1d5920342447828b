"""`lmforge curate` on real text: what each step removes, what survives, and a report that adds up."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

# datatrove is a core dependency (pyproject): these imports fail the suite without it, never skip it.
from lmforge.data.curate import CurateConfig, run
from lmforge.data.curate.steps import eval_passages, words
from lmforge.data.readers import expand_inputs, read_documents

# Documents of the bundled corpus that the default (web) filters keep: prose, little code.
CLEAN = [0, 1, 7, 10, 16, 24, 51, 52, 60, 66, 130, 137]

GERMAN = (
    "Die Stadt liegt an einem breiten Fluss, und im Sommer sitzen die Leute abends am Ufer. "
    "Viele Familien gehen am Wochenende in den Wald, um zu wandern und frische Luft zu atmen. "
    "Die Kinder spielen auf der Wiese, während die Eltern Kaffee trinken und Kuchen essen. "
    "Im Winter ist es oft kalt und neblig, aber der Weihnachtsmarkt ist dann besonders schön. "
    "Es gibt dort Glühwein, gebrannte Mandeln und viele kleine Geschenke aus Holz. "
    "Wer die Stadt besucht, sollte unbedingt das alte Rathaus und die Kirche ansehen."
)
FRENCH = (
    "Le village se trouve au pied de la montagne, entouré de champs et de vignes. "
    "Chaque matin, le boulanger ouvre sa boutique avant le lever du soleil. "
    "Les habitants se retrouvent au marché le samedi pour acheter des fruits et des légumes. "
    "En automne, les vendanges attirent des travailleurs venus de toute la région. "
    "Le soir, on entend les cloches de l'église sonner au loin dans la vallée. "
    "Les touristes aiment se promener dans les ruelles étroites du vieux centre."
)
BOILERPLATE = "\n".join([
    "Home", "Products", "About us", "Contact", "Login | Sign up", "Cart (0)",
    "This website uses cookies to improve your experience.", "Accept all cookies",
    "Privacy Policy | Terms of Use", "Follow us on Facebook", "Home", "Products", "About us", "Contact",
    "© 2024 Example Corp. All rights reserved.",
])
TOXIC = (
    "You are a fucking idiot and everyone knows it. Shut the fuck up, you stupid piece of shit. "
    "Nobody wants to hear your bullshit, you worthless asshole. Go to hell, you dumb bitch. "
    "Your ideas are shit and you are a fucking moron who should be ashamed. "
    "Fuck you and fuck everything you stand for, you pathetic loser. "
    "What a dick move, you absolute dumbass, now piss off and die."
)
PII_LINE = "Write to jane.doe@gmail.com or call (555) 123-4567 about the server at 93.184.216.34."


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read_output(out: Path) -> list[dict]:
    records = []
    for shard in sorted(out.glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    return records


def _config(inputs: list[Path], out: Path, **sections) -> CurateConfig:
    data = {"input": {"paths": [str(p) for p in inputs]}, "output": {"dir": str(out)},
            "executor": {"workers": 1}}
    data.update(sections)
    return CurateConfig.model_validate(data)


@pytest.fixture(scope="module")
def planted(corpus_subset, tmp_path_factory) -> dict:
    """Clean documents plus planted duplicates, foreign languages, PII, boilerplate, toxicity, an eval passage."""
    corpus = [json.loads(line) for line in corpus_subset.read_text(encoding="utf-8").splitlines()]
    clean = [{"id": corpus[i]["id"], "text": corpus[i]["text"]} for i in CLEAN]
    passage = next(p for p in eval_passages(["stdlib_completion"])["stdlib_completion"] if len(words(p)) >= 13)
    near = clean[1]["text"].split(" ")
    near[len(near) // 2] = "banana"
    records = [
        *clean,
        {"id": "dup-exact", "text": clean[0]["text"]},
        {"id": "dup-near", "text": " ".join(near)},
        {"id": "german", "text": GERMAN},
        {"id": "french", "text": FRENCH},
        {"id": "boilerplate", "text": BOILERPLATE},
        {"id": "toxic", "text": TOXIC},
        # Two more documents the filters keep (not copies of the clean ones: dedup would take them).
        {"id": "pii", "text": corpus[19]["text"] + "\n\n" + PII_LINE + "\n"},
        {"id": "contaminated", "text": corpus[31]["text"] + "\n\n" + passage + "\n"},
    ]
    root = tmp_path_factory.mktemp("curate")
    source = _write_jsonl(root / "raw.jsonl", records)
    result = run(_config([source], root / "curated"))
    return {"result": result, "clean": clean, "records": records, "out": root / "curated"}


def test_default_recipe_removes_planted_problems_and_keeps_clean_documents(planted):
    kept = {r["id"]: r for r in _read_output(planted["out"])}
    removed_by = {r: s["step"] for s in planted["result"].report["steps"] for r in s["removed"]}
    for doc_id in ("dup-exact", "dup-near", "german", "french", "boilerplate", "toxic", "contaminated"):
        assert doc_id not in kept, doc_id
    for doc in planted["clean"]:
        assert doc["id"] in kept, doc["id"]
    assert {"exact_duplicate", "near_duplicate", "wrong_language", "toxic", "eval_overlap"} <= set(removed_by)
    assert removed_by["exact_duplicate"] == "exact_dedup" and removed_by["near_duplicate"] == "minhash_dedup"
    steps = {s["step"]: s for s in planted["result"].report["steps"]}
    assert steps["language"]["removed"]["wrong_language"]["docs"] == 2
    assert steps["toxicity"]["removed"]["toxic"]["docs"] == 1
    assert steps["decontaminate"]["removed"]["eval_overlap"]["docs"] == 1
    # The boilerplate page falls to one of the web-page heuristics (removed examples are "id: text").
    removed_boilerplate = {name for name, step in steps.items() for examples in step["examples"].values()
                           for example in examples if example.startswith("boilerplate: ")}
    assert len(removed_boilerplate) == 1 and removed_boilerplate <= {"gopher_repetition", "gopher_quality", "c4", "fineweb"}


def test_pii_is_replaced_with_placeholders_and_counted(planted):
    text = {r["id"]: r["text"] for r in _read_output(planted["out"])}["pii"]
    assert "jane.doe@gmail.com" not in text and "(555) 123-4567" not in text and "93.184.216.34" not in text
    assert "<EMAIL>" in text and "<PHONE_NUMBER>" in text and "<IP_ADDRESS>" in text
    counts = planted["result"].report["pii_replacements"]
    assert counts["email"] >= 1 and counts["phone"] >= 1 and counts["ip"] >= 1


def test_report_counts_add_up_and_files_are_written(planted):
    report = planted["result"].report
    steps = report["steps"]
    assert steps[0]["docs_in"] == len(planted["records"])
    for previous, step in zip(steps, steps[1:], strict=False):
        assert step["docs_in"] == previous["docs_out"], step["step"]
        assert step["bytes_in"] == previous["bytes_out"], step["step"]
    for step in steps:
        assert step["docs_in"] == step["docs_out"] + sum(r["docs"] for r in step["removed"].values()), step["step"]
    assert report["output"]["docs"] == len(_read_output(planted["out"])) == steps[-1]["docs_out"]
    for name in ("report.json", "report.md", "funnel.png", "config.yaml"):
        assert (planted["out"] / name).is_file(), name
    table = (planted["out"] / "report.md").read_text()
    assert "| language |" in table and "wrong_language" in table and "### " in table
    assert (planted["out"] / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Removed examples never show PII: the scrubber runs over them too.
    assert "jane.doe@gmail.com" not in json.dumps(report)
    assert not Path(str(planted["out"]) + ".work").exists()


def test_curated_shards_feed_the_tokenizer_reader_directly(planted):
    texts = list(read_documents(expand_inputs([str(planted["out"])])))
    assert len(texts) == planted["result"].report["output"]["docs"]


def test_parquet_shards_feed_the_tokenizer_reader_too(corpus_texts, tmp_path):
    source = _write_jsonl(tmp_path / "raw.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(corpus_texts[:4])])
    result = run(_config([source], tmp_path / "out", **FAST, output={"dir": str(tmp_path / "out"), "format": "parquet"},
                         minhash={"enabled": False}))
    assert sorted(p.suffix for p in (tmp_path / "out").glob("0*")) == [".parquet"]
    texts = list(read_documents(expand_inputs([str(tmp_path / "out")])))
    assert len(texts) == result.report["output"]["docs"] == 4


FAST = {"gopher_repetition": {"enabled": False}, "gopher_quality": {"enabled": False}, "c4": {"enabled": False},
        "fineweb": {"enabled": False}, "toxicity": {"enabled": False}, "decontaminate": {"enabled": False}}


def test_rerun_after_a_crash_skips_finished_tasks_and_gives_identical_output(planted, tmp_path, monkeypatch):
    from lmforge.data.curate import steps

    source = _write_jsonl(tmp_path / "raw.jsonl", planted["records"])
    sections = {**FAST, "executor": {"workers": 1, "tasks": 2}}
    reference = run(_config([source], tmp_path / "reference", **sections))

    original = steps.PIIScrubber.format
    calls = {"n": 0}

    def crash_on_the_second_task(self, text):
        calls["n"] += 1
        if calls["n"] > len(planted["records"]) // 2 + 1:  # past the first task's share
            raise RuntimeError("simulated crash")
        return original(self, text)

    monkeypatch.setattr(steps.PIIScrubber, "format", crash_on_the_second_task)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(_config([source], tmp_path / "resumed", **sections))
    work = tmp_path / "resumed.work"
    assert (work / "logs" / "filter" / "completions" / "00000").is_file()
    assert not (work / "logs" / "filter" / "completions" / "00001").exists()
    assert not (tmp_path / "resumed").exists()  # nothing half-written where a reader would look

    monkeypatch.setattr(steps.PIIScrubber, "format", original)
    calls["n"] = 0
    resumed = run(_config([source], tmp_path / "resumed", **sections))
    assert _read_output(tmp_path / "resumed") == _read_output(tmp_path / "reference")
    assert [s["docs_out"] for s in resumed.report["steps"]] == [s["docs_out"] for s in reference.report["steps"]]


def test_bad_input_is_counted_by_reason_not_raised(corpus_texts, tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(corpus_texts[:3])])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"id": "x1", "text": "fine text that is kept, with enough words in it."}\n'
        b'{"id": "x2", "text": \n'  # malformed JSON
        b'{"id": "x3", "body": "no text field"}\n'
        b'{"id": "x4", "text": ""}\n'
        b'{"id": "x5", "text": 42}\n'
        b'\x00\xff\xfe binary junk \x00\x01\n'
        b'{"id": "x6", "text": "nul\\u0000bytes\\u0001\\u0002\\u0003 inside"}\n'
    )
    (tmp_path / "broken.jsonl.gz").write_bytes(b"this is not gzip at all")
    result = run(_config([good, bad, tmp_path / "broken.jsonl.gz"], tmp_path / "out", **FAST,
                         language={"enabled": False}, minhash={"enabled": False}))
    read = result.report["steps"][0]
    reasons = {r: v["docs"] for r, v in read["removed"].items()}
    assert reasons == {"malformed_json": 1, "missing_text_field": 1, "empty": 1, "text_not_a_string": 1,
                       "binary": 2, "unreadable_file": 1}
    assert read["docs_out"] == 4 and result.report["output"]["docs"] == 4
    assert read["docs_in"] == read["docs_out"] + sum(reasons.values())


def one_line_error(capsys) -> str:
    """The single `error: ...` line a user error prints, with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_wrong_text_field_is_one_clear_error(corpus_subset, tmp_path, capsys):
    from lmforge.cli import main

    code = main(["curate", "-i", str(corpus_subset), "-o", str(tmp_path / "out"), "input.text_field=body",
                 "executor.workers=1"])
    assert code == 2
    message = one_line_error(capsys)
    assert "missing_text_field" in message and "records have id, text; set input.text_field" in message
    assert not (tmp_path / "out").exists()


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["curate", "-i", str(tmp_path / "missing.jsonl")]) == 2
    assert "input not found" in (message := one_line_error(capsys)) and "missing.jsonl" in message
    assert main(["curate", "-i", str(tmp_path), "minhash.shingles=3"]) == 2
    assert "unknown key 'minhash.shingles'" in one_line_error(capsys)
    assert main(["curate"]) == 2
    assert "input.paths" in one_line_error(capsys)
    (tmp_path / "notes.md").write_text("hello")
    assert main(["curate", "-i", str(tmp_path / "notes.md")]) == 2
    assert "unsupported file type" in (message := one_line_error(capsys)) and "notes.md" in message
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (tmp_path / "doc.txt").write_text("Some text. " * 20)
    assert main(["curate", "-i", str(tmp_path / "doc.txt"), "-o", str(elsewhere)]) == 2
    assert str(elsewhere) in one_line_error(capsys)  # names the dir it will not replace
    assert (elsewhere / "keep.txt").read_text() == "mine"


def test_a_rerun_that_removes_every_document_leaves_the_previous_output_and_fails(corpus_texts, tmp_path, capsys):
    from lmforge.cli import main

    source = _write_jsonl(tmp_path / "raw.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(corpus_texts[:4])])
    out = tmp_path / "out"
    fast = [f"{step}.enabled=false" for step in FAST] + ["minhash.enabled=false", "executor.workers=1"]
    assert main(["curate", "-i", str(source), "-o", str(out), *fast]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert len(_read_output(out)) == 4
    capsys.readouterr()
    # A recipe that keeps nothing: the previous good output is not replaced by an empty one.
    everything_goes = [*fast, "gopher_quality.enabled=true", "gopher_quality.min_doc_words=1000000"]
    assert main(["curate", "-i", str(source), "-o", str(out), *everything_goes]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "every document was removed (gopher_quality" in err and f"previous output in {out} is left as it was" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (tmp_path / "out.work" / "report" / "report.md").is_file()  # why, for the user to read
    # Into a fresh dir, the report alone is published (no shards), and the run still fails.
    assert main(["curate", "-i", str(source), "-o", str(tmp_path / "fresh"), *everything_goes]) == 2
    assert (tmp_path / "fresh" / "report.json").is_file() and _read_output(tmp_path / "fresh") == []


@pytest.mark.slow
def test_ray_executor_on_a_local_runtime_gives_the_local_result(planted, tmp_path):
    ray = pytest.importorskip("ray")
    source = _write_jsonl(tmp_path / "raw.jsonl", planted["records"])
    sections = {**FAST, "minhash": {"enabled": False}}
    local = run(_config([source], tmp_path / "local", **sections, executor={"workers": 1, "tasks": 2}))
    try:
        on_ray = run(_config([source], tmp_path / "ray", **sections, executor={"kind": "ray", "workers": 2, "tasks": 2}))
    finally:
        ray.shutdown()
    assert _read_output(tmp_path / "ray") == _read_output(tmp_path / "local")
    assert on_ray.report["output"] == local.report["output"]
