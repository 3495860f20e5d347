"""Caption variety for the procedural shapes (datasets/shapes.py): the words people use for a
family, a colour, a size or a proportion, phrase and sentence templates, and the wrapper phrases of
a request, in two grammars: TRAIN, which training captions are drawn from, and HELD_OUT, whose
words and phrasings no training caption contains (for the paraphrase evaluation).

Every object has a canonical caption ("a large tall red box", "a green box on top of a red
capsule"); `parse_caption` reads its attributes back, `training_captions` draws the captions of
one object from TRAIN (the canonical one first), and `held_out_captions` draws captions that use at
least one HELD_OUT element each; both are deterministic per (seed, object index). `mentions`
finds the families and colours a caption names, through either grammar. Every colour word carries
the sRGB value it names (CSS/X11), nearest to its palette entry and well clear of the next one
(tests/test_captions.py), so that no synonym is ambiguous.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.shapes import FAMILIES, PALETTE, PROPORTIONS, SIZES, article


@dataclass(frozen=True)
class Grammar:
    families: dict            # family -> words
    colours: dict             # palette colour -> ((word, (r, g, b)), ...)
    sizes: dict               # "small" / "large" -> words (the middle size has none)
    proportions: dict         # "flat" / "tall" / "thin" / "thick" -> words
    parts: tuple              # one part: {adj} (size and proportion words, may be empty), {colour}, {family}
    relations: dict           # "stack" -> templates of {top}, {bottom}; "pair" -> of {first}, {second}
    wrappers: tuple           # the whole request around {}


TRAIN = Grammar(
    families={"sphere": ("sphere", "ball", "globe"), "box": ("box", "cube", "block", "cuboid"),
              "cylinder": ("cylinder", "can", "column"), "cone": ("cone", "conical shape"),
              "torus": ("torus", "ring", "donut"), "capsule": ("capsule", "pill"),
              "pyramid": ("pyramid", "square pyramid"),
              "octahedron": ("octahedron", "diamond", "eight-sided die")},
    colours={"red": (("red", (217, 31, 26)), ("scarlet", (255, 36, 0)), ("cherry red", (222, 49, 99))),
             "orange": (("orange", (250, 128, 13)), ("tangerine", (242, 133, 0))),
             "yellow": (("yellow", (242, 217, 26)), ("lemon yellow", (255, 247, 0))),
             "green": (("green", (38, 166, 51)), ("lime green", (50, 205, 50)), ("forest green", (34, 139, 34))),
             "cyan": (("cyan", (26, 191, 204)), ("turquoise", (64, 224, 208)), ("aqua", (0, 255, 255))),
             "blue": (("blue", (31, 64, 217)), ("cobalt", (0, 71, 171)), ("royal blue", (65, 105, 225))),
             "purple": (("purple", (128, 46, 179)), ("violet", (143, 0, 255)), ("plum", (142, 69, 133))),
             "pink": (("pink", (250, 128, 179)), ("hot pink", (255, 105, 180)))},
    sizes={"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")},
    proportions={"flat": ("flat", "short", "squat"), "tall": ("tall", "elongated"), "thin": ("thin", "slim"),
                 "thick": ("thick", "chunky", "fat")},
    parts=("{adj}{colour} {family}", "{adj}{family} in {colour}", "{adj}{family} that is {colour}",
           "{adj}{colour}-coloured {family}"),
    relations={"stack": ("{top} on top of {bottom}", "{top} on {bottom}", "{top} resting on {bottom}",
                         "{bottom} with {top} on top"),
               "pair": ("{first} next to {second}", "{first} beside {second}", "{first} and {second} side by side")},
    wrappers=("{}", "{}", "a 3d model of {}", "generate {}", "make {}", "{}, 3d render", "a render of {}", "create {}"),
)

HELD_OUT = Grammar(
    families={"sphere": ("orb",), "box": ("crate", "brick"), "cylinder": ("drum", "pillar"),
              "cone": ("cone-shaped thing",), "torus": ("doughnut", "hoop", "bagel"), "capsule": ("lozenge",),
              "pyramid": ("pyramidal shape",), "octahedron": ("gem", "crystal")},
    colours={"red": (("crimson", (220, 20, 60)), ("ruby", (224, 17, 95))),
             "orange": (("pumpkin", (255, 117, 24)),),
             "yellow": (("golden", (255, 215, 0)),),
             "green": (("jade", (0, 168, 107)),),
             "cyan": (("aquamarine", (127, 255, 212)),),
             "blue": (("navy", (0, 0, 128)), ("sapphire", (15, 82, 186))),
             "purple": (("amethyst", (153, 102, 204)), ("indigo", (75, 0, 130))),
             "pink": (("bubblegum", (255, 193, 204)), ("blush", (222, 93, 131)))},
    sizes={"small": ("miniature",), "large": ("giant",)},
    proportions={"flat": ("low",), "tall": ("lofty",), "thin": ("slender",), "thick": ("plump",)},
    parts=("{adj}{family} painted {colour}", "{adj}{family} finished in {colour}"),
    relations={"stack": ("{top} perched on {bottom}", "{top} balanced above {bottom}"),
               "pair": ("{first} alongside {second}", "{first} standing by {second}")},
    wrappers=("{} floating in space", "{}, please", "could you build {}?", "show me {}", "i would like {}"),
)

SLOTS = ("family", "colour", "size", "proportion", "part", "relation", "wrapper")
_ART = r"(a|an)"
_COLOUR = "|".join(PALETTE)
_FAMILY = "|".join(FAMILIES)
_SIZE = "|".join(w for w in SIZES if w)
_PROPORTION = "|".join(sorted({w for words in PROPORTIONS.values() for w in words if w}))
_SINGLE = re.compile(rf"^{_ART} (?:({_SIZE}) )?(?:({_PROPORTION}) )?({_COLOUR}) ({_FAMILY})$")
_PAIRED = re.compile(rf"^{_ART} ({_COLOUR}) ({_FAMILY}) (on top of|next to) {_ART} ({_COLOUR}) ({_FAMILY})$")


@dataclass(frozen=True)
class PartWords:
    colour: str
    family: str
    size: str = ""            # "", "small", "large"
    proportion: str = ""      # "", "flat", "tall", "thin", "thick"


@dataclass(frozen=True)
class Description:
    parts: tuple              # PartWords in the canonical caption's order (a stack: top first)
    relation: str | None      # None, "stack" or "pair"


def parse_caption(caption: str) -> Description:
    """The attributes of a canonical caption of datasets/shapes.py."""
    text = caption.strip().lower()
    if m := _SINGLE.match(text):
        return Description((PartWords(m[4], m[5], m[2] or "", m[3] or ""),), None)
    if m := _PAIRED.match(text):
        relation = "stack" if m[4] == "on top of" else "pair"
        return Description((PartWords(m[2], m[3]), PartWords(m[6], m[7])), relation)
    raise ValueError(f"not a caption of the procedural shapes: {caption!r}")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _draw(desc: Description, rng, held: set) -> str:
    """One caption of `desc`: the slots in `held` from HELD_OUT, the others from TRAIN."""
    g = {s: HELD_OUT if s in held else TRAIN for s in SLOTS}

    def part(p: PartWords) -> str:
        adj = " ".join(_pick(rng, words[w]) for words, w in ((g["size"].sizes, p.size),
                                                            (g["proportion"].proportions, p.proportion)) if w)
        family = _pick(rng, g["family"].families[p.family])
        colour = _pick(rng, g["colour"].colours[p.colour])[0]
        phrase = _pick(rng, g["part"].parts).format(adj=f"{adj} " if adj else "", colour=colour, family=family)
        return f"{article(phrase)} {phrase}"

    if desc.relation is None:
        body = part(desc.parts[0])
    elif desc.relation == "stack":
        top, bottom = part(desc.parts[0]), part(desc.parts[1])
        body = _pick(rng, g["relation"].relations["stack"]).format(top=top, bottom=bottom)
    else:
        first, second = part(desc.parts[0]), part(desc.parts[1])
        body = _pick(rng, g["relation"].relations["pair"]).format(first=first, second=second)
    return _pick(rng, g["wrapper"].wrappers).format(body)


def _usable(desc: Description) -> list:
    """The slots that can hold a held-out element for `desc`."""
    slots = ["family", "colour", "part", "wrapper"]
    if any(p.size for p in desc.parts):
        slots.append("size")
    if any(p.proportion for p in desc.parts):
        slots.append("proportion")
    if desc.relation:
        slots.append("relation")
    return slots


def training_captions(caption: str, seed: int, index: int, n: int) -> list:
    """`n` captions of object `index` of the dataset drawn with `seed` from TRAIN: the canonical
    `caption` first, then distinct paraphrases where the grammar has them."""
    desc, rng = parse_caption(caption), np.random.default_rng([seed, index, 0x7E57])
    out, tries = [caption], 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        text = _draw(desc, rng, set())
        if text not in out:
            out.append(text)
    return out


def write_captions(obj_dir: Path, seed: int, index: int, n: int) -> None:
    """OBJ/caption_variants.json: `training_captions` of the object's caption_3dtopia.txt."""
    caption = (Path(obj_dir) / "caption_3dtopia.txt").read_text(encoding="utf-8").strip()
    captions = training_captions(caption, seed, index, n)
    (Path(obj_dir) / "caption_variants.json").write_text(json.dumps(captions, indent=0))


def held_out_captions(caption: str, seed: int, index: int, n: int) -> list:
    """`n` captions of the object, each with a random non-empty set of HELD_OUT elements (new
    synonyms, templates, relations or wrappers): phrasings no training caption holds."""
    desc, rng = parse_caption(caption), np.random.default_rng([seed, index, 0x4E1D])
    slots = _usable(desc)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, len(slots) + 1))
        out.append(_draw(desc, rng, {slots[i] for i in rng.choice(len(slots), k, replace=False)}))
    return out


def _lexicon() -> list:
    """(phrase, kind, value) for every family and colour word of both grammars, longest first."""
    words = [(w, "family", f) for g in (TRAIN, HELD_OUT) for f, ws in g.families.items() for w in ws]
    words += [(w, "colour", c) for g in (TRAIN, HELD_OUT) for c, ws in g.colours.items() for w, _ in ws]
    return sorted(words, key=lambda x: -len(x[0]))


def phrase_pattern(phrase: str) -> str:
    """A regular expression of `phrase` as whole words: "cone" is not in "cone-shaped", "red" is in
    "red-coloured"."""
    return rf"(?<![\w-]){re.escape(phrase)}(?!\w|-(?!coloured\b))"


def mentions(text: str) -> list:
    """[(kind, value)] of the family and colour words in `text`, in reading order (longest
    phrases first, each word used once)."""
    text, found = f" {text.lower()} ", []
    for phrase, kind, value in _lexicon():
        pattern = phrase_pattern(phrase)
        found += [(m.start(), kind, value) for m in re.finditer(pattern, text)]
        text = re.sub(pattern, lambda m: "#" * len(m[0]), text)
    return [(k, v) for _, k, v in sorted(found)]
