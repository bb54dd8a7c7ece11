"""The reference's question tokenizer.

HCRN's ``preprocess/preprocess_questions.py`` (and DualVGR's copy) tokenises a question with
``nltk.word_tokenize(question.lower()[:-1])``. ``word_tokenize`` first splits its text into
sentences with nltk's punkt model (a data download) and then applies ``NLTKWordTokenizer`` (the
improved Treebank rules) to each sentence. :func:`tokenize` is a re-implementation of
``NLTKWordTokenizer().tokenize`` (nltk 3.10's rules, in their order), so the project needs neither
nltk nor its data: opening / closing double quotes become `` and '' (and the typographic quotes
« “ ‘ „ » ” ’ are split off), punctuation (, : ; ? ! @ # $ % & * brackets, --, ..., the dashes
U+2012..U+2015) is split off (a comma or colon followed by a digit is not: "1,000", "12:30"), a final
period is split off, clitics are split from their word ("what's" -> what 's, "kids'" -> kids ',
"don't" -> do n't, "they're", "we'll", "i'm", "you've", "he'd"), and "cannot", "d'ye", "gimme",
"gonna", "gotta", "lemme", "more'n", "wanna", "'tis", "'twas" become two tokens.

``tests/data/prepare/test_text.py`` compares it with nltk's tokenizer on thousands of generated
questions when nltk is installed (the ``test`` extra installs it).

Where it differs from ``word_tokenize`` (deliberately; pinned by that test):

* **Several sentences.** A question is one sentence, so ``word_tokenize`` is this tokenizer, except
  where punkt finds a sentence end inside the text: a word ending in a period followed by more
  words ("what does he do. then ...") that punkt does not know as an abbreviation ("mr.", "st."
  are kept). There ``word_tokenize`` splits the period off (``do`` ``.``) and this tokenizer keeps
  it (``do.``), as ``NLTKWordTokenizer`` does on the whole text. Which words punkt knows is in its
  trained English model (not available here). A ``?`` or ``!`` inside the text is split off either
  way, and the final period is split off either way.
* **Regular-expression engine.** nltk >= 3.10 runs these patterns with the ``regex`` module, older
  versions (and this module) with ``re``; they agree except on rare characters: combining marks
  (``\\w`` in ``regex``, not in ``re``) and the separators U+001C..U+001F (``\\s`` in ``re`` only).
"""
from __future__ import annotations

import re

_R = re.compile

# nltk's NLTKWordTokenizer: STARTING_QUOTES, PUNCTUATION, PARENS_BRACKETS, DOUBLE_DASHES (applied in this
# order), then " text ", ENDING_QUOTES, CONTRACTIONS2, CONTRACTIONS3. The first final-period rule's bracket run
# is possessive (``]*+``, as nltk 3.10 writes it): its class holds the space, so with a plain ``*`` a period
# followed by a long run of spaces and then more text backtracks quadratically (60 KB: over a minute) before
# failing. Possessive matches the same spans: giving spaces back to ``\s*`` can never reach the end sooner.
_BEFORE_PADDING = [
    # starting quotes
    (_R("([«“‘„]|[`]+)"), r" \1 "),
    (_R(r'^"'), "``"),
    (_R(r"(``)"), r" \1 "),
    (_R(r'([ \(\[{<])("|\'{2})'), r"\1 `` "),
    (_R(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),  # 'bout -> ' bout
    # punctuation
    (_R(r'([^\.])(\.)([\]\)}>"\'»”’ ]*+)\s*$'), r"\1 \2 \3 "),  # the final period
    (_R(r"([:,])([^\d])"), r" \1 \2"),
    (_R(r"([:,])$"), r" \1 "),
    (_R(r"\.{2,}"), r" \g<0> "),
    (_R(r"[;@#$%&]"), r" \g<0> "),
    (_R("[\u2012-\u2015]"), r" \g<0> "),  # figure dash, en dash, em dash, horizontal bar
    (_R(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),  # the final period, again
    (_R(r"[?!]"), r" \g<0> "),
    (_R(r"([^'])' "), r"\1 ' "),
    (_R(r"[*]"), r" \g<0> "),
    # brackets, double dashes
    (_R(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> "),
    (_R(r"--"), r" -- "),
]
_AFTER_PADDING = [
    # ending quotes
    (_R("([»”’])"), r" \1 "),
    (_R(r"''"), " '' "),
    (_R(r'"'), " '' "),
    (_R(r"\s+"), " "),
    (_R(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (_R(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    # contractions (Robert MacIntyre's list, as in nltk)
    *[(_R(rf"(?i)\b({a})({b})\b"), r" \1 \2 ") for a, b in
      (("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("more", "'n"))],
    (_R(r"(?i)\b(wan)(na)(?=\s)"), r" \1 \2 "),
    (_R(r"(?i) ('t)(is)\b"), r" \1 \2 "),
    (_R(r"(?i) ('t)(was)\b"), r" \1 \2 "),
]


def tokenize(text: str) -> list[str]:
    """``nltk.tokenize.NLTKWordTokenizer().tokenize(text)``: ``nltk.word_tokenize`` of a
    one-sentence text (see the module's docstring for where they can differ)."""
    for rx, sub in _BEFORE_PADDING:
        text = rx.sub(sub, text)
    text = f" {text} "
    for rx, sub in _AFTER_PADDING:
        text = rx.sub(sub, text)
    return text.split()


def question_tokens(question: str) -> list[str]:
    """The reference's tokens of a question: lower-cased, last character (the ``?``) dropped."""
    return tokenize(question.lower()[:-1])
