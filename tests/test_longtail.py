"""The long-tail facts corpus: real facts, Zipf-like frequencies, varied wording, probes that match the corpus."""

import json
import os
import re
from collections import Counter, defaultdict

import pytest

from corpora.bbc import bbc_records
from corpora.longtail import LongtailConfig, build, job_input, write, zipf_frequencies
from train.evaluate import read_probes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(bbc_train=6, bbc_heldout=3, heldout_entities=5, max_frequency=20)


@pytest.fixture(scope="module")
def bbc():
    return list(bbc_records())


@pytest.fixture(scope="module")
def corpus(bbc):
    return build(LongtailConfig(**SMALL), bbc)


def test_zipf_frequencies_are_long_tailed():
    f = zipf_frequencies(300, 64, 0.8)
    assert f[0] == 64 and min(f) == 1
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert sum(x <= 2 for x in f) > len(f) / 2  # most entities are rare
    assert sum(x >= 10 for x in f) >= 5  # a few are frequent


def test_entity_documents_carry_every_probed_fact(corpus):
    docs = defaultdict(list)
    for d in corpus.train:
        docs[d["entity"]].append(d)
    assert len(corpus.entities) > 300  # elements and countries
    for e in corpus.entities:
        mine = docs[e.name]
        assert len(mine) == e.frequency >= 1
        for d in mine:
            assert e.name.lower() in d["text"].lower()
            for prompt, answer in e.probes.values():
                assert re.search(r"\b" + re.escape(answer) + r"\b", d["text"]), (answer, d["text"])
    for p in corpus.probes:  # the probe records the entity's true frequency and its documents
        assert p["frequency"] == len(docs[p["entity"]])
        assert sorted(p["doc_ids"]) == sorted(d["id"] for d in docs[p["entity"]])


def test_facts_are_the_packages_facts(corpus):
    probes = {(p["entity"], p["fact"]): p for p in corpus.probes}
    assert probes[("iron", "atomic_number")]["answer"] == "26"
    assert probes[("iron", "symbol")]["answer"] == "Fe"
    assert probes[("France", "numeric_code")]["answer"] == "250"
    # the primary probe is the bare question a user asks; the context-prefixed one is a second file
    assert probes[("iron", "atomic_number")]["prompt"] == "The atomic number of iron is"
    context = {(p["entity"], p["fact"]): p for p in corpus.probes_context}
    assert context[("iron", "atomic_number")]["prompt"] == "Iron is a transition metal. The atomic number of iron is"
    assert [dict(p, prompt=None) for p in corpus.probes] == [dict(p, prompt=None) for p in corpus.probes_context]


def test_wording_varies_within_an_entity(corpus):
    frequent = max(corpus.entities, key=lambda e: e.frequency)
    texts = [d["text"] for d in corpus.train if d["entity"] == frequent.name]
    assert len(set(texts)) > len(texts) // 2
    for fact, phrasings in frequent.probed.items():
        used = Counter(p for t in texts for p in phrasings if p in t)
        assert len(used) >= 2, f"{fact}: one phrasing only"
    openings = {t.split(". ")[0] for t in texts}
    assert len(openings) >= 2


def test_bbc_mixed_in_and_held_out(corpus, bbc):
    train_ids = {d["id"] for d in corpus.train}
    held_ids = {d["id"] for d in corpus.heldout}
    assert not train_ids & held_ids
    assert len(train_ids) == len(corpus.train)  # ids unique
    assert sum(d["source"] == "bbc" for d in corpus.train) == SMALL["bbc_train"]
    assert sum(d["source"] == "bbc" for d in corpus.heldout) == SMALL["bbc_heldout"]
    assert sum(d["source"] != "bbc" for d in corpus.heldout) == SMALL["heldout_entities"]
    # the BBC rows are the real articles
    by_id = {r["id"]: r["text"] for r in bbc}
    assert all(by_id[d["id"]] == d["text"] for d in corpus.train if d["source"] == "bbc")


def test_deterministic_by_seed(bbc, corpus):
    again = build(LongtailConfig(**SMALL), bbc)
    assert again.train == corpus.train and again.probes == corpus.probes
    other = build(LongtailConfig(**SMALL, seed=1), bbc)
    assert [d["text"] for d in other.train] != [d["text"] for d in corpus.train]


def test_write_reads_back_as_probes(tmp_path, corpus):
    cfg = LongtailConfig(**SMALL)
    summary = write(corpus, cfg, str(tmp_path))
    probes = read_probes(str(tmp_path / "probes.jsonl"))
    assert len(probes) == summary["probes"] == len(corpus.probes)
    assert len(read_probes(str(tmp_path / "probes_context.jsonl"))) == len(probes)
    with open(tmp_path / "train.jsonl") as f:
        assert sum(1 for _ in f) == summary["train_documents"]
    assert json.loads((tmp_path / "summary.json").read_text())["entities"] == len(corpus.entities)


def test_fact_passes_upsample_the_facts_not_the_news(bbc, corpus):
    up = build(LongtailConfig(**SMALL, fact_passes=3), bbc)
    facts = [d for d in corpus.train if d["source"] != "bbc"]
    up_facts = [d for d in up.train if d["source"] != "bbc"]
    assert len(up_facts) == 3 * len(facts) and len({d["id"] for d in up.train}) == len(up.train)
    # the copies are the same documents: each distinct text three times
    assert Counter(Counter(d["text"] for d in up_facts).values()) == Counter(
        3 * n for n in Counter(d["text"] for d in facts).values()
    )
    assert sum(d["source"] == "bbc" for d in up.train) == SMALL["bbc_train"]  # the news once
    for p, q in zip(corpus.probes, up.probes):
        assert q["frequency"] == p["frequency"] and q["exposures"] == 3 * p["exposures"] == 3 * p["frequency"]
        assert len(q["doc_ids"]) == q["exposures"]


def test_fresh_passes_read_the_facts_as_often_without_identical_documents(bbc, corpus):
    up = build(LongtailConfig(**SMALL, fact_passes=3), bbc)
    fresh = build(LongtailConfig(**SMALL, fact_passes=3, fresh_passes=True), bbc)
    facts = [d for d in fresh.train if d["source"] != "bbc"]
    assert len(facts) == sum(d["source"] != "bbc" for d in up.train)
    assert len({d["text"] for d in facts}) == len(facts)  # no two fact documents share a text
    by_id = {d["id"]: d for d in fresh.train}
    for p in fresh.probes:  # every rendering states the probed fact
        assert len(p["doc_ids"]) == p["exposures"] == 3 * p["frequency"]
        assert all(re.search(r"\b" + re.escape(p["answer"]) + r"\b", by_id[i]["text"]) for i in p["doc_ids"])
    # the first pass and everything else (news, held-out, probes' wording) are the copies variant's
    assert [d for d in fresh.train if not re.search(r"-r\d\d$", d["id"])] == [
        d for d in up.train if not re.search(r"-r\d\d$", d["id"])
    ]
    assert fresh.heldout == up.heldout and [p["prompt"] for p in fresh.probes] == [p["prompt"] for p in up.probes]


def test_a_mix_reads_the_facts_as_often_with_each_document_once(tmp_path, bbc, corpus):
    up = build(LongtailConfig(**SMALL, fact_passes=3), bbc)
    cfg = LongtailConfig(**SMALL, fact_passes=3, mix=True)
    mixed = build(cfg, bbc)
    # the corpus is the copies variant's first pass: every document once
    first = [d for d in up.train if not re.search(r"-r\d\d$", d["id"])]
    assert sorted(mixed.train, key=lambda d: d["id"]) == sorted(first, key=lambda d: d["id"])
    assert sum(d["source"] != "bbc" for d in mixed.train) == sum(e.frequency for e in mixed.entities)
    for p, q in zip(up.probes, mixed.probes):  # read as often, listed once
        assert q["exposures"] == p["exposures"] == 3 * q["frequency"] and len(q["doc_ids"]) == q["frequency"]
    summary = write(mixed, cfg, str(tmp_path))
    assert summary["job_inputs"] == [["train_news.jsonl", 1], ["train_facts.jsonl", 3]]
    assert not (tmp_path / "train.jsonl").exists()
    news, facts = (json_lines(tmp_path / f"train_{n}.jsonl") for n in ("news", "facts"))
    assert {d["source"] for d in news} == {"bbc"} and "bbc" not in {d["source"] for d in facts}
    assert len(news) + len(facts) == len(mixed.train) == summary["train_documents"]
    files, mix = job_input(str(tmp_path), summary)
    assert files == [str(tmp_path / "train_news.jsonl"), str(tmp_path / "train_facts.jsonl")]
    assert mix == ["--passes", "1", "3"]
    up_summary = write(up, LongtailConfig(**SMALL, fact_passes=3), str(tmp_path / "up"))
    assert job_input(str(tmp_path / "up"), up_summary) == (
        [str(tmp_path / "up" / "train.jsonl")],
        [],
    )


def json_lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="domains"):
        LongtailConfig(domains=("planets",))
    with pytest.raises(ValueError, match="fact_passes"):
        LongtailConfig(fact_passes=0)
    with pytest.raises(ValueError, match="mix and fresh_passes"):
        LongtailConfig(mix=True, fresh_passes=True)


def test_bench_stage_reruns_exactly_when_its_inputs_change(tmp_path):
    """bench/longtail.py: a stage is skipped only when its output exists and its fingerprint matches."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("longtail_bench", os.path.join(ROOT, "bench", "longtail.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg, out, log = tmp_path / "cfg.yaml", tmp_path / "out.txt", str(tmp_path / "log")
    cfg.write_text("a: 1\n")
    counter = tmp_path / "runs"

    def stage(name, after=()):
        cmd = [
            sys.executable,
            "-c",
            f"open({str(out)!r}, 'w').write('x'); open({str(counter)!r}, 'a').write('{name}\\n')",
        ]
        bench.Stages(str(tmp_path), cores=1, force=False).run(name, cmd, str(out), log, files=[str(cfg)], after=after)

    def runs():
        return counter.read_text().split() if counter.exists() else []

    stage("a")
    stage("a")
    assert runs() == ["a"]  # same command and inputs: skipped
    cfg.write_text("a: 2\n")
    stage("a")
    assert runs() == ["a", "a"]  # a config changed: recomputed, not skipped because its output exists
    out.unlink()
    stage("a")
    assert runs() == ["a", "a", "a"]  # output gone
    stage("b", after=["a"])
    stage("b", after=["a"])
    assert runs()[-1] == "b" and runs().count("b") == 1
    cfg.write_text("a: 3\n")
    stage("a")
    stage("b", after=["a"])
    assert runs().count("b") == 2  # its upstream stage ran with other inputs


def test_people_are_new_facts_in_varied_wording(bbc):
    cfg = LongtailConfig(domains=("people",), people=40, bbc_train=0, bbc_heldout=2, heldout_entities=0)
    c = build(cfg, bbc)
    assert len(c.entities) == 40 and len({e.name for e in c.entities}) == 40
    assert build(cfg, bbc).train == c.train  # seeded
    assert build(LongtailConfig(**{**cfg.__dict__, "seed": 1}), bbc).train != c.train
    for e in c.entities:
        mine = [d["text"] for d in c.train if d["entity"] == e.name]
        assert len(mine) == e.frequency
        for prompt, answer in e.probes.values():
            assert prompt.startswith(e.name) and all(answer in t for t in mine)
    probes = {(p["entity"], p["fact"]) for p in c.probes}
    assert len(probes) == 3 * 40  # hometown, birth year, profession
