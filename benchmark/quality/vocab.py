"""Word lists of the synthetic tasks. Filler words, key words and variable names are disjoint sets, so a
key or a value never occurs in the haystack by accident (the answer is recoverable from the prompt alone)."""

from __future__ import annotations

import random

# Filler (haystack) words: common words, none of which is a key word or a template word of a question.
FILLER_WORDS = tuple(
    (
        "the of and to in was on with as by at from it an be this are or his her has had not but all were "
        "when we there can more if no out so said up its about into than them only other new some could time "
        "these two may then do first any my now such like our over man me even most made after also did many "
        "before must through back years where much your way well down should because each just those people "
        "how too little state good very make world still own see men work long get here between both life "
        "being under never day same another know while last might us great old off come since against go came "
        "right used take three small city house light stone paper story letter sky road cloud field morning "
        "evening table chair door book warm quiet loud fast slow open close near far young high low early late"
    ).split()
)

# Keys of needles (lower case) and names of variables (upper case of the same list).
KEY_WORDS = tuple(
    (
        "apple orange lemon cherry grape melon peach plum mango banana tiger lion horse zebra camel eagle "
        "falcon raven otter beaver badger rabbit salmon trout shark whale dolphin violin guitar piano flute "
        "drum trumpet harp anchor rocket castle bridge tunnel tower island desert canyon glacier volcano "
        "meadow harbor lantern compass mirror pencil hammer ladder basket bottle candle jacket helmet wallet "
        "ticket carpet pillow blanket kettle spoon copper silver marble velvet cotton amber coral ivory "
        "crimson violet indigo olive maple cedar willow birch lotus tulip daisy orchid cactus pepper ginger "
        "honey butter cookie pickle walnut almond coconut"
    ).split()
)
VAR_NAMES = tuple(w.upper() for w in KEY_WORDS)

# Template words used by questions; listed so that tests can check they stay out of the filler.
TEMPLATE_WORDS = ("magic", "number", "numbers", "is", "what", "which", "variables", "equal", "words", "VAR")

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(rng: random.Random, n: int, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct pronounceable nonsense words (``kotami``), none of them a filler or key word."""
    out: list[str] = []
    seen = set(FILLER_WORDS) | set(KEY_WORDS)
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def number(rng: random.Random, digits: int) -> str:
    """A ``digits``-long decimal number without a leading zero."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def hex_id(rng: random.Random, groups: tuple[int, ...] = (8, 4)) -> str:
    """A short UUID-like id, e.g. ``3f9a0c21-7b4e``."""
    return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(g)) for g in groups)
