"""The generator's private data, and the public template that turns each example into a training text.

A Template is chosen before looking at the data and is public: the label names (the classes the synthetic
set is balanced over) and two words of scaffolding. An example (text, label) becomes

    prompt  "<field>: <label name>\\n<body>:"        e.g. "Sentiment: positive\\nReview:"
    completion " <text><eos>"                       (the loss is on the completion only)

and with `labels=None` (unconditional generation) the prompt is "<body>:" alone. The label is in the prompt,
so it is part of the example and DP protects it with the text. The label names must be given, not read off
the data: a name that occurs in one example only would otherwise be released with the samples.

A corpus file is JSON Lines, one example per line: {"text": "...", "label": "<one of the label names>"}
(or without "label" for unconditional generation).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """Public label names (None: unconditional) and the words that introduce the label and the text."""

    labels: tuple[str, ...] | None = ("negative", "positive")
    field: str = "Sentiment"
    body: str = "Review"

    def __post_init__(self):
        for word in (self.field, self.body):
            if not isinstance(word, str) or not word.strip() or any(c in word for c in ":\n"):
                raise ValueError(f"field and body must be non-empty words without ':' or newlines, got {word!r}")
        if self.labels is not None:
            names = list(self.labels)
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError(f"labels must name at least 2 distinct classes (or be None: unconditional), got "
                                 f"{names}")
            if any(not isinstance(n, str) or not n.strip() or "\n" in n or n != n.strip() for n in names):
                raise ValueError(f"each label name must be a non-empty single-line string without surrounding spaces, "
                                 f"got {names}")

    @property
    def classes(self) -> int:
        """How many groups a balanced synthetic set is split into (1 when unconditional)."""
        return 1 if self.labels is None else len(self.labels)

    def prompt(self, label: int | None = None) -> str:
        """The conditioning prompt of label index `label` (public text, the same for every example of a class)."""
        if self.labels is None:
            if label not in (None, 0):
                raise ValueError(f"an unconditional template has no label {label!r}")
            return f"{self.body}:"
        return f"{self.field}: {self.labels[label]}\n{self.body}:"

    @property
    def scaffolding(self) -> tuple[str, ...]:
        """The prompt's format words, lower-cased: a sample that repeats them is not a clean text."""
        return tuple(f"{w.lower()}:" for w in ((self.body,) if self.labels is None else (self.field, self.body)))

    @property
    def reading_prompt(self) -> tuple[str, str, tuple[str, ...]]:
        """(prefix, suffix, answers): the template read backwards, "<body>: <text>\\n<field>:" continued by
        " <label name>": how a public zero-shot classifier is asked for a text's label."""
        if self.labels is None:
            raise ValueError("an unconditional template has no labels to read")
        return f"{self.body}: ", f"\n{self.field}:", tuple(" " + n for n in self.labels)


SENTIMENT = Template()  # the study's template: Rotten Tomatoes reviews, label 0 negative, 1 positive


def load_corpus(path: str | os.PathLike, template: Template) -> tuple[list[str], list[int] | None]:
    """(texts, label indices into template.labels, or None when unconditional) from a JSON Lines file.

    Every line must be an object with a non-empty string "text"; with labels, also a "label" that is one of
    template.labels (an integer label is read as its decimal string). Raises ValueError naming the line and
    the fix; the data is never silently dropped or relabelled.
    """
    texts, labels = [], []
    index = {name: i for i, name in enumerate(template.labels or ())}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc.msg}); each line must be one object "
                                 '{"text": ..., "label": ...}') from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{path}, line {number}: needs a non-empty string "text"')
            if template.labels is None:
                if "label" in row:
                    raise ValueError(f'{path}, line {number}: has a "label" but no label names were given: list '
                                     "the classes (--labels), or remove the labels for unconditional generation")
            else:
                label = row.get("label")
                label = str(label) if isinstance(label, int) and not isinstance(label, bool) else label
                if label not in index:
                    raise ValueError(f'{path}, line {number}: "label" must be one of the label names given '
                                     f"{list(template.labels)}; add the class to --labels or fix the line")
                labels.append(index[label])
            texts.append(text.strip())
    if not texts:
        raise ValueError(f"{path} holds no examples")
    return texts, None if template.labels is None else labels
