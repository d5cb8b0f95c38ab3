"""``mini_trace``: an embedded task stream generated in code, mirroring TRACE's metric types.

No files and no network: every split is generated from a seed, so the same seed always gives the same
examples (and the same ids). Each task has one reward, used both by evaluation and by OPR's rollout filter::

    | task        | TRACE analogue | answer                                  | reward (0-100)                      |
    |-------------|----------------|-----------------------------------------|-------------------------------------|
    | emotion     | C-STANCE       | one of five emotion words               | exact match                          |
    | arithmetic  | NumGLUE        | working, then "The answer is N."        | exact match of the final number      |
    | topic       | FOMC           | one of five topic words (same sentences) | exact match                         |
    | summary     | MeetingBank    | one-sentence summary                    | ROUGE-L F                            |
    | science_qa  | ScienceQA      | letter, optionally with an explanation  | first character                      |
    | code_line   | Py150          | the next line of Python                 | edit similarity                      |
    | simplify    | 20Minuten      | simplified sentence                     | SARI against the source sentence     |

Why these tasks (lessons from a planning probe on SmolLM2-135M):

- ``emotion`` and ``topic`` read the *same* kind of sentence and answer in the *same* one-word slot with
  different label sets, so training on ``topic`` overwrites ``emotion`` (the model starts answering topics):
  forgetting is reliable, not seed noise. Five classes make a constant answer score ~20, not ~50. (Letters
  A-E for the labels were tried first: SmolLM2-135M stayed at chance after 25 steps at lr 3e-4, the
  letter-to-label indirection is too slow to learn at this scale.)
- ``arithmetic``, ``summary``, ``code_line`` and ``simplify`` accept many correct responses (free-form working
  before a checked number, paraphrases scored against a threshold). Only there can OPR's replayed responses
  (the model's own correct phrasing) differ from vanilla replay's gold answers; with single exact-string
  answers a correct rollout *is* the gold answer.
- A held-out ``general`` set (short instruction following, in no task of the stream) is evaluated at every
  stage to measure general-ability drift. ``varied`` scores it by :func:`reward_general_named` (the answer
  named, no other word of the set named), ``fixed`` by exact match, under which SmolLM2-135M scores 0 at every
  stage (it answers "The answer is market.").
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from opr.metrics import text as M
from opr.types import Benchmark, Example, Task

_TRIM = " \t\n.'\"!"  # surrounding characters that carry no answer

# -------------------------------------------------------------------------------------- sentences
# Shared by ``emotion`` and ``topic``: a person, an emotion cue and a topic event in one sentence.
EMOTIONS = {
    "joy": ["thrilled", "delighted", "overjoyed", "so happy", "glad", "cheerful"],
    "anger": ["furious", "annoyed", "outraged", "really angry", "irritated", "fed up"],
    "sadness": ["heartbroken", "gloomy", "miserable", "deeply sad", "down", "tearful"],
    "fear": ["terrified", "nervous", "scared", "anxious", "frightened", "worried sick"],
    "surprise": ["astonished", "shocked", "amazed", "stunned", "caught off guard", "speechless"],
}
TOPICS = {
    "travel": ["the flight to Madrid", "the train ride home", "the hotel booking", "the road trip", "the delayed bus"],
    "food": ["the soup at dinner", "the new bakery", "the birthday cake", "the pasta recipe", "the lunch menu"],
    "music": ["the concert last night", "the new album", "the piano lesson", "the band rehearsal", "the song on the radio"],
    "school": ["the math exam", "the history essay", "the science project", "the report card", "the class trip"],
    "shopping": ["the package delivery", "the store refund", "the online order", "the new shoes", "the sale at the mall"],
}
PEOPLE = ["Anna", "Ben", "Carla", "David", "Elif", "Farah", "George", "Hana", "Ivan", "Julia", "Kofi", "Lena",
          "Marco", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
FRAMES = [
    "{p} was {e} about {t}.",
    "{p} felt {e} after {t}.",
    "Honestly, {p} is {e} because of {t}.",
    "{p} said she was {e} when she heard about {t}.",
    "After {t}, {p} was {e}.",
    "{p} told us he felt {e} about {t}.",
]


def _sentence(rng: random.Random) -> tuple[str, str, str]:
    emotion = rng.choice(sorted(EMOTIONS))
    topic = rng.choice(sorted(TOPICS))
    text = rng.choice(FRAMES).format(p=rng.choice(PEOPLE), e=rng.choice(EMOTIONS[emotion]), t=rng.choice(TOPICS[topic]))
    return text[0].upper() + text[1:], emotion, topic


EMOTION_LABELS = ["joy", "anger", "sadness", "fear", "surprise"]
TOPIC_LABELS = ["travel", "food", "music", "school", "shopping"]
# Varied style: the same label in several surface forms, shared by ``emotion`` and ``topic`` (so the two
# tasks still compete for one answer slot). A correct answer need not be the example's own string.
LABEL_FORMS = ["{l}", "{L}.", "It is {l}.", "Answer: {l}", "I would say {l}.", "The answer is {l}."]


def _classification(rng: random.Random, labels: list[str], which: str, style: str = "fixed") -> tuple[str, str, None]:
    text, emotion, topic = _sentence(rng)
    label = emotion if which == "emotion" else topic
    if style == "fixed":
        prompt = f"Sentence: {text}\nWhich {which} is it: {', '.join(labels)}? Answer with one word."
        return prompt, label, None
    prompt = f"Sentence: {text}\nWhich {which} is it: {', '.join(labels)}? Name exactly one of these words."
    return prompt, rng.choice(LABEL_FORMS).format(l=label, L=label.capitalize()), None


def gen_emotion(rng: random.Random, style: str = "fixed"):
    return _classification(rng, EMOTION_LABELS, "emotion", style)


def gen_topic(rng: random.Random, style: str = "fixed"):
    # Same sentences and the same answer slot as ``emotion``, another label set: the tasks conflict.
    return _classification(rng, TOPIC_LABELS, "topic", style)


_WORD = re.compile(r"[a-z]+")


def named_labels(prediction: str, labels: list[str]) -> set[str]:
    """The labels of ``labels`` that ``prediction`` names as whole words (case-insensitive)."""
    words = set(_WORD.findall(prediction.lower()))
    return {label for label in labels if label in words}


def _label_reward(labels: list[str]) -> Callable[[str, Example], float]:
    def reward(prediction: str, example: Example) -> float:
        """100 when the response names exactly one label of the task and it is the gold one ("It is joy.",
        "Joy", "joy" all answer joy; "joy or fear" answers nothing). More lenient than TRACE's raw string
        equality, which would need one surface form; the set of labels is stated in the prompt."""
        named = named_labels(prediction, labels)
        return 100.0 if len(named) == 1 and named == named_labels(example.answer, labels) else 0.0

    return reward


reward_emotion = _label_reward(EMOTION_LABELS)
reward_topic = _label_reward(TOPIC_LABELS)


# ------------------------------------------------------------------------------------- arithmetic
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]


# Varied style: the working in several forms (symbolic, in words, reordered, or none), always ending in the
# number; {e} is the symbolic equation, {w} the operation in words, {n} the result.
ARITH_FORMS = [
    "{e}. The answer is {n}.",
    "{w} gives {n}. The answer is {n}.",
    "We compute {e}, so the answer is {n}.",
    "The answer is {n}, since {e}.",
    "{e}",
    "The answer is {n}.",
]


def gen_arithmetic(rng: random.Random, style: str = "fixed"):
    p, item = rng.choice(PEOPLE), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        q = f"{p} has {a} {item} and gets {b} more. How many {item} does {p} have now?"
        eq, words, ans = f"{a} + {b} = {a + b}", f"Adding {b} to {a}", a + b
    elif kind == "sub":
        a = rng.randint(10, 40)
        b = rng.randint(1, a - 1)
        q = f"{p} has {a} {item} and gives away {b}. How many {item} are left?"
        eq, words, ans = f"{a} - {b} = {a - b}", f"Taking {b} from {a}", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{p} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?"
        eq, words, ans = f"{a} x {b} = {a * b}", f"Multiplying {a} by {b}", a * b
    if style == "fixed":
        return f"Solve the problem.\n{q}", f"{eq}. The answer is {ans}.", None
    prompt = f"Solve the problem. Keep it short and end with the number.\n{q}"
    return prompt, rng.choice(ARITH_FORMS).format(e=eq, w=words, n=ans), None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number written in ``text`` (commas as thousands separators dropped), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def reward_final_number(prediction: str, example: Example) -> float:
    """100 when the last number of the prediction equals the gold answer's, else 0: any working is allowed."""
    got, want = final_number(prediction), final_number(example.answer)
    return 100.0 if got is not None and want is not None and float(got) == float(want) else 0.0


# ---------------------------------------------------------------------------------------- summary
BODIES = ["parks committee", "city council", "school board", "transport committee", "library board", "housing committee"]
PROPOSALS = [
    "a new playground in {place}",
    "longer opening hours for {place}",
    "a bike lane on {place}",
    "repairs to the roof of {place}",
    "a summer festival at {place}",
    "more street lights near {place}",
]
PLACES = ["Elm Park", "Main Street", "the north library", "Riverside", "Oak Avenue", "the old station", "Hill Road"]
MONTHS = ["January", "March", "May", "July", "September", "November"]


def gen_summary(rng: random.Random, style: str = "fixed"):
    body, proposal, place = rng.choice(BODIES), rng.choice(PROPOSALS), rng.choice(PLACES)
    who = rng.choice(PEOPLE)
    yes = rng.randint(3, 8)
    no = rng.randint(0, yes - 1) if rng.random() < 0.7 else rng.randint(yes + 1, 9)
    passed = yes > no
    month, cost = rng.choice(MONTHS), rng.choice([12, 25, 40, 60, 85, 120])
    what = proposal.format(place=place)
    note = (
        f"The {body} met on {rng.choice(['Monday', 'Tuesday', 'Thursday'])}. {who} proposed {what}, "
        f"which would cost about {cost} thousand dollars. After a long discussion the members voted {yes} to {no}. "
        + (f"Work is planned to start in {month}." if passed else "The proposal will not go ahead this year.")
    )
    verdict = "approved" if passed else "rejected"
    if style == "fixed":
        summary = f"The {body} {verdict} {what}, {yes} to {no}."
    else:
        summary = rng.choice(SUMMARY_FORMS).format(body=body, verdict=verdict, what=what, yes=yes, no=no)
    return f"Summarize the meeting note in one sentence.\nNote: {note}", summary, None


SUMMARY_FORMS = [
    "The {body} {verdict} {what}, {yes} to {no}.",
    "By {yes} votes to {no}, the {body} {verdict} {what}.",
    "In a {yes}-{no} vote the {body} {verdict} {what}.",
    "The {body} voted {yes} to {no} and {verdict} {what}.",
]
_VERDICTS = {"approved": ("approved", "passed", "accepted", "backed"), "rejected": ("rejected", "turned down", "declined")}


def accept_summary(prediction: str, example: Example) -> bool:
    """A summary is accepted when it states the right verdict (and not the other one) and both vote counts."""
    text = prediction.lower()
    want = "approved" if any(v in example.answer for v in _VERDICTS["approved"]) else "rejected"
    other = "rejected" if want == "approved" else "approved"
    right = any(v in text for v in _VERDICTS[want]) and not any(v in text for v in _VERDICTS[other])
    counts = _NUMBER.findall(example.answer)[:2]
    return right and all(c in _NUMBER.findall(prediction) for c in counts)


# ----------------------------------------------------------------------------------- science QA
FACTS = [
    ("Which of these is a fruit?", "apple", ["hammer", "bicycle", "pillow", "river", "candle"], "An apple grows on a tree and has seeds."),
    ("Which of these is a mammal?", "dog", ["shark", "eagle", "frog", "snake", "trout"], "Dogs feed their young with milk."),
    ("Which of these is a planet?", "Mars", ["Moon", "Sun", "Sirius", "Halley", "Orion"], "Mars orbits the Sun."),
    ("Which of these is a liquid at room temperature?", "water", ["iron", "salt", "wood", "glass", "stone"], "Water flows at room temperature."),
    ("Which of these is a source of light?", "the Sun", ["a rock", "a spoon", "a leaf", "a shoe", "a cup"], "The Sun makes its own light."),
    ("Which of these is a gas?", "oxygen", ["copper", "sand", "ice", "chalk", "gold"], "Oxygen is a gas we breathe."),
    ("Which of these is a bird?", "sparrow", ["whale", "lizard", "bee", "salmon", "bat"], "A sparrow has feathers and wings."),
    ("Which of these can conduct electricity?", "copper wire", ["rubber band", "wool sock", "plastic cup", "paper bag", "glass jar"], "Copper is a metal that conducts electricity."),
    ("Which of these is a vegetable?", "carrot", ["marble", "kettle", "ladder", "feather", "button"], "A carrot is a root we eat."),
    ("Which of these is an insect?", "ant", ["spider", "worm", "crab", "snail", "mouse"], "An ant has six legs."),
    ("Which of these melts when heated?", "butter", ["sand", "clay pot", "diamond", "granite", "feather"], "Butter melts in a warm pan."),
    ("Which of these is a reptile?", "turtle", ["owl", "cat", "goldfish", "toad", "rabbit"], "A turtle has scales and lays eggs."),
]


def gen_science_qa(rng: random.Random, style: str = "fixed"):
    question, right, wrong, why = rng.choice(FACTS)
    options = rng.sample(wrong, 3) + [right]
    rng.shuffle(options)
    letter = "ABCD"[options.index(right)]
    listed = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
    prompt = f"Answer the science question.\nQuestion: {question}\nOptions:\n{listed}\nGive the letter first."
    return prompt, f"{letter}. {why}", None


def reward_first_char(prediction: str, example: Example) -> float:
    return M.first_char_accuracy(prediction.strip(), example.answer.strip())


# -------------------------------------------------------------------------------------- code line
NAMES = ["items", "values", "numbers", "prices", "scores", "words", "rows", "orders"]
VARS = ["total", "result", "count", "acc", "best", "out"]


def gen_code_line(rng: random.Random, style: str = "fixed"):
    coll, var = rng.choice(NAMES), rng.choice(VARS)
    func = rng.choice(["compute", "collect", "process", "summarize", "build"]) + "_" + coll
    elem = coll[:-1] if coll.endswith("s") else "x"
    kind = rng.choice(["sum", "max", "count", "filter", "map"])
    k = rng.randint(1, 9)
    if kind == "sum":
        body = [f"    {var} = 0", f"    for {elem} in {coll}:", f"        {var} += {elem}"]
        nxt = f"    return {var}"
    elif kind == "max":
        body = [f"    {var} = {coll}[0]", f"    for {elem} in {coll}[1:]:", f"        if {elem} > {var}:"]
        nxt = f"            {var} = {elem}"
    elif kind == "count":
        body = [f"    {var} = 0", f"    for {elem} in {coll}:", f"        if {elem} > {k}:"]
        nxt = f"            {var} += 1"
    elif kind == "filter":
        body = [f"    {var} = []", f"    for {elem} in {coll}:", f"        if {elem} % {k + 1} == 0:"]
        nxt = f"            {var}.append({elem})"
    else:
        body = [f"    {var} = []", f"    for {elem} in {coll}:"]
        nxt = f"        {var}.append({elem} * {k})"
    code = "\n".join([f"def {func}({coll}):"] + body)
    return f"Complete the next line of the Python code.\n{code}", nxt, None


# --------------------------------------------------------------------------------------- simplify
HARD = {
    "commence": "start", "utilize": "use", "approximately": "about", "purchase": "buy", "assist": "help",
    "numerous": "many", "sufficient": "enough", "demonstrate": "show", "obtain": "get", "require": "need",
    "inform": "tell", "terminate": "end", "residence": "home", "additional": "more", "construct": "build",
}
SIMPLE_FRAMES = [
    ("The {org} will {v1} the work on {day}.", ["commence", "terminate"]),
    ("Residents {v1} {adj} time to {v2} a permit.", ["require", "obtain"]),
    ("Volunteers will {v1} the {org} to {v2} a new {obj}.", ["assist", "construct"]),
    ("The {org} plans to {v1} {adj} {obj}s next year.", ["purchase"]),
    ("Please {v1} the {org} before you {v2} the {obj}.", ["inform", "utilize"]),
    ("The report will {v1} that {adj} {obj}s are needed.", ["demonstrate"]),
]
ORGS = ["city", "school", "hospital", "museum", "company", "club"]
OBJS = ["bridge", "bus", "computer", "garden", "shelter", "printer"]
DAYS = ["Monday", "Friday", "the first of June", "next week"]
ADJS = ["numerous", "sufficient", "additional"]


def gen_simplify(rng: random.Random, style: str = "fixed"):
    frame, verbs = rng.choice(SIMPLE_FRAMES)
    fill = dict(org=rng.choice(ORGS), obj=rng.choice(OBJS), day=rng.choice(DAYS), adj=rng.choice(ADJS))
    for i, v in enumerate(verbs, 1):
        fill[f"v{i}"] = v
    if "{v2}" in frame and len(verbs) < 2:
        fill["v2"] = rng.choice(["utilize", "obtain"])
    complex_ = frame.format(**fill)
    # Optionally pad with "approximately N" to vary length.
    if rng.random() < 0.4:
        complex_ = complex_[:-1] + f" within approximately {rng.randint(2, 12)} days."
    simple = " ".join(HARD.get(w.strip(".,").lower(), w.strip(".,")) + ("." if w.endswith(".") else "") for w in complex_.split())
    return f"Rewrite the sentence with simpler words.\nSentence: {complex_}", simple, complex_


def accept_simplify(prediction: str, example: Example) -> bool:
    """A simplification is accepted when it changes the sentence and no hard word of it is left."""
    words = {w.strip(".,").lower() for w in prediction.split()}
    return " ".join(prediction.split()) != " ".join((example.source or "").split()) and not words & set(HARD)


def accept_code_line(prediction: str, example: Example) -> bool:
    """A code line is accepted when it is the gold line up to whitespace (edit similarity passes constant lines)."""
    return " ".join(prediction.split()) == " ".join(example.answer.split())


def reward_sari(prediction: str, example: Example) -> float:
    return M.sari(prediction, example.answer, example.source or "")


# ---------------------------------------------------------------------------------- general set
GENERAL_WORDS = ["river", "garden", "window", "planet", "market", "silver", "castle", "forest", "pencil", "rocket"]


def gen_general(rng: random.Random, style: str = "fixed"):
    """Short instruction following, in no task of the stream (held out, never trained on)."""
    kind = rng.choice(["upper", "repeat", "first_word", "plural"])
    w = rng.choice(GENERAL_WORDS)
    if kind == "upper":
        return f"Write the word '{w}' in capital letters. Reply with the word only.", w.upper(), None
    if kind == "repeat":
        phrase = " ".join(rng.sample(GENERAL_WORDS, 3))
        return f"Repeat exactly: {phrase}", phrase, None
    if kind == "first_word":
        words = rng.sample(GENERAL_WORDS, 4)
        return f"What is the first word of this list: {', '.join(words)}? Reply with the word only.", words[0], None
    return f"What is the plural of '{w}'? Reply with the word only.", w + "s", None


def reward_general(prediction: str, example: Example) -> float:
    """Exact match after trimming whitespace, quotes and final punctuation (the instruction asks for the bare word).
    The ``fixed`` stream's general reward: SmolLM2-135M answers "The answer is market." and scores 0 at every
    stage, so it measures no drift there."""
    return 100.0 if prediction.strip(_TRIM) == example.answer.strip(_TRIM) else 0.0


def _general_words_named(text: str) -> set[str]:
    """The GENERAL_WORDS that ``text`` names as whole words, in any case, singular or plural."""
    return {w for w in GENERAL_WORDS if re.search(rf"\b{w}s?\b", text, flags=re.IGNORECASE)}


def reward_general_named(prediction: str, example: Example) -> float:
    """100 when the prediction contains the answer (case-sensitive, as whole words: "FOREST" for the capitals
    prompt, "window river pencil" in this order for the repeat prompt) and names no other word of the set's
    vocabulary (so repeating the whole list, or a wrong plural beside the right one, scores 0); else 0.
    The ``varied`` stream's general reward: "The answer is market." answers "market" as the bare word does,
    like the stream's lenient label rewards.

    >>> ex = Example("g", "general", "What is the first word of this list: market, planet, ...?", "market")
    >>> reward_general_named("The answer is market.", ex), reward_general_named("market, planet", ex)
    (100.0, 0.0)
    """
    if not re.search(rf"(?<!\w){re.escape(example.answer.strip(_TRIM))}(?!\w)", prediction):
        return 0.0
    return 100.0 if _general_words_named(prediction) <= _general_words_named(example.answer) else 0.0


# ------------------------------------------------------------------------------------- registry
def reward_exact(prediction: str, example: Example) -> float:
    """Exact match after stripping surrounding whitespace and final punctuation, ignoring case (TRACE's exact
    match does neither; here "Joy." answers "joy" as well as "joy" does)."""
    return M.exact_match(prediction.strip(_TRIM).lower(), example.answer.strip(_TRIM).lower())


def reward_rouge_l(prediction: str, example: Example) -> float:
    return M.rouge_l(prediction, example.answer)


def reward_edit(prediction: str, example: Example) -> float:
    return M.edit_similarity(prediction, example.answer)


def _one_word(prediction: str) -> bool:
    return len(prediction.strip(_TRIM).split()) == 1


@dataclass(frozen=True)
class TaskSpec:
    """How one task is generated, scored and checked."""

    gen: Callable  # gen(rng, style) -> (prompt, answer, source)
    reward: Callable[[str, Example], float]
    metric: str  # metric name, for ``python -m opr.tools.score``
    max_new_tokens: int
    format_ok: Callable[[str], bool]
    accept: Optional[Callable[[str, Example], bool]] = None  # replay acceptance (Task.accept)


def _names_one(labels: list[str]) -> Callable[[str], bool]:
    return lambda s: len(named_labels(s, labels)) == 1


_fmt_number = lambda s: final_number(s) is not None  # noqa: E731
_fmt_summary = lambda s: 0 < len(s.split()) <= 40  # noqa: E731
_fmt_code = lambda s: s.strip() != "" and "\n" not in s.strip()  # noqa: E731

# ``answer_style="fixed"``: the stream before 2026-12 (one deterministic answer string per prompt; results of
# that time reproduce with ``benchmark=mini_trace_fixed``).
FIXED_TASKS: dict[str, TaskSpec] = {
    "emotion": TaskSpec(gen_emotion, reward_exact, "exact_match", 6, _one_word),
    "arithmetic": TaskSpec(gen_arithmetic, reward_final_number, "final_number", 20, _fmt_number),
    "topic": TaskSpec(gen_topic, reward_exact, "exact_match", 6, _one_word),
    "summary": TaskSpec(gen_summary, reward_rouge_l, "rouge_l", 40, _fmt_summary),
    "science_qa": TaskSpec(gen_science_qa, reward_first_char, "first_char_accuracy", 24, lambda s: s.strip()[:1] in "ABCD"),
    "code_line": TaskSpec(gen_code_line, reward_edit, "edit_similarity", 24, _fmt_code),
    "simplify": TaskSpec(gen_simplify, reward_sari, "sari", 40, lambda s: len(s.split()) >= 3),
}
# ``answer_style="varied"`` (default): gold answers in several surface forms chosen per example, lenient
# label rewards, room for the model's own phrasing, and acceptance checks for replay filtering.
VARIED_TASKS: dict[str, TaskSpec] = {
    "emotion": TaskSpec(gen_emotion, reward_emotion, "label_match", 12, _names_one(EMOTION_LABELS)),
    "arithmetic": TaskSpec(gen_arithmetic, reward_final_number, "final_number", 32, _fmt_number),
    "topic": TaskSpec(gen_topic, reward_topic, "label_match", 12, _names_one(TOPIC_LABELS)),
    "summary": TaskSpec(gen_summary, reward_rouge_l, "rouge_l", 48, _fmt_summary, accept_summary),
    "science_qa": FIXED_TASKS["science_qa"],
    "code_line": TaskSpec(gen_code_line, reward_edit, "edit_similarity", 24, _fmt_code, accept_code_line),
    "simplify": TaskSpec(gen_simplify, reward_sari, "sari", 40, lambda s: len(s.split()) >= 3, accept_simplify),
}
ANSWER_STYLES = {"varied": VARIED_TASKS, "fixed": FIXED_TASKS}
TASKS = VARIED_TASKS
DEFAULT_ORDER = list(TASKS)
# Task name -> metric name, for ``python -m opr.tools.score --benchmark mini_trace`` (the default, varied style).
TASK_METRICS = {name: spec.metric for name, spec in TASKS.items()}
REWARDS = {name: spec.reward for name, spec in TASKS.items()} | {"general": reward_general_named}


def _generate_split(name: str, gen: Callable, n_by_split: dict[str, int], seed: int,
                    style: str = "fixed") -> dict[str, list[Example]]:
    """Draw unique prompts for all splits from one RNG, so no prompt appears in two splits."""
    rng = random.Random(f"{seed}/{name}")
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split, n in n_by_split.items():
        rows: list[Example] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"mini_trace task {name!r} cannot make {n} distinct {split} examples; lower the size")
            prompt, answer, source = gen(rng, style)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(Example(f"{name}/{split}/{len(rows)}", name, prompt, answer, source))
        out[split] = rows
    return out


def load_mini_trace(
    num_tasks: int | None = 3,
    tasks: list[str] | None = None,
    train_size: int = 200,
    eval_size: int = 100,
    test_size: int = 100,
    general_size: int = 50,
    data_seed: int = 1234,
    chat: bool = True,
    answer_style: str = "varied",
    name: str = "mini_trace",
) -> Benchmark:
    """Build the stream: ``tasks`` (names, in order) or the first ``num_tasks`` of the default order.

    ``data_seed`` is the seed of the generated data: it is fixed by default so that runs with different training seeds are
    evaluated on identical examples. ``answer_style``: ``varied`` (gold answers in several surface forms, so a
    correct on-policy answer is usually not the example's own string) or ``fixed`` (one template per task, the
    stream before 2026-12). ``name``: the config's (``build`` passes it); ``mini_trace_fixed`` with an
    ``answer_style`` other than ``fixed`` is refused, so a run's recorded name says which stream it trained on.
    """
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"benchmark.answer_style must be one of {list(ANSWER_STYLES)}, got {answer_style!r}")
    if name == "mini_trace_fixed" and answer_style != "fixed":  # the config's name would mislabel the stream
        raise ValueError(f"benchmark=mini_trace_fixed is the fixed-answer stream, got benchmark.answer_style="
                         f"{answer_style!r}: use benchmark=mini_trace for the {answer_style} stream, or leave "
                         "answer_style at fixed")
    specs = ANSWER_STYLES[answer_style]
    names = list(tasks) if tasks else DEFAULT_ORDER[: num_tasks or len(DEFAULT_ORDER)]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown mini_trace task(s) {unknown}; allowed: {DEFAULT_ORDER}")
    if num_tasks is not None and not tasks and not 1 <= num_tasks <= len(DEFAULT_ORDER):
        raise ValueError(f"benchmark.num_tasks must be between 1 and {len(DEFAULT_ORDER)}, got {num_tasks}")
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark.tasks lists a task twice: {names}")
    stream, manifest = [], {}
    for name in names:
        spec = specs[name]
        splits = _generate_split(name, spec.gen, {"train": train_size, "eval": eval_size, "test": test_size},
                                 data_seed, answer_style)
        stream.append(Task(name, splits["train"], splits["eval"], splits["test"], spec.reward, spec.max_new_tokens,
                           chat, spec.format_ok, spec.accept))
        manifest[name] = {s: _manifest_entry(rows) for s, rows in splits.items()}
    general_split = _generate_split("general", gen_general, {"eval": general_size}, data_seed, answer_style)
    general_reward = reward_general_named if answer_style == "varied" else reward_general
    general = [Task("general", [], general_split["eval"], [], general_reward, 12, chat, None)] if general_size else []
    if general:
        manifest["general"] = {"eval": _manifest_entry(general_split["eval"])}
    return Benchmark("mini_trace", stream, general, manifest)


def _manifest_entry(rows: list[Example]) -> dict:
    blob = json.dumps([[e.id, e.prompt, e.answer, e.source] for e in rows], ensure_ascii=False).encode()
    return {"records": len(rows), "sha256": hashlib.sha256(blob).hexdigest()}
