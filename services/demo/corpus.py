"""The demo corpus: a generated gazetteer of the Serrow Isles, a fictional archipelago.

Everything here is made up by this module, from a fixed seed: island, town, mountain and people
names are built from syllables, and numbers are drawn without replacement, so every fact that a demo
question asks about is unique in the corpus. Each of the 40 islands has four short documents
(overview, economy, history, lighthouse), 160 in all, and the history documents name other islands,
so a question about one island has distractors.

``demo_questions()`` are phrased differently from the documents (so retrieval is more than string
matching) while sharing enough words with their document for BM25 and dense retrievers to find it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

ARCHIPELAGO = "the Serrow Isles"
SEED = 20240917
ISLAND_COUNT = 40

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "br",
    "dr",
    "gl",
    "kr",
    "st",
    "tr",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th")
_TOWN_SUFFIXES = ("haven", "wick", "port", "mouth", "stead", "ford", "by")
_REGIONS = ("northern reach", "southern reach", "eastern shoals", "western banks")
_EXPORTS = (
    "smoked eel",
    "sea salt",
    "kelp ash",
    "amber beads",
    "goat cheese",
    "reed mats",
    "dried cod",
    "copper wire",
    "lamp oil",
    "barley beer",
    "heather honey",
    "wool blankets",
    "pickled herring",
    "slate tiles",
    "tarred rope",
    "river pearls",
    "pine tar",
    "juniper spirit",
    "clay pots",
    "dyed linen",
    "sailcloth",
    "whetstones",
    "seal leather",
    "blackcurrant jam",
    "live lobster",
    "pear cider",
    "peat bricks",
    "glass floats",
    "tin ingots",
    "cured ham",
    "sheepskin boots",
    "salted mackerel",
    "fishing hooks",
    "beeswax candles",
    "quarried limestone",
    "rye flour",
    "buckthorn oil",
    "carved driftwood",
    "walnut oil",
    "dried cranberries",
)
_PRODUCE = (
    "turnips",
    "leeks",
    "apples",
    "cabbages",
    "onions",
    "pears",
    "carrots",
    "plums",
    "beans",
    "potatoes",
)
_PROFESSIONS = (
    "shipwright",
    "salt merchant",
    "net maker",
    "cartographer",
    "herbalist",
    "stonemason",
    "weaver",
    "cooper",
    "ferry pilot",
    "beekeeper",
    "blacksmith",
    "schoolteacher",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_COLOURS = ("red", "green", "white", "amber", "blue")


@dataclass(frozen=True)
class _Island:
    name: str
    slug: str
    region: str
    area: int
    capital: str
    population: int
    mountain: str
    height: int
    export: str
    produce: str
    market_day: str
    founded: int
    founder: str
    profession: str
    origin: str
    festival: str
    festival_month: str
    cape: str
    lighthouse_built: int
    colour: str
    flash_seconds: int
    keeper: str


class _Names:
    """Unique pronounceable names drawn from syllables."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
        while True:
            count = self._rng.randint(*syllables)
            parts = [
                self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                for _ in range(count)
            ]
            name = ("".join(parts) + suffix).capitalize()
            if len(name) >= 4 and name.lower() not in self._used:
                self._used.add(name.lower())
                return name

    def person(self) -> str:
        return f"{self.word((2, 2))} {self.word((2, 3))}"


def _islands(seed: int = SEED) -> list[_Island]:
    rng = random.Random(seed)
    names = _Names(rng)
    island_names = [names.word() for _ in range(ISLAND_COUNT)]
    populations = rng.sample(range(1_200, 48_000), ISLAND_COUNT)
    heights = rng.sample(range(180, 2_400), ISLAND_COUNT)
    founded = rng.sample(range(1_040, 1_880), ISLAND_COUNT)
    exports = rng.sample(_EXPORTS, ISLAND_COUNT)
    islands = []
    for i, name in enumerate(island_names):
        origin = island_names[(i + rng.randint(1, ISLAND_COUNT - 1)) % ISLAND_COUNT]
        islands.append(
            _Island(
                name=name,
                slug=name.lower(),
                region=rng.choice(_REGIONS),
                area=rng.randint(12, 900),
                capital=names.word((1, 2), suffix=rng.choice(_TOWN_SUFFIXES)),
                population=populations[i],
                mountain=f"Mount {names.word()}",
                height=heights[i],
                export=exports[i],
                produce=rng.choice(_PRODUCE),
                market_day=rng.choice(_WEEKDAYS),
                founded=founded[i],
                founder=names.person(),
                profession=rng.choice(_PROFESSIONS),
                origin=origin,
                festival=f"{names.word((2, 2))} Feast",
                festival_month=rng.choice(_MONTHS),
                cape=f"Cape {names.word()}",
                lighthouse_built=rng.randint(max(founded[i], 1_700), 1_960),
                colour=rng.choice(_COLOURS),
                flash_seconds=rng.randint(3, 15),
                keeper=names.person(),
            )
        )
    return islands


def _documents(island: _Island, prefix: str = "") -> list[dict]:
    metadata = {"island": island.name, "region": island.region}
    texts = {
        "overview": (
            island.name,
            (
                f"{island.name} is an island in the {island.region} of {ARCHIPELAGO}, covering about "
                f"{island.area} square kilometres. Its capital is {island.capital}, a harbour town with "
                f"{island.population:,} inhabitants. The highest point on the island is {island.mountain}, "
                f"which rises {island.height} metres above the sea."
            ),
        ),
        "economy": (
            f"Economy of {island.name}",
            (
                f"Trade on {island.name} depends above all on {island.export}, its main export. Cargo is "
                f"loaded at the quay in {island.capital} and shipped to the other islands of {ARCHIPELAGO}. "
                f"A market is held in {island.capital} every {island.market_day}, where farmers sell "
                f"{island.produce}."
            ),
        ),
        "history": (
            f"History of {island.name}",
            (
                f"The first permanent settlement on {island.name} was founded in {island.founded} by "
                f"{island.founder}, a {island.profession} who sailed from {island.origin}. Every "
                f"{island.festival_month} the islanders hold the {island.festival} to remember the crossing."
            ),
        ),
        "lighthouse": (
            f"Lighthouse of {island.name}",
            (
                f"The lighthouse on {island.cape} guards the approach to {island.name}. Since it was built "
                f"in {island.lighthouse_built} it has shown a {island.colour} flash every "
                f"{island.flash_seconds} seconds. The present keeper is {island.keeper}, who lives in the "
                f"cottage at its foot."
            ),
        ),
    }
    return [
        {
            "id": f"{prefix}{island.slug}-{topic}",
            "title": title,
            "text": text,
            "metadata": {**metadata, "topic": topic},
        }
        for topic, (title, text) in texts.items()
    ]


def demo_documents() -> list[dict]:
    """The demo corpus: dicts with "id", "title", "text" and "metadata" (island, region, topic)."""
    return [document for island in _islands() for document in _documents(island)]


# A question template gives, for one island: the topic of the document that answers, the question, the answer.
_Template = Callable[[_Island], tuple[str, str, str]]

DEMO_ISLANDS = (2, 5, 9, 13, 17, 22, 28, 33)
_DEMO_TEMPLATES: tuple[_Template, ...] = (
    lambda i: ("lighthouse", f"Who currently keeps the lighthouse guarding {i.name}?", i.keeper),
    lambda i: ("history", f"In which year did people first settle on {i.name}?", f"{i.founded}"),
    lambda i: ("overview", f"What is the chief town of {i.name}?", i.capital),
    lambda i: ("economy", f"Which goods does {i.name} mostly ship abroad?", i.export),
    lambda i: ("overview", f"How many people live in the capital of {i.name}?", f"{i.population:,}"),
    lambda i: ("overview", f"How tall is the highest peak on {i.name}?", f"{i.height} metres"),
    lambda i: ("history", f"Who led the first settlers to {i.name}?", i.founder),
    lambda i: ("economy", f"On which weekday do farmers come to market on {i.name}?", i.market_day),
)
# Further questions about the other facts, asked only in training (`generated_archipelago`).
_MORE_TEMPLATES: tuple[_Template, ...] = (
    lambda i: ("overview", f"Which part of {ARCHIPELAGO} is {i.name} in?", i.region),
    lambda i: ("overview", f"How large is {i.name}?", f"{i.area} square kilometres"),
    lambda i: ("overview", f"What is the name of the highest mountain on {i.name}?", i.mountain),
    lambda i: ("economy", f"What do farmers sell at the market on {i.name}?", i.produce),
    lambda i: ("history", f"Which festival do the people of {i.name} celebrate?", i.festival),
    lambda i: ("history", f"In which month is the crossing to {i.name} remembered?", i.festival_month),
    lambda i: ("history", f"What was the trade of the founder of {i.name}?", i.profession),
    lambda i: ("history", f"From which island did the founder of {i.name} sail?", i.origin),
    lambda i: ("lighthouse", f"On which cape does the lighthouse of {i.name} stand?", i.cape),
    lambda i: ("lighthouse", f"When was the lighthouse of {i.name} built?", f"{i.lighthouse_built}"),
    lambda i: ("lighthouse", f"What colour does the lighthouse of {i.name} flash?", i.colour),
    lambda i: (
        "lighthouse",
        f"How many seconds pass between flashes on {i.name}?",
        f"{i.flash_seconds} seconds",
    ),
)


def _question(island: _Island, template: _Template, prefix: str = "") -> dict:
    topic, question, answer = template(island)
    return {"question": question, "answer": answer, "doc_id": f"{prefix}{island.slug}-{topic}"}


def demo_questions() -> list[dict]:
    """Questions with their expected answer and the id of the document that holds it."""
    islands = _islands()
    return [
        _question(islands[i], template) for i, template in zip(DEMO_ISLANDS, _DEMO_TEMPLATES, strict=True)
    ]


def generated_archipelago(n: int) -> tuple[list[dict], list[dict]]:
    """Another archipelago made like the demo's from seed SEED + n (n >= 1): its documents (ids prefixed
    "a<n>-") and, for every island, one question per template (the demo's and more).

    Its names and facts are new, so a generator trained on it cannot answer from memory: it has to read
    the answers from the retrieved passages, which is what the demo asks of it.
    """
    if n < 1:
        raise ValueError(f"n: must be at least 1 (0 is the demo's own archipelago), got {n}")
    prefix = f"a{n}-"
    islands = _islands(SEED + n)
    documents = [document for island in islands for document in _documents(island, prefix)]
    questions = [
        _question(island, template, prefix)
        for island in islands
        for template in _DEMO_TEMPLATES + _MORE_TEMPLATES
    ]
    return documents, questions
