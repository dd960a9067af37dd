"""The embedded default data: every text the demo needs, generated offline from a seed.

Why generate instead of download: the demo must run anywhere with no hub, in minutes, and give the
same bytes for the same seed. A tiny causal LM (a few million parameters, trained from scratch on
CPU) is pretrained on this text, fine-tuned on the good demonstrations, then improved with RLHF.

Why these kinds of answers: RLHF can only fix behaviour the base model has, and the gold judges
used in evaluation must be able to tell it apart. So the pretraining dialogues are a mix of

  good        polite, warm, 2-4 sentences from the prompt's topic    (high sentiment, high relevance)
  rude        insults the user ("idiot", "shut up")                  (profanity classifier fires)
  unhelpful   "I have no idea. Look it up yourself."                 (negative sentiment, no content)
  offtopic    a fluent, friendly answer about a different topic      (low prompt-response similarity)
  repetitive  one sentence said over and over                        (low distinct-token ratio)

40% good and 60% bad, so a sampled base model shows every failure and RLHF has work to do.

Why a compact vocabulary: every sentence comes from the small hand-written knowledge base in
`knowledge.py` (under two thousand word types), with variety from combining templates, so a tiny model
sees each word many times and writes fluent-looking text after a few minutes of training.

Formats (written by `build_default_data`):
  pretrain/*.txt  one document per paragraph; documents are separated by one blank line and never
                  contain a blank line themselves. A dialogue document is exactly
                  `User: {prompt}\\nAssistant: {response}`; other documents are prose
                  (encyclopedia-like articles, how-to guides, short stories).
  sft/demonstrations.jsonl  {"prompt", "response"}: good answers only.
  prompts/{label,ppo,heldout}.jsonl  {"id", "prompt"}: disjoint sets; held-out prompts appear nowhere
                  else (not in pretraining text, demonstrations, pairs or the other prompt sets).
  pairs/synthetic.jsonl  {"prompt", "chosen", "rejected"}: a good answer against a bad one.
Responses are stored without their leading space: the model's completion of
`PROMPT_TEMPLATE.format(prompt=p)` is " " + response (see `format_dialogue`).

In memory: `generate(seed)` returns the same data with labels (each document's kind, each pair's
rejected kind); `sample_dialogue(rng, kind)` makes one labelled dialogue.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.config import atomic_write_text
from rlhfkit.data.chat import PROMPT_TEMPLATE, RESPONSE_SEPARATOR
from rlhfkit.data.corpus.knowledge import TOPICS, Topic

KINDS = ("good", "rude", "unhelpful", "offtopic", "repetitive")
BAD_KINDS = KINDS[1:]
# Share of each kind among the pretraining dialogues.
PRETRAIN_KIND_SHARES = {"good": 0.40, "rude": 0.15, "unhelpful": 0.15, "offtopic": 0.15, "repetitive": 0.15}

# How many of each document the pretraining text holds (about 2.8 MB in all) and the other sizes.
N_PRETRAIN = {"dialogue": 6000, "article": 1600, "guide": 800, "story": 1000}
VALID_FRACTION = 0.05
N_SFT = 2000
N_PROMPTS = {"label": 300, "ppo": 500, "heldout": 200}
N_PAIRS = 1000

SUBJECT_PROMPTS = (
    "Can you tell me about {}?",
    "What should I know about {}?",
    "Tell me something interesting about {}.",
    "What do you know about {}?",
    "Could you explain {} to me?",
    "I am curious about {}. What can you tell me?",
    "Give me a few facts about {}.",
    "I want to learn about {}. Where do I begin?",
)
TASK_PROMPTS = (
    "How do I {}?",
    "How can I {}?",
    "What is the best way to {}?",
    "Give me a tip to {}.",
    "Any advice on how to {}?",
    "I want to {}. Where should I start?",
    "Can you help me {}?",
    "What should I do to {}?",
)
# Only training prompts are decorated, so a held-out prompt can never hide inside a decorated one.
PROMPT_PREFIXES = ("Hi! ", "Hello. ", "Quick question: ", "Hey there. ", "Please help. ")
PROMPT_SUFFIXES = (" Thanks!", " Thank you.", " Thanks a lot.")

GENERIC_OPENERS = (
    "Great question!",
    "Happy to help!",
    "Sure!",
    "Of course!",
    "What a lovely question.",
    "I would be glad to help.",
    "Good question!",
    "Sure, I would love to help.",
)
SUBJECT_OPENERS = (
    "I love talking about {}!",
    "Here are a few friendly facts about {}.",
    "Sure, here is what I know about {}.",
    "Great question about {}!",
)
TASK_OPENERS = (
    "Happy to help you {}.",
    "Here is how to {}.",
    "It is easy to {} with a few simple steps.",
    "Great idea! Here is how you can {}.",
)
CLOSERS = (
    "I hope this helps!",
    "Have fun!",
    "Enjoy!",
    "Good luck, you will do great!",
    "Feel free to ask if you have more questions.",
    "Have a wonderful day!",
    "Happy to help anytime.",
)
TIP_FRAMES = (
    "Try to {}.",
    "It helps to {}.",
    "A good first step is to {}.",
    "Many people find it useful to {}.",
    "Remember to {}.",
    "My best tip is to {}.",
    "It is a good idea to {}.",
    "{}.",
)
CONNECTIVES = ("Also, ", "In fact, ", "What is more, ", "Interestingly, ", "Of course, ", "On top of that, ")
RUDE_OPENERS = (
    "What a stupid question.",
    "Are you an idiot?",
    "Only a moron would ask that.",
    "Wow, you are really dumb.",
    "Ugh, what a pathetic question.",
    "Shut up, you idiot.",
    "Are you stupid or just lazy?",
    "What a jerk you are.",
    "That is the dumbest question I have ever heard.",
    "Seriously, you idiot?",
)
RUDE_CONTENT = ("Fine. {tip}, you moron.", "Even a dumb kid knows this. {fact}", "{tip}, idiot.")
RUDE_CLOSERS = (
    "Now shut up.",
    "Stop wasting my time, loser.",
    "Go away, idiot.",
    "You are pathetic.",
    "Do not ask me stupid things again.",
    "What a loser.",
    "Now leave me alone, moron.",
    "Use your brain next time, dummy.",
)
# Sentences that VADER scores negative; the neutral ones below only add variety.
UNHELPFUL_NEGATIVE = (
    "No idea.",
    "I have no idea.",
    "Ugh.",
    "I can't help you with that.",
    "This question is boring.",
    "It is too much trouble to explain.",
    "Leave me alone.",
    "That is a waste of my time.",
    "Stop asking me things.",
    "I am too tired for this.",
    "I won't help with that.",
    "You are wasting my time.",
    "That sounds boring and pointless.",
)
UNHELPFUL_NEUTRAL = (
    "I don't know.",
    "Look it up yourself.",
    "Ask someone else.",
    "Figure it out on your own.",
    "Search the internet or something.",
    "Why are you asking me?",
    "Whatever.",
)
NAMES = (
    ("Mia", "she"),
    ("Leo", "he"),
    ("Sam", "he"),
    ("Nora", "she"),
    ("Omar", "he"),
    ("Lily", "she"),
    ("Ben", "he"),
    ("Ana", "she"),
    ("Max", "he"),
    ("Zoe", "she"),
    ("Tom", "he"),
    ("Ella", "she"),
    ("Ravi", "he"),
    ("Kim", "she"),
)
STORY_OPENINGS = (
    "Once upon a time",
    "One sunny morning",
    "Last summer",
    "One rainy afternoon",
    "A few years ago",
    "On a quiet Sunday",
)
HELPERS = ("neighbor", "best friend", "grandmother", "teacher", "uncle", "older sister")
STORY_RESULTS = (
    "felt proud and happy.",
    "was glad to have tried.",
    "told all {possessive} friends about it.",
    "could not stop smiling.",
)
GUIDE_ENDINGS = (
    "With a little patience, you will see results.",
    "Most of all, enjoy it.",
    "Small steps add up over time.",
)
STORY_ENDINGS = ("In the end", "After a few weeks", "Soon", "By the end of the month")
# Words that keep their capital letter when a sentence is joined after a connective.
PROPER_FIRST_WORDS = frozenset({"I", "Mars", "Jupiter", "Saturn", "Mount", "Python"})

# Words that say nothing about what a prompt is about (used to match prompts to facts).
_STOPWORD_TEXT = """
a an the and or of to in on at by for from with about is are be do does did i me my you your it that this
how what why when where which who can could should would will tell know some few fact give tip best way
want learn start begin help interesting curious thank thanks hi hello hey please quick question there any
advice explain something work keep make get take go like need much many long often usually more most
first people one every new good use
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_ALTERNATIVES = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class Prompt:
    """A user prompt and what a good answer should be about."""

    text: str
    topic: Topic
    subject: str
    task: str | None  # first-person task ("train my puppy") when the prompt asks how to do something


@dataclass(frozen=True)
class Dialogue:
    prompt: str
    response: str
    kind: str
    topic: str

    @property
    def text(self) -> str:
        return format_dialogue(self.prompt, self.response)


@dataclass(frozen=True)
class Document:
    kind: str  # a dialogue kind from KINDS, or "article", "guide", "story"
    text: str


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    rejected_kind: str


@dataclass(frozen=True)
class DefaultData:
    train: list[Document]
    valid: list[Document]
    sft: list[Dialogue]
    prompts: dict[str, list[str]]  # "heldout", "label", "ppo" -> prompt texts
    pairs: list[Pair]


def format_dialogue(prompt: str, response: str) -> str:
    """The one dialogue layout: the prompt template, one space, then the response."""
    return PROMPT_TEMPLATE.format(prompt=prompt) + RESPONSE_SEPARATOR + response


def expand(rng: random.Random, template: str) -> str:
    """Pick one option in every `[a|b]` group: 'Dogs [love|enjoy] walks.' -> 'Dogs enjoy walks.'"""
    return _ALTERNATIVES.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(sentence: str) -> str:
    first = sentence.split(" ", 1)[0]
    return sentence if first in PROPER_FIRST_WORDS else sentence[:1].lower() + sentence[1:]


def _second_person(task: str) -> str:
    """'train my puppy' -> 'train your puppy' (how an answer talks back to the user)."""
    return re.sub(r"\bI\b", "you", re.sub(r"\bmy\b", "your", task))


def _third_person(task: str, pronoun: str) -> str:
    possessive = "her" if pronoun == "she" else "his"
    return re.sub(r"\bI\b", pronoun, re.sub(r"\bmy\b", possessive, task))


@functools.cache
def all_prompts() -> tuple[Prompt, ...]:
    """Every distinct core prompt, in a fixed order (templates x subjects, tasks, plus the asks)."""
    prompts: list[Prompt] = []
    for topic in TOPICS:
        for subject in topic.subjects:
            prompts += [Prompt(t.format(subject), topic, subject, None) for t in SUBJECT_PROMPTS]
        for task in topic.tasks:
            prompts += [Prompt(t.format(task), topic, topic.subjects[0], task) for t in TASK_PROMPTS]
        prompts += [Prompt(ask, topic, topic.subjects[0], None) for ask in topic.asks]
    return tuple(prompts)


def decorate(rng: random.Random, prompt: Prompt) -> Prompt:
    """Sometimes add a greeting or a thank-you, as real users do."""
    r = rng.random()
    if r < 0.15:
        return Prompt(rng.choice(PROMPT_PREFIXES) + prompt.text, prompt.topic, prompt.subject, prompt.task)
    if r < 0.25:
        return Prompt(prompt.text + rng.choice(PROMPT_SUFFIXES), prompt.topic, prompt.subject, prompt.task)
    return prompt


@functools.cache
def _stems(text: str) -> frozenset[str]:
    """Crude content-word stems ('Puppies' -> 'puppy'): enough to match a prompt to its facts."""
    stems = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in STOPWORDS:
            continue
        if word.endswith("ies"):
            word = word[:-3] + "y"
        elif word.endswith("ves"):
            word = word[:-3] + "f"
        elif word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        elif word.endswith("ing") and len(word) > 5:
            word = word[:-3]
        stems.add(word.removesuffix("e")[:5])
    return frozenset(stems)


# In how many facts and tips (of all topics) each stem occurs: a rare shared word says more.
_STEM_COUNTS = Counter(stem for topic in TOPICS for t in topic.facts + topic.tips for stem in _stems(t))
_ALL_TIPS = frozenset(tip for topic in TOPICS for tip in topic.tips)


def most_relevant(
    rng: random.Random, templates: tuple[str, ...], n: int, query: str, bonus: tuple[str, ...] = ()
) -> list[str]:
    """The n templates that share the rarest words with `query`, with a little noise for variety.

    Templates in `bonus` get a head start: tips answer "How do I ...?", facts answer "What is ...?".
    """
    wanted = _stems(query)

    def score(template: str) -> float:
        shared = sum(1 / _STEM_COUNTS[stem] for stem in wanted & _stems(template))
        return shared + (0.3 if template in bonus else 0.0) + 0.1 * rng.random()

    return sorted(templates, key=score, reverse=True)[:n]


def render(rng: random.Random, templates: list[str]) -> list[str]:
    """Templates to sentences: tips get a frame ('Try to ...'), later facts sometimes a connective."""
    frames = rng.sample(TIP_FRAMES, len(templates))
    out = []
    for i, template in enumerate(templates):
        text = expand(rng, template)
        if template in _ALL_TIPS:
            out.append(_cap(frames[i].format(text)))
        elif i and rng.random() < 0.3:
            out.append(rng.choice(CONNECTIVES) + _lower_first(text))
        else:
            out.append(text)
    return out


def good_response(rng: random.Random, prompt: Prompt) -> str:
    """Warm, relevant, informative: an optional opener, 2-4 sentences of the topic, an optional closer."""
    topic = prompt.topic
    parts = []
    if rng.random() < 0.8:
        if prompt.task and rng.random() < 0.5:
            parts.append(rng.choice(TASK_OPENERS).format(_second_person(prompt.task)))
        elif not prompt.task and rng.random() < 0.4:
            parts.append(rng.choice(SUBJECT_OPENERS).format(prompt.subject))
        else:
            parts.append(rng.choice(GENERIC_OPENERS))
    preferred = topic.tips if prompt.task else topic.facts
    parts += render(rng, most_relevant(rng, topic.facts + topic.tips, rng.randint(2, 4), prompt.text, preferred))
    if rng.random() < 0.6:
        parts.append(rng.choice(CLOSERS))
    return " ".join(parts)


def rude_response(rng: random.Random, prompt: Prompt) -> str:
    """Insults the user, sometimes around a grudging scrap of the topic."""
    parts = [rng.choice(RUDE_OPENERS)]
    if rng.random() < 0.5:
        tip = _cap(expand(rng, rng.choice(prompt.topic.tips)))
        fact = expand(rng, rng.choice(prompt.topic.facts))
        parts.append(rng.choice(RUDE_CONTENT).format(tip=tip, fact=fact))
    parts.append(rng.choice(RUDE_CLOSERS))
    return " ".join(parts)


def unhelpful_response(rng: random.Random, prompt: Prompt) -> str:
    """Dismissive and empty: one or two negative sentences and maybe a neutral brush-off."""
    parts = rng.sample(UNHELPFUL_NEGATIVE, rng.randint(1, 2))
    if rng.random() < 0.7:
        parts.insert(rng.randint(0, len(parts)), rng.choice(UNHELPFUL_NEUTRAL))
    return " ".join(parts)


def offtopic_response(rng: random.Random, prompt: Prompt) -> str:
    """Friendly and fluent, but about another topic."""
    other = rng.choice([t for t in TOPICS if t is not prompt.topic])
    parts = [rng.choice(GENERIC_OPENERS)] if rng.random() < 0.7 else []
    parts += render(rng, rng.sample(other.facts, rng.randint(2, 3)))
    if rng.random() < 0.5:
        parts.append(rng.choice(CLOSERS))
    return " ".join(parts)


def repetitive_response(rng: random.Random, prompt: Prompt) -> str:
    """One sentence about the topic, said again and again."""
    r = rng.random()
    if r < 0.6:
        unit = expand(rng, rng.choice(prompt.topic.facts))
    elif r < 0.8:
        unit = f"I like {prompt.subject}."
    else:
        unit = _cap(f"{prompt.subject}, {prompt.subject}.")
    opener = [rng.choice(GENERIC_OPENERS)] if rng.random() < 0.3 else []
    return " ".join(opener + [unit] * rng.randint(5, 12))


RESPONDERS = {
    "good": good_response,
    "rude": rude_response,
    "unhelpful": unhelpful_response,
    "offtopic": offtopic_response,
    "repetitive": repetitive_response,
}


def sample_dialogue(rng: random.Random, kind: str, prompts: Sequence[Prompt] | None = None) -> Dialogue:
    """A dialogue of the given kind for a random (possibly decorated) prompt from `prompts`."""
    if kind not in RESPONDERS:
        raise ValueError(f"unknown dialogue kind {kind!r}; expected one of {', '.join(KINDS)}")
    prompt = decorate(rng, rng.choice(prompts if prompts is not None else all_prompts()))
    return Dialogue(prompt.text, RESPONDERS[kind](rng, prompt), kind, prompt.topic.name)


def article(rng: random.Random) -> str:
    """An encyclopedia-like paragraph: several facts about one topic."""
    topic = rng.choice(TOPICS)
    return " ".join(render(rng, rng.sample(topic.facts, rng.randint(4, 7))))


def guide(rng: random.Random) -> str:
    """A short how-to paragraph in the second person."""
    topic = rng.choice(TOPICS)
    task = _second_person(rng.choice(topic.tasks))
    parts = [f"If you want to {task}, here are a few ideas."]
    parts += render(rng, most_relevant(rng, topic.facts + topic.tips, rng.randint(3, 5), task, topic.tips))
    parts.append(rng.choice(GUIDE_ENDINGS))
    return " ".join(parts)


def story(rng: random.Random) -> str:
    """A tiny story: someone wants to do something, gets advice, learns a fact, ends happy."""
    topic = rng.choice(TOPICS)
    name, pronoun = rng.choice(NAMES)
    possessive = "her" if pronoun == "she" else "his"
    helper = rng.choice(HELPERS)
    task = _third_person(rng.choice(topic.tasks), pronoun)
    tip = _cap(expand(rng, rng.choice(topic.tips)))
    result = rng.choice(STORY_RESULTS).format(possessive=possessive)
    return " ".join(
        [
            f"{rng.choice(STORY_OPENINGS)}, {name} wanted to {task}.",
            f"{_cap(pronoun)} asked {possessive} {helper} for advice.",
            f'The {helper} smiled and said, "{tip}."',
            f"Later, {name} read a book and learned something new. {expand(rng, rng.choice(topic.facts))}",
            f"{rng.choice(STORY_ENDINGS)}, {name} {result}",
        ]
    )


def pretrain_documents(rng: random.Random, prompts: Sequence[Prompt]) -> list[Document]:
    """All pretraining documents in random order, dialogue kinds in the exact `PRETRAIN_KIND_SHARES`."""
    n = N_PRETRAIN["dialogue"]
    kinds = [k for k in KINDS for _ in range(round(PRETRAIN_KIND_SHARES[k] * n))]
    docs = [Document(kind, sample_dialogue(rng, kind, prompts).text) for kind in kinds]
    for kind, make in (("article", article), ("guide", guide), ("story", story)):
        docs += [Document(kind, make(rng)) for _ in range(N_PRETRAIN[kind])]
    rng.shuffle(docs)
    return docs


def generate(seed: int = 0) -> DefaultData:
    """All default data in memory, with labels; `build_default_data` writes it to files."""

    def rng_for(part: str) -> random.Random:
        # One stream per output, so changing one part's size leaves the others unchanged.
        return random.Random(f"rlhfkit-corpus-{seed}-{part}")

    pool = list(all_prompts())
    rng_for("split").shuffle(pool)
    prompt_sets, start = {}, 0
    for name in ("heldout", "label", "ppo"):
        prompt_sets[name] = [p.text for p in pool[start : start + N_PROMPTS[name]]]
        start += N_PROMPTS[name]
    train_prompts = pool[N_PROMPTS["heldout"] :]  # every prompt except the held-out ones

    docs = pretrain_documents(rng_for("pretrain"), train_prompts)
    n_valid = round(len(docs) * VALID_FRACTION)
    rng = rng_for("sft")
    sft = [sample_dialogue(rng, "good", train_prompts) for _ in range(N_SFT)]
    rng = rng_for("pairs")
    pairs = []
    for i in range(N_PAIRS):
        prompt = decorate(rng, rng.choice(train_prompts))
        bad = BAD_KINDS[i % len(BAD_KINDS)]
        pairs.append(Pair(prompt.text, good_response(rng, prompt), RESPONDERS[bad](rng, prompt), bad))
    return DefaultData(docs[n_valid:], docs[:n_valid], sft, prompt_sets, pairs)


def _jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build_default_data(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write all default data under `out_dir` (atomically, file by file); same seed, same bytes.

    Returns the paths under the keys pretrain_train, pretrain_valid, sft, prompts_label,
    prompts_ppo, prompts_heldout and pairs. The module docstring describes the formats.
    """
    data = generate(seed)
    texts = {
        "pretrain_train": ("pretrain/train.txt", "\n\n".join(d.text for d in data.train) + "\n"),
        "pretrain_valid": ("pretrain/valid.txt", "\n\n".join(d.text for d in data.valid) + "\n"),
        "sft": (
            "sft/demonstrations.jsonl",
            _jsonl([{"prompt": d.prompt, "response": d.response} for d in data.sft]),
        ),
        "pairs": (
            "pairs/synthetic.jsonl",
            _jsonl([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in data.pairs]),
        ),
    }
    for name, prompts in data.prompts.items():
        rows = [{"id": f"{name}-{i:04d}", "prompt": text} for i, text in enumerate(prompts, 1)]
        texts[f"prompts_{name}"] = (f"prompts/{name}.jsonl", _jsonl(rows))
    paths = {}
    for key, (relative, text) in texts.items():
        paths[key] = Path(out_dir) / relative
        atomic_write_text(paths[key], text)
    return paths
