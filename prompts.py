"""Every prompt, prefix and text parser of TinyLLM (Tian et al., arXiv 2402.04616), in one place.

Teachers (§3.2, Eq. 1): R^m = T^m(Q, O, A, P), a teacher-forcing chain-of-thought prompt with the gold
answer A and k in-context examples P. The template follows the official repository's README
(YikunHan42/TinyLLM, "2.1 Obtaining Rationales"): Question / Options / Answer / Rationale, "Let's think
step by step.", with two in-context examples of the same dataset.

Student (§3.3, Eq. 2-4): the input is "p ⊕ Q ⊕ O" with a task prefix p: p_A for the answer and one p_m
per teacher. Q ⊕ O is formatted exactly as the official data_utils.py does ("<question>\\nAnswer
Choices:\\n(a) ...\\n(b) ..."), and the official tiny.py uses the prefixes "predict: " (answer),
"explain: " (FLAN-T5 rationale) and "rationale: " (LLaMA-2 rationale); TEACHER_PREFIXES maps the paper's
two teacher names to those, any other teacher gets a prefix derived from its name.

Release importer: the release's llm/{split}_CoT_{k}.json strings are
"<FLAN-T5 rationale> Thus, the answer is (x) <choice>\\n\\nQ: <question>\\nAnswer Choices:\\n(a) ...
[\\nA: Let's think step by step.] llama rationale: <LLaMA-2 rationale>"; parse_release splits them the way
the official data_utils.py does, and checks the embedded question against the aligned example.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence

from data import Example

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COT_TRIGGER = "Let's think step by step."

# ----------------------------------------------------------------------------- teacher prompts (§3.2)


def format_options(options: Sequence[str]) -> str:
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options: at most {len(LETTERS)} can be lettered")
    return "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))


def _block(example: Example, with_answer: bool) -> str:
    lines = [f"Question: {example.question}", "Options:", format_options(example.options)]
    if with_answer:
        # The README's template gives the bare letter ("Answer: d"); the letter plus the option text
        # leaves the teacher no room to misread which option is meant.
        lines.append(f"Answer: ({LETTERS[example.answer]}) {example.answer_text}")
    return "\n".join(lines)


def teacher_prompt(example: Example, context: Sequence[Example], teacher_forcing: bool = True) -> str:
    """Eq. 1: the in-context examples P (question, options, answer; no rationale, none is known for
    them), then the example with its gold answer A (teacher forcing) and "Rationale: Let's think step
    by step." for the teacher to continue. teacher_forcing=False withholds A (plain CoT, the ablation);
    context=[] is the k = 0 ablation."""
    blocks = [_block(other, with_answer=True) for other in context]
    blocks.append(_block(example, with_answer=teacher_forcing) + f"\nRationale: {COT_TRIGGER}")
    return "\n\n".join(blocks)


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- student inputs (§3.3)

ANSWER_PREFIX = "predict: "  # p_A, as the official tiny.py
# p_m of the paper's two teachers, as the official tiny.py ("explain: " FLAN-T5, "rationale: " LLaMA-2)
TEACHER_PREFIXES: dict[str, str] = {"flan-t5-xl": "explain: ", "llama-2": "rationale: "}


def teacher_prefix(name: str, prefixes: Mapping[str, str] = TEACHER_PREFIXES) -> str:
    """p_m for teacher `name`: `prefixes[name]` when given (pass {} to derive every prefix), else
    "explain <name>: ", so that every teacher's task is told apart from p_A and from the others."""
    if name in prefixes:
        return prefixes[name]
    if not name.strip():
        raise ValueError("teacher name must be non-empty: it is the teacher's task prefix")
    return f"explain {name.strip()}: "


def student_input(example: Example, prefix: str, boundary: str = "") -> str:
    """p ⊕ Q ⊕ O in the official code's format (a T5 student: the encoder's whole input).

    A decoder-only student reads its target right after this text, so `boundary`, a last line that names
    what follows ("Answer:", "Rationale (llama-2):"), marks where the input ends: without it the model
    sees "...(d) <last option><target>" and cannot tell an option from its answer."""
    text = f"{prefix}{example.question}\nAnswer Choices:\n{format_options(example.options)}"
    return f"{text}\n{boundary}\n" if boundary else text


ANSWER_BOUNDARY = "Answer:"


def task_boundary(task: str, answer_task: str = "answer") -> str:
    """The decoder-only boundary line of a task: one per task prefix, so the line itself says which
    target follows, the answer or teacher m's rationale."""
    return ANSWER_BOUNDARY if task == answer_task else f"Rationale ({task}):"


def answer_target(example: Example) -> str:
    """The target of L_A (Eq. 3). The answer text, as the official code (label = example['answer'])
    and as its accuracy (decoded prediction == label text) is computed, so results compare with the
    paper's Table 1; parse_answer maps generated text back to an option. "(x) text" would make the
    letter the first decoded token, but ties the target to option order, which the paper does not."""
    return example.answer_text


# ----------------------------------------------------------------------------- parsing answers

_QUOTES = "\"'`“”‘’«»"


def normalize(text: str) -> str:
    """Lower case, NFKC, whitespace collapsed, surrounding quotes and trailing punctuation removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = " ".join(text.split())
    text = text.strip(_QUOTES + " ").rstrip(".!;,").strip(_QUOTES + " ")
    return text


# "the answer is", "answer:", "the correct answer is" ... at the start of an output
_LEAD_IN = re.compile(r"^(?:so,?\s+|thus,?\s+|therefore,?\s+)?(?:the\s+)?(?:correct\s+|final\s+|best\s+)?"
                      r"(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*", re.I)
# an explicit letter: "(b)", "b)", "(b", "b", "b.", "b:" with nothing but the option text after it
_LETTER = re.compile(r"^[(\[]?([a-z])(?:[)\]]|[.:](?=\s|$)|(?=$))\s*(.*)$", re.I | re.S)
# a bare letter followed by a space ("b because ..."), accepted only in stated answers, never "a"
_BARE_LETTER = re.compile(r"^[\"'“‘]?([b-z])[\"'”’]?(?=[\s,.;:)!]|$)", re.I)


def _contains(haystack: str, needle: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


def _by_text(text: str, options: Sequence[str]) -> int | None:
    """Exact match after normalisation, else a unique containment (either way round)."""
    norm = [normalize(option) for option in options]
    exact = [i for i, option in enumerate(norm) if option == text]
    if len(exact) == 1:
        return exact[0]
    if exact or not text:
        return None
    inside = [i for i, option in enumerate(norm) if option and _contains(text, option)]
    # "lung cell" in an output that also contains "cell": keep the longest match only
    inside = [i for i in inside if not any(i != j and norm[i] in norm[j] for j in inside)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        return None
    if len(text) >= 3:  # a truncated generation ("quit eating lunch") inside exactly one option
        around = [i for i, option in enumerate(norm) if _contains(option, text)]
        if len(around) == 1:
            return around[0]
    return None


def parse_answer(text: str, options: Sequence[str]) -> int | None:
    """Map a generated answer to an option index: exact text after normalisation, a letter such as
    "(b)" / "b)" / "Answer: B", "(b) <text>" (letter and text must agree), or a unique containment.
    None when no option, or more than one, fits."""
    text = normalize(text)
    exact = [i for i, option in enumerate(options) if normalize(option) == text]
    if len(exact) == 1:  # exact text first: an option may itself look like "a" or "b)"
        return exact[0]
    text = normalize(_LEAD_IN.sub("", text, count=1))
    letter = _LETTER.match(text)
    if letter and LETTERS.index(letter.group(1).lower()) < len(options):
        index = LETTERS.index(letter.group(1).lower())
        rest = normalize(letter.group(2))
        by_text = _by_text(rest, options) if rest else None
        return index if by_text in (None, index) else None  # "(b) <text of option a>": contradictory
    return _by_text(text, options)


_STATED = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+|best\s+|right\s+)?answer\s*(?:is\b|would\s+be\b|:)\s*:?\s*",
                     re.I)


def stated_answer(rationale: str, options: Sequence[str]) -> int | None:
    """The answer a teacher states in its rationale ("Thus, the answer is (d) ...", "the answer is b",
    "Answer: (c)"): the last such statement that names an option, else None. Used for standard KD and
    to report teacher-gold agreement."""
    for match in reversed(list(_STATED.finditer(rationale))):
        tail = rationale[match.end():]
        sentence = re.split(r"\n|(?<=[.!?])\s+(?=[A-Z(])", tail.strip(), maxsplit=1)[0]
        letter = re.match(r"^[\"'“‘]?[(\[]([a-z])[)\]]", sentence, re.I) or _BARE_LETTER.match(sentence)
        if letter:
            index = LETTERS.index(letter.group(1).lower())
            if index < len(options):
                return index
        index = parse_answer(sentence, options)
        if index is not None:
            return index
    return None


# ----------------------------------------------------------------------------- cleaning rationales

# The model writing the next example: a new "Question:" / "Q:" at the start of a line or of a sentence, or
# a markdown heading that opens one ("### Question: ...", "### Q2", "### 10.", a bare "###"), as about 5% of
# the paper's LLaMA-2 rationales do (OBQA, ARC). Headings such as "### Explanation:" keep their text.
_NEW_QUESTION = re.compile(r"(?:^|\n|(?<=[.!?])[ \t])[ \t]*(?:Question|QUESTION|Q)[ \t]*:"
                           r"|(?<!#)#{2,}(?!#)[ \t]*(?:Questions?\b|QUESTIONS?\b|Q\b|Q?\.?[ \t]*\d|(?=\n)|$)")
CLEANING = 2  # clean_rationale's version: in the release teacher's cache settings, so a change re-reads them
_LEADING = re.compile(r"^\s*(?:rationale\s*:\s*)?(?:let['’]s\s+think\s+step\s+by\s+step\.?\s*)?", re.I)


def clean_rationale(raw: str, prompt: str = "") -> str:
    """A generated rationale ready to be a student target: the prompt echo removed (decoder-only
    models return prompt + continuation), a leading "Let's think step by step." removed, cut where
    the model starts a new question ("Question:" / "Q:"), whitespace collapsed."""
    text = raw
    if prompt:
        echo = prompt.strip()
        at = text.find(echo)
        if at != -1:
            text = text[at + len(echo):]
    text = _LEADING.sub("", text, count=1)
    cut = _NEW_QUESTION.search(text)
    if cut:
        text = text[:cut.start()]
    return " ".join(text.split())


def is_degenerate(text: str, min_words: int = 3) -> bool:
    """Flag a rationale not worth training on: empty, shorter than `min_words` words, or heavily
    repetitive (half of its sentences are repeats, under a third of its 4-grams are distinct, or one
    3-gram, 4 times or more, covers 40% of its words)."""
    words = text.lower().split()
    if len(words) < min_words:
        return True
    sentences = [" ".join(s.split()) for s in re.split(r"[.!?\n]+", text.lower()) if len(s.split()) >= 3]
    if len(sentences) >= 2:
        repeats = sum(count - 1 for count in Counter(sentences).values())
        if repeats / len(sentences) >= 0.5:
            return True
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    if len(grams) >= 20 and len(set(grams)) / len(grams) < 1 / 3:
        return True
    # a template said over and over ("The next letter is P. The next letter is C. ...")
    trigrams = Counter(tuple(words[i:i + 3]) for i in range(len(words) - 2))
    top = max(trigrams.values(), default=0)
    return top >= 4 and 3 * top >= 0.4 * len(words)


# ----------------------------------------------------------------------------- the paper's released rationales

LLAMA_MARKER = "llama rationale: "
_ANSWER_MARK = "Thus, the answer is"


def parse_release(raw: str, example: Example) -> tuple[str, str | None]:
    """Split one release string into (FLAN-T5-xl rationale, LLaMA-2 rationale or None), the way the
    official data_utils.py does: FLAN-T5's is the text before "Thus, the answer is"; LLaMA-2's is all
    after "llama rationale: ", stripped (None when the string has none, as in all of PIQA).
    ValueError when the question embedded after "Q: " is not `example`'s: the files align by position."""
    at = raw.find(LLAMA_MARKER)
    head, llama = (raw, None) if at == -1 else (raw[:at], raw[at + len(LLAMA_MARKER):].strip())
    q = head.find("\n\nQ: ")
    end = head.find("\nAnswer Choices:\n", q)
    if q == -1 or end == -1:
        raise ValueError(f"release rationale for example {example.id!r}: no embedded "
                         f"'Q: ...\\nAnswer Choices:' block in {raw[:120]!r}...")
    embedded = head[q + len("\n\nQ: "):end]
    if " ".join(embedded.split()) != " ".join(example.question.split()):
        raise ValueError(f"release rationale for example {example.id!r} is about another question: "
                         f"embedded {embedded[:80]!r}, expected {example.question[:80]!r}")
    rationale = head[:q]
    mark = rationale.rfind(_ANSWER_MARK)
    flan = (rationale[:mark] if mark != -1 else rationale).rstrip()
    return flan, llama
