"""Prompt planning and label matching of the ground stage, on constructed cases (no model needed)."""

from engine.stages.ground import match_label, normalize_text, plan_prompts

ENTITIES = [
    {"phrase": "a black cat", "category": "cat", "parent_category": "animal"},
    {"phrase": "a white cat", "category": "cat", "parent_category": "animal"},
    {"phrase": "Red Sofa", "category": "sofa", "parent_category": "furniture"},
]


def words(text):
    return len(text.replace(".", " . ").split())


def test_texts_are_deduplicated_and_owned_phrase_first():
    plan = plan_prompts(ENTITIES, count_tokens=words, max_tokens=256)
    assert plan.texts == ["a black cat", "cat", "a white cat", "red sofa", "sofa"]
    assert plan.owners["cat"] == (0, "category")
    assert plan.owners["a white cat"] == (1, "phrase")
    assert plan.prompts == ["a black cat. cat. a white cat. red sofa. sofa."]


def test_a_category_that_is_another_entitys_phrase_counts_as_that_phrase():
    ents = [{"phrase": "tall dog", "category": "dog", "parent_category": "animal"},
            {"phrase": "dog", "category": "dog", "parent_category": "animal"}]
    plan = plan_prompts(ents, count_tokens=words, max_tokens=256)
    assert plan.owners["dog"] == (1, "phrase")


def test_prompts_split_under_the_token_limit_and_cover_every_text():
    ents = [{"phrase": f"object number {i}", "category": f"thing{i}", "parent_category": "x"} for i in range(50)]
    plan = plan_prompts(ents, count_tokens=words, max_tokens=20)
    assert len(plan.prompts) > 1
    assert all(words(p) <= 20 for p in plan.prompts)
    assert [t for chunk in plan.prompt_texts for t in chunk] == plan.texts
    assert all(p == ". ".join(chunk) + "." for p, chunk in zip(plan.prompts, plan.prompt_texts))


def test_match_label():
    candidates = ["a black cat", "cat", "red sofa", "sofa"]
    assert match_label("cat", candidates) == "cat"
    assert match_label("Red Sofa.", candidates) == "red sofa"
    assert match_label("black cat", candidates) == "a black cat"
    assert match_label("so ##fa", candidates) == "sofa"
    assert match_label("banana", candidates) is None
    assert match_label("", candidates) is None


def test_normalize_text():
    assert normalize_text("  A  Red, Sofa. ") == "a red sofa"
