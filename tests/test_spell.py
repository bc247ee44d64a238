"""The query speller (assay/spell.py): edit distance by hand, the correction rule, and its config switch."""

from collections import Counter

import pytest

from assay.config import AssayConfig
from assay.spell import Speller, edit_distance, for_workspace, model_words, words

CATALOG = [
    "category: Kitchen > Coffee Maker | brand: Brewly | Brewly Drip Coffee Maker | size: 12 cup",
    "category: Kitchen > Coffee Maker | brand: Brewly | Brewly Pour Over Coffee Maker",
    "category: Bedding > Comforter | brand: Lullo | Lullo Down Comforter Set | size: queen",
    "category: Bedding > Mattress | brand: Lullo | Lullo Mattress Encasement | size: queen",
    "category: Office > Chair | brand: Sitwell | Sitwell Office Chair",
    "category: Beauty > Hair Dryer | Hair Dryer 1800 W",
    "category: Beauty > Hair Dryer | Travel Hair Dryer",
]


@pytest.mark.parametrize("a,b,d", [
    ("coffee", "coffee", 0),
    ("cofee", "coffee", 1),         # deletion
    ("cooffee", "coffee", 1),       # insertion
    ("comfxrter", "comforter", 1),  # substitution
    ("benhc", "bench", 1),          # adjacent transposition counts once
    ("shoedder", "shredder", 1),
    ("kitten", "sitting", 3),       # 3 edits, capped at limit + 1 = 3
    ("ab", "abcdef", 3),            # length gap alone exceeds the limit
])
def test_edit_distance_by_hand(a, b, d):
    assert edit_distance(a, b, limit=2) == d


def test_corrects_unknown_words_to_the_closest_catalog_word():
    sp = Speller.from_texts(CATALOG)
    assert sp.correct("drip cooffee maker") == "drip coffee maker"
    assert sp.correct("comfxrter set") == "comforter set"
    assert sp.correct("xattress encasement") == "mattress encasement"
    # two edits are allowed only for long words (long_length 8): "encasment" has 9 letters
    assert sp.correct("mattres encsment") == "mattress encasement"
    assert Speller.from_texts(CATALOG, long_length=10).correct("encsmnt") == "encsmnt"


def test_leaves_known_short_numeric_and_hopeless_words_alone():
    sp = Speller.from_texts(CATALOG, known={"gift"})
    assert sp.correct("Drip Coffee Maker as a gift") == "Drip Coffee Maker as a gift"  # known; case kept
    assert sp.correct("12 cup brewly 1800") == "12 cup brewly 1800"
    assert sp.correct("zzzzzz pour over") == "zzzzzz pour over"  # nothing within reach
    assert sp.correct("drp") == "drp"  # shorter than min_length
    assert Speller.from_texts(CATALOG, min_length=3).correct("drp") == "drip"


def test_ties_go_to_the_word_more_items_use():
    # "hair" (2 items) and "chair" (1 item) are both one edit from "cair"
    sp = Speller.from_texts(CATALOG)
    assert sp.counts["hair"] == 2 and sp.counts["chair"] == 1
    assert sp.correct("office cair") == "office hair"
    sp2 = Speller(Counter({"chair": 5, "hair": 2}))
    assert sp2.correct("office cair") == "office chair"
    # punctuation and spacing survive
    assert sp2.correct("  cair,  (office)") == "  chair,  (office)"


def test_words_and_model_vocabulary(tmp_path):
    assert words("Women's 12-Inch Boots") == ["women", "s", "12", "inch", "boots"]
    (tmp_path / "vocab.txt").write_text("[PAD]\n##ing\ngift\nthe\nA\nx\n2020\n")
    assert model_words(tmp_path) == {"gift", "the"}
    assert model_words(tmp_path / "missing") == set()


def test_config_switch(tmp_path):
    cfg = AssayConfig()
    assert for_workspace(cfg.model_copy(update={"spell": cfg.spell.model_copy(update={"enabled": False})}),
                         texts=CATALOG) is None
    sp = for_workspace(cfg, texts=CATALOG)
    # the packaged MiniLM's WordPiece vocabulary knows ordinary English words the catalog never uses
    assert "everyday" in sp.known and sp.correct("coffee maker for everyday use") == "coffee maker for everyday use"
    assert sp.correct("coffe maker") == "coffee maker"
