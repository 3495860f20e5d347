"""The caption grammar of the procedural shapes (datasets/captions.py): deterministic, every word
naming its own family and colour, no colour synonym ambiguous, no held-out phrasing in training."""
import re
from collections import Counter

import numpy as np
import pytest

from datasets.captions import (HELD_OUT, TRAIN, held_out_captions, mentions, parse_caption, phrase_pattern,
                               training_captions)
from datasets.shapes import FAMILIES, PALETTE, sample_shape

OBJECTS = [(i, sample_shape(0, i, mc_res=8).caption) for i in range(300)]


def _expected(caption: str) -> tuple:
    desc = parse_caption(caption)
    return Counter(p.family for p in desc.parts), Counter(p.colour for p in desc.parts)


def _named(text: str) -> tuple:
    found = mentions(text)
    return Counter(v for k, v in found if k == "family"), Counter(v for k, v in found if k == "colour")


def test_captions_are_deterministic_and_start_with_the_canonical_one():
    for i, caption in OBJECTS[:20]:
        first = training_captions(caption, 0, i, 6)
        assert first == training_captions(caption, 0, i, 6) and first[0] == caption
        assert len(set(first)) == 6
        assert held_out_captions(caption, 0, i, 3) == held_out_captions(caption, 0, i, 3)
    assert training_captions(OBJECTS[1][1], 0, 1, 6) != training_captions(OBJECTS[1][1], 1, 1, 6)


def test_every_caption_names_its_families_and_colours_and_nothing_else():
    for i, caption in OBJECTS:
        for text in training_captions(caption, 0, i, 8) + held_out_captions(caption, 0, i, 4):
            assert _named(text) == _expected(caption), (caption, text)


def test_every_synonym_maps_to_one_family_or_colour():
    for kind, table in (("family", "families"), ("colour", "colours")):
        owner = {}
        for g in (TRAIN, HELD_OUT):
            for value, words in getattr(g, table).items():
                for w in words:
                    w = w[0] if kind == "colour" else w
                    assert owner.setdefault(w, value) == value, f"{w!r} names {owner[w]} and {value}"
                    assert mentions(f"a {w}") == [(kind, value)], w
    assert set(TRAIN.families) == set(HELD_OUT.families) == set(FAMILIES)
    assert set(TRAIN.colours) == set(HELD_OUT.colours) == set(PALETTE)


def test_colour_words_are_nearest_to_their_palette_entry_and_clear_of_the_next():
    names = list(PALETTE)
    palette = np.array([PALETTE[n] for n in names]) * 255
    for g in (TRAIN, HELD_OUT):
        for colour, words in g.colours.items():
            for word, rgb in words:
                d = np.linalg.norm(palette - np.array(rgb), axis=1)
                first, second = np.sort(d)[:2]
                assert names[int(d.argmin())] == colour, (word, names[int(d.argmin())])
                assert first < 0.9 * second, f"{word!r} is about as near to two palette colours"


def _fixed_text(template: str) -> list:
    """The literal pieces of a template, without its slots and surrounding spaces."""
    return [p.strip(" ,?") for p in re.split(r"\{\w*\}", template) if p.strip(" ,?")]


def _has(phrase: str, text: str) -> bool:
    return re.search(phrase_pattern(phrase), text) is not None


def test_no_held_out_phrasing_can_appear_in_a_training_caption():
    held = [w for ws in HELD_OUT.families.values() for w in ws]
    held += [w for ws in HELD_OUT.colours.values() for w, _ in ws]
    held += [w for ws in (*HELD_OUT.sizes.values(), *HELD_OUT.proportions.values()) for w in ws]
    held += [p for t in (*HELD_OUT.parts, *HELD_OUT.wrappers, *[t for ts in HELD_OUT.relations.values() for t in ts])
             for p in _fixed_text(t)]
    training = " | ".join(t for i, c in OBJECTS for t in training_captions(c, 0, i, 8))
    for phrase in held:
        assert not _has(phrase, training), phrase
    for i, caption in OBJECTS:                     # and every held-out caption holds a held-out element
        for text in held_out_captions(caption, 0, i, 4):
            assert any(_has(p, text) for p in held), text


def test_a_caption_outside_the_procedural_grammar_is_refused():
    with pytest.raises(ValueError, match="not a caption of the procedural shapes: 'a chair'"):
        parse_caption("a chair")
    assert parse_caption("a large tall red box").parts[0].proportion == "tall"
    assert parse_caption("a green box on top of a red capsule").relation == "stack"
