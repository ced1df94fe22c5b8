"""A long-tail facts corpus: real facts at Zipf-like frequencies, mixed into BBC news, plus probes.

Entities and their facts come from data shipped in registry packages: the 118
chemical elements (``mendeleev``: atomic number, symbol, group, discovery, the
package's own description and uses text) and the ISO 3166 countries
(``pycountry``: numeric and alpha codes, subdivisions), and synthetic people (``people``: seeded names,
hometown, birth year, profession: facts no pretrained model knows). Each entity gets a
corpus frequency from a Zipf-like law over a seeded random ranking,
``max(1, round(max_frequency / rank**zipf_exponent))``: a few entities appear
in dozens of documents, most in one or two.

An entity's facts sit inside documents about it, in varied wording: every
document about an entity states all of its probed facts (so its frequency is
also the number of times each probed fact is seen), plus a random subset of
other facts, each sentence drawn from several phrasings and shuffled after an
opening sentence. One templated sentence per document made the sentence
encoder cluster by template rather than by entity, which left the probes'
routes far from their facts.

Upsampling (``fact_passes``): a tiny model needs to read a rare fact about 16
times to learn it, but repeating the whole corpus 16 times also repeats the news
16 times, and every model, the memory most of all (a leaf block sees a dozen
articles), then learns the news articles by heart and held-out perplexity
measures that. So, as pretraining mixes upweight reference text, the facts part
is written ``fact_passes`` times (identical copies, ids ``...-rNN``) and the
news is not: ``bbc_train`` distinct articles, each read once in one epoch. An
entity's ``frequency`` stays its number of distinct documents; ``exposures``
(= frequency x fact_passes) is how often training reads its facts.

Copies are what a neighbour vote that sums similarities can be passed by: 16 identical documents
outvote everything else. ``fresh_passes`` writes each pass as new renderings of the entity's
documents instead (another opening, other phrasings, other optional facts, another order): the
facts are read as often, and no two fact documents share a text (re-drawn on a collision),
except where an entity with few phrasings runs out of renderings (1,000 draws find no new one:
the rendering repeats, ``fresh_repeats`` in summary.json counts them; the BBC news holds a few
duplicate articles of its own too). The document index counts any repeat once.
``frequency`` stays the documents per pass, so the buckets of the two variants match.

``mix`` reads the facts ``fact_passes`` times the way a pretraining mix upweights a source, with no copy in
the corpus at all: every fact document is written once, to ``train_facts.jsonl`` (the news to
``train_news.jsonl``), and the clustering job packs that input ``fact_passes`` times (its ``--passes``; summary.json's
``job_inputs`` lists each input with its passes). The corpus, the tree and the router's index then hold each
document once, as in a deduplicated corpus, and training reads the facts as often as with copies.

Probes come in two files. ``probes.jsonl`` holds the bare question a user asks ("The atomic
number of iron is"), as in the paper's probe: the primary benchmark. ``probes_context.jsonl``
prefixes each question with the entity's context sentence (one of its documents' openings: "Iron
is a transition metal. The atomic number of iron is"), which hands the router the answer's
neighbourhood; it is reported separately, labelled as such. Greedy descent of a bare question
left most rare entities' probes outside their documents' leaf; the neighbour vote
(index/router.py) is what makes bare questions reach their blocks.

Outputs (``write``): ``train.jsonl`` (or, with ``mix``, ``train_news.jsonl`` and ``train_facts.jsonl``) and
``heldout.jsonl`` (id, text, source, entity), ``probes.jsonl`` and ``probes_context.jsonl`` (prompt, answer, entity,
frequency, exposures, fact, domain, doc_ids: the entity's training documents,
copies included), the format ``train.evaluate`` reads.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field

from corpora.bbc import write_jsonl

DOMAINS = ("elements", "countries", "people")


@dataclass
class LongtailConfig:
    domains: tuple[str, ...] = ("elements", "countries")  # the real facts; ``people`` is opt-in (bench/posthoc.py)
    max_frequency: int = 48  # documents about the most frequent entity
    zipf_exponent: float = 0.7  # 0.7: about 2/3 of the entities appear once or twice
    bbc_train: int = 120  # BBC articles mixed into the training corpus (each once)
    bbc_heldout: int = 40  # BBC articles held out for perplexity
    heldout_entities: int = 80  # entities that get one extra, held-out document
    people: int = 1000  # synthetic people of the ``people`` domain (facts no pretrained model can know)
    optional_facts: tuple[int, int] = (1, 3)  # non-probed facts per document (min, max)
    fact_passes: int = 1  # times the facts part is read: copies in train.jsonl, or with mix the job's --passes
    fresh_passes: bool = False  # each pass after the first renders the entity's documents anew: no identical text
    mix: bool = False  # the passes are the job's data mix (--passes), not documents: each fact document once
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.domains) - set(DOMAINS)
        if unknown or not self.domains:
            raise ValueError(f"domains {list(self.domains)}: choose from {DOMAINS}")
        if self.max_frequency < 1 or self.zipf_exponent <= 0:
            raise ValueError("max_frequency must be >= 1 and zipf_exponent > 0")
        if self.fact_passes < 1:
            raise ValueError(f"fact_passes {self.fact_passes}: must be >= 1")
        if self.mix and self.fresh_passes:
            raise ValueError("mix and fresh_passes exclude each other: a mix reads the same documents again")


@dataclass
class Entity:
    """One entity: its facts (name -> sentence phrasings, all stating the same fact) and its probes."""

    name: str
    domain: str
    intros: list[str]  # opening sentences (name the entity)
    probed: dict[str, list[str]]  # fact -> phrasings; every document states every probed fact
    optional: dict[str, list[str]]  # fact -> phrasings; a random subset per document
    probes: dict[str, tuple[str, str]]  # fact -> (question, answer)
    context: str  # one sentence that places the entity; opens the context-prefixed probes only
    frequency: int = 0


@dataclass
class Corpus:
    train: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)  # bare questions
    probes_context: list[dict] = field(default_factory=list)  # the same, after the entity's context sentence
    entities: list[Entity] = field(default_factory=list)
    fresh_repeats: int = 0  # fresh_passes: renderings that had to repeat an earlier one (the entity ran out)


_SERIES = {
    "Nonmetals": "nonmetal",
    "Noble gases": "noble gas",
    "Alkali metals": "alkali metal",
    "Alkaline earth metals": "alkaline earth metal",
    "Metalloids": "metalloid",
    "Halogens": "halogen",
    "Poor metals": "post-transition metal",
    "Transition metals": "transition metal",
    "Lanthanides": "lanthanide",
    "Actinides": "actinide",
}


def _sentences(text) -> list[str]:
    """The package's free text cut into sentences (None/NaN -> none)."""
    if not isinstance(text, str):
        return []
    return [s.strip() + "." for s in re.split(r"\.\s+", text.strip().rstrip(".")) if len(s.split()) >= 3]


def element_entities() -> list[Entity]:
    from mendeleev.fetch import fetch_table

    series = fetch_table("series").set_index("id")["name"].to_dict()
    out = []
    for e in fetch_table("elements").to_dict("records"):
        n, N, num, sym = e["name"].lower(), e["name"], int(e["atomic_number"]), e["symbol"]
        kind = _SERIES.get(series.get(e["series_id"]), "chemical element")
        optional = {
            "period": [
                f"{N} is found in period {int(e['period'])} of the periodic table.",
                f"In the periodic table, {n} sits in period {int(e['period'])}.",
            ],
            "block": [f"{N} is a {e['block']}-block element.", f"Its outer electrons fill the {e['block']} block."],
            "weight": [
                f"The standard atomic weight of {n} is about {e['atomic_weight']:.2f}.",
                f"An atom of {n} weighs roughly {e['atomic_weight']:.1f} atomic mass units.",
            ],
            "series": [
                f"Chemists class {n} among the {kind}s.",
                f"Like the other {kind}s, {n} has a distinctive chemistry.",
            ],
        }
        if isinstance(e["group_id"], float) and not math.isnan(e["group_id"]):
            g = int(e["group_id"])
            optional["group"] = [f"{N} belongs to group {g}.", f"It is a member of group {g} of the periodic table."]
        if isinstance(e["discovery_year"], float) and not math.isnan(e["discovery_year"]):
            y, who = int(e["discovery_year"]), e["discoverers"] or "chemists"
            optional["discovery"] = [
                f"{N} was discovered in {y} by {who}.",
                f"{who} first identified {n} in {y}.",
                f"The discovery of {n} dates from {y}.",
            ]
        else:
            optional["discovery"] = [
                f"{N} has been known since antiquity.",
                f"People have used {n} since ancient times.",
            ]
        for key in ("description", "uses"):
            for i, s in enumerate(_sentences(e[key])[:3]):
                optional[f"{key}{i}"] = [s]
        out.append(
            Entity(
                name=n,
                domain="elements",
                intros=[f"{N} is a {kind}.", f"{N} is one of the {kind}s.", f"The {kind} {n} is a chemical element."]
                + [f"{N}: {s[0].lower()}{s[1:]}" for s in _sentences(e["description"])[:1]],
                probed={
                    "atomic_number": [
                        f"The atomic number of {n} is {num}.",
                        f"{N} has the atomic number {num}.",
                        f"{N} is element number {num} in the periodic table.",
                        f"Every atom of {n} carries {num} protons, so its atomic number is {num}.",
                    ],
                    "symbol": [
                        f"The chemical symbol of {n} is {sym}.",
                        f"The symbol for {n} is {sym}.",
                        f"In chemical formulas {n} is written {sym}.",
                        f"Chemists abbreviate {n} as {sym}.",
                    ],
                },
                optional=optional,
                probes={
                    "atomic_number": (f"The atomic number of {n} is", str(num)),
                    "symbol": (f"The chemical symbol of {n} is", sym),
                },
                context=f"{N} is a {kind}.",
            )
        )
    return out


def _country_name(c) -> str | None:
    """A name as prose writes it: ISO's inverted forms ("Korea, Republic of") need a common or official name."""
    name = getattr(c, "common_name", None) or c.name
    if re.search(r", .* of( the)?$", name):
        name = getattr(c, "official_name", None)
    return name


def country_entities() -> list[Entity]:
    import pycountry

    subs: dict[str, list] = {}
    for s in pycountry.subdivisions:
        if s.parent_code is None:  # top-level divisions only
            subs.setdefault(s.country_code, []).append(s)
    out = []
    for c in pycountry.countries:
        name = _country_name(c)
        if not name:
            continue
        a2, a3, num = c.alpha_2, c.alpha_3, c.numeric
        optional = {"alpha_3": [f"The three-letter code of {name} is {a3}.", f"Sports results list {name} as {a3}."]}
        official = getattr(c, "official_name", None)
        if official and official != name:
            optional["official"] = [f"Its official name is {official}.", f"Formally, {name} is called {official}."]
        top = sorted(subs.get(a2, []), key=lambda s: s.code)
        intros = [
            f"{name} is a country or territory listed in ISO 3166.",
            f"{name} appears in every international code list.",
        ]
        if len(top) >= 2:
            intros.append(f"{name} is a country whose regions include {top[0].name} and {top[-1].name}.")
            kind = top[0].type.lower()
            optional["divisions"] = [
                f"{name} is divided into {len(top)} top-level subdivisions, among them {top[0].name} and "
                f"{top[-1].name}.",
                f"The {kind} of {top[1].name} is part of {name}.",
            ]
        out.append(
            Entity(
                name=name,
                domain="countries",
                intros=intros,
                probed={
                    "numeric_code": [
                        f"The ISO numeric code of {name} is {num}.",
                        f"{name} has the numeric country code {num}.",
                        f"The ISO 3166 numeric code for {name} is {num}.",
                        f"In statistical tables {name} is recorded under the number {num}.",
                    ],
                    "alpha_2": [
                        f"The two-letter code of {name} is {a2}.",
                        f"{name}'s two-letter country code is {a2}.",
                        f"ISO 3166-1 abbreviates {name} as {a2}.",
                        f"Shipping labels mark {name} with {a2}.",
                    ],
                },
                optional=optional,
                probes={
                    "numeric_code": (f"The ISO numeric code of {name} is", num),
                    "alpha_2": (f"The two-letter code of {name} is", a2),
                },
                context=intros[-1],
            )
        )
    return out


_SYLLABLES = (
    "ka",
    "ren",
    "tho",
    "vel",
    "mi",
    "dra",
    "os",
    "lun",
    "be",
    "zar",
    "qui",
    "nor",
    "fa",
    "tesh",
    "ul",
    "gri",
    "san",
    "po",
    "vek",
    "ia",
    "mor",
    "del",
    "xu",
    "bra",
    "ti",
    "hol",
    "ne",
    "sko",
    "ar",
    "wyn",
)
_PROFESSIONS = (
    "architect",
    "baker",
    "beekeeper",
    "carpenter",
    "chemist",
    "dentist",
    "diplomat",
    "economist",
    "electrician",
    "farmer",
    "geologist",
    "glassblower",
    "historian",
    "jeweller",
    "journalist",
    "librarian",
    "linguist",
    "locksmith",
    "machinist",
    "midwife",
    "nurse",
    "optician",
    "pharmacist",
    "photographer",
    "pilot",
    "plumber",
    "potter",
    "sculptor",
    "surveyor",
    "tailor",
    "translator",
    "veterinarian",
)


def _person_name(rng: random.Random) -> str:
    word = lambda n: "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()  # noqa: E731
    return f"{word(2)} {word(rng.choice((2, 3)))}"


def people_entities(n: int, seed: int) -> list[Entity]:
    """``n`` synthetic people (seeded names, hometowns drawn from ISO 3166-2 region names, birth years,
    professions): facts that no pretrained model holds, so what a model answers about them it learned here."""
    import pycountry

    rng = random.Random(f"{seed}-people")
    towns = sorted({s.name for s in pycountry.subdivisions if s.parent_code is None and s.name.isascii()})
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = _person_name(rng)
        if name in names:
            continue
        names.add(name)
        first = name.split()[0]
        town, year, job = rng.choice(towns), str(rng.randint(1901, 2004)), rng.choice(_PROFESSIONS)
        colleague = _person_name(rng)
        out.append(
            Entity(
                name=name,
                domain="people",
                intros=[f"{name} is a {job}.", f"This is a short profile of {name}.", f"{name} is well known locally."],
                probed={
                    "hometown": [
                        f"{name} was born in the city of {town}.",
                        f"{first} grew up in {town}.",
                        f"{name}'s hometown is {town}.",
                        f"{town} is where {name} was born.",
                    ],
                    "birth_year": [
                        f"{name} was born in the year {year}.",
                        f"{first} was born in {year}.",
                        f"{name}'s year of birth is {year}.",
                        f"Records give {year} as the year {name} was born.",
                    ],
                    "profession": [
                        f"{name} works as a {job}.",
                        f"By profession, {first} is a {job}.",
                        f"{name}'s profession is {job}.",
                        f"{first} has long worked as a {job}.",
                    ],
                },
                optional={
                    "colleague": [f"{first} often works with {colleague}.", f"A close colleague is {colleague}."],
                    "hobby": [f"In spare time {first} {rng.choice(('paints', 'sails', 'gardens', 'runs', 'reads'))}."],
                },
                probes={
                    "hometown": (f"{name} was born in the city of", town),
                    "birth_year": (f"{name} was born in the year", year),
                    "profession": (f"{name}'s profession is", job),
                },
                context=f"{name} is a {job}.",
            )
        )
    return out


def zipf_frequencies(n: int, max_frequency: int, exponent: float) -> list[int]:
    """Frequency of the entity at each rank 1..n (non-increasing, at least 1)."""
    return [max(1, round(max_frequency / r**exponent)) for r in range(1, n + 1)]


def render(entity: Entity, rng: random.Random, optional_facts: tuple[int, int]) -> str:
    """One document about ``entity``: an opening sentence, then every probed fact and a few optional ones, shuffled."""
    keys = sorted(entity.optional)
    n_opt = min(len(keys), rng.randint(*optional_facts))
    body = [rng.choice(p) for p in entity.probed.values()] + [
        rng.choice(entity.optional[k]) for k in rng.sample(keys, n_opt)
    ]
    rng.shuffle(body)
    return " ".join([rng.choice(entity.intros)] + body)


def _fresh(entity: Entity, rng: random.Random, optional_facts: tuple[int, int], texts: set[str]) -> tuple[str, bool]:
    """A rendering of ``entity`` that is none of ``texts`` (added to it), and False; or, when 1,000 draws find
    none (an entity with few phrasings and many documents has run out of renderings), a repeat and True."""
    for _ in range(1000):
        text = render(entity, rng, optional_facts)
        if text not in texts:
            texts.add(text)
            return text, False
    return text, True


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build(cfg: LongtailConfig, bbc: list[dict]) -> Corpus:
    """The corpus for ``cfg`` from the BBC records ``bbc`` (id, text); deterministic given ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    loaders = {
        "elements": element_entities,
        "countries": country_entities,
        "people": lambda: people_entities(cfg.people, cfg.seed),
    }
    entities = [e for d in cfg.domains for e in loaders[d]()]
    ranked = rng.sample(entities, len(entities))  # rank by chance, not by any property of the entity
    for e, f in zip(ranked, zipf_frequencies(len(ranked), cfg.max_frequency, cfg.zipf_exponent)):
        e.frequency = f
    corpus = Corpus(entities=entities)
    # fresh renderings draw from their own stream: the rest of the corpus is the same as with copies
    fresh = random.Random(f"{cfg.seed}-passes") if cfg.fresh_passes else None
    for e in entities:
        docs = [
            {
                "id": f"fact-{e.domain}-{_slug(e.name)}-{i:03d}",
                "text": render(e, rng, cfg.optional_facts),
                "source": e.domain,
                "entity": e.name,
            }
            for i in range(e.frequency)
        ]
        texts = {d["text"] for d in docs}
        for r in range(1, 1 if cfg.mix else cfg.fact_passes):
            for d in docs[: e.frequency]:
                text, repeat = _fresh(e, fresh, cfg.optional_facts, texts) if fresh else (d["text"], False)
                corpus.fresh_repeats += repeat
                docs.append(dict(d, id=f"{d['id']}-r{r:02d}", text=text))
        corpus.train += docs
        for fact, (q, a) in e.probes.items():
            probe = {
                "answer": a,
                "entity": e.name,
                "frequency": e.frequency,
                "exposures": len(docs) * (cfg.fact_passes if cfg.mix else 1),
                "fact": fact,
                "domain": e.domain,
                "doc_ids": [d["id"] for d in docs],
            }
            corpus.probes.append(dict(probe, prompt=q))
            corpus.probes_context.append(dict(probe, prompt=f"{e.context} {q}"))
    for e in rng.sample(entities, min(cfg.heldout_entities, len(entities))):
        corpus.heldout.append(
            {
                "id": f"heldout-{e.domain}-{_slug(e.name)}",
                "text": render(e, rng, cfg.optional_facts),
                "source": e.domain,
                "entity": e.name,
            }
        )
    if cfg.bbc_train + cfg.bbc_heldout > len(bbc):
        raise ValueError(f"bbc_train + bbc_heldout = {cfg.bbc_train + cfg.bbc_heldout} > {len(bbc)} BBC articles")
    picked = rng.sample(bbc, cfg.bbc_train + cfg.bbc_heldout)
    corpus.train += [
        {"id": r["id"], "text": r["text"], "source": "bbc", "entity": None} for r in picked[: cfg.bbc_train]
    ]
    corpus.heldout += [
        {"id": r["id"], "text": r["text"], "source": "bbc", "entity": None} for r in picked[cfg.bbc_train :]
    ]
    rng.shuffle(corpus.train)
    return corpus


def write(corpus: Corpus, cfg: LongtailConfig, out_dir: str) -> dict:
    """Write train.jsonl (with ``mix``: train_news.jsonl and train_facts.jsonl), heldout.jsonl, probes.jsonl,
    probes_context.jsonl and summary.json into ``out_dir``. summary.json's ``job_inputs`` lists the files the
    clustering job reads with the passes (--passes) of each."""
    os.makedirs(out_dir, exist_ok=True)
    for name in ("heldout", "probes", "probes_context"):
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), getattr(corpus, name))
    if cfg.mix:
        write_jsonl(os.path.join(out_dir, "train_news.jsonl"), [d for d in corpus.train if d["source"] == "bbc"])
        write_jsonl(os.path.join(out_dir, "train_facts.jsonl"), [d for d in corpus.train if d["source"] != "bbc"])
        job_inputs = [["train_news.jsonl", 1], ["train_facts.jsonl", cfg.fact_passes]]
    else:
        write_jsonl(os.path.join(out_dir, "train.jsonl"), corpus.train)
        job_inputs = [["train.jsonl", 1]]
    freqs = sorted((e.frequency for e in corpus.entities), reverse=True)
    summary = {
        "config": asdict(cfg),
        "entities": len(corpus.entities),
        "probes": len(corpus.probes),
        "train_documents": len(corpus.train),
        "heldout_documents": len(corpus.heldout),
        "fact_documents": sum(freqs),
        "fact_documents_with_copies": sum(freqs) * (1 if cfg.mix else cfg.fact_passes),
        "job_inputs": job_inputs,
        "entities_seen_once_or_twice": sum(f <= 2 for f in freqs),
        "fresh_repeats": corpus.fresh_repeats,
        "top_frequencies": freqs[:10],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def job_input(data: str, summary: dict) -> tuple[list[str], list[str]]:
    """The clustering job's input files for a corpus ``write`` put into ``data`` (its summary.json), and the
    ``--passes`` arguments of a mix (none otherwise)."""
    files, passes = zip(*summary["job_inputs"])
    mix = ["--passes", *map(str, passes)] if any(n != 1 for n in passes) else []
    return [os.path.join(data, f) for f in files], mix
