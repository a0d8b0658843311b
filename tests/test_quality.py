"""Scoring a run's pseudo boxes against hand-made COCO ground truth (`granucap eval --run`)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from engine.io.shards import ShardWriter
from engine.quality import LabelMap, QualityError, normalize_label, score_run
from engine.records import Record

pytest.importorskip("pycocotools")

CATEGORIES = [{"id": 1, "name": "dog"}, {"id": 2, "name": "sofa"}]


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 40, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_run(dest, samples: list[dict], *, stages: dict | None = None) -> str:
    """A run of one unit holding `samples` (key, width, height, entities, boxes, candidates, status, meta);
    with `stages`, the config (ground, filter) its marker says it was made with."""
    writer = ShardWriter(dest, expected={0: len(samples)}, fingerprint="handmade" if stages else None)
    if stages:
        (dest / "configs").mkdir(parents=True)
        (dest / "configs" / "handmade.json").write_text(json.dumps({"config": {"stages": stages}}))
    records = []
    for position, s in enumerate(samples):
        record = Record(key=s["key"], source="hand", unit=0, position=position, image=_jpeg(),
                        width=s.get("width", 200), height=s.get("height", 100), caption="c",
                        entities=s.get("entities", []), boxes=s.get("boxes", []),
                        candidates=s.get("candidates", []), meta=s.get("meta"))
        if s.get("status") == "rejected":
            record.reject(s.get("rejected_by", "extract"), "rejected", "by hand")
        records.append(record)
    writer(records)
    assert not writer.incomplete()
    return str(dest)


def write_gt(path, images: list[tuple[int, str]], annotations: list[tuple[int, int, list[float]]], *,
             size=(400, 200), crowd: list[tuple[int, int, list[float]]] = ()) -> str:
    anns = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": (x1 - x0) * (y1 - y0), "iscrowd": 0} for n, (i, c, (x0, y0, x1, y1)) in enumerate(annotations)]
    anns += [{"id": 1000 + n, "image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
              "area": (x1 - x0) * (y1 - y0), "iscrowd": 1} for n, (i, c, (x0, y0, x1, y1)) in enumerate(crowd)]
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f, "width": size[0], "height": size[1]}
                                           for i, f in images],
                                "annotations": anns, "categories": CATEGORIES}))
    return str(path)


DOG = {"phrase": "a brown dog", "category": "dog", "parent_category": "animal"}
SOFA = {"phrase": "red sofa", "category": "sofa", "parent_category": "furniture"}


def _box(xyxy, entity=0, score=0.9, matched="category") -> dict:
    return {"xyxy": xyxy, "score": score, "entity": entity, "matched": matched, "teacher": "t",
            "label_agreement": None, "described": None}


def _half(xyxy):
    """GT pixels (400 x 200 images) -> the run's decoded pixels (200 x 100)."""
    return [v / 2 for v in xyxy]


GT_BOXES = [(1, 1, [20, 20, 220, 180]), (1, 2, [240, 40, 380, 160]), (2, 1, [100, 50, 300, 150])]


def test_a_run_whose_boxes_are_the_gt_boxes_scores_ap_1_and_f1_1(tmp_path):
    gt = write_gt(tmp_path / "gt.json", [(1, "imgs/0001.jpg"), (2, "imgs/0002.jpg")], GT_BOXES)
    run = write_run(tmp_path / "run", [
        {"key": "dump/0001", "entities": [DOG, SOFA],
         "boxes": [_box(_half([20, 20, 220, 180]), 0), _box(_half([240, 40, 380, 160]), 1)]},
        {"key": "dump/0002", "entities": [DOG], "boxes": [_box(_half([100, 50, 300, 150]), 0)]},
    ])
    result = score_run(run, gt)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)
    assert (result["tp"], result["fp"], result["fn"]) == (3, 0, 0)
    assert result["images"] == {"gt": 2, "scored": 2, "ok": 2, "rejected": 0, "failed": 0, "not_in_run": 0}
    assert {r["name"]: (r["tp"], r["AP50"]) for r in result["categories"]} == {"dog": (2, 1.0), "sofa": (1, 1.0)}


@pytest.mark.parametrize("shift, ap, ap50, tp", [
    (20, 0.4, 1.0, 1),  # IoU 80/120 = 0.667: a hit at IoU thresholds 0.50, 0.55, 0.60, 0.65 of COCO's ten
    (45, 0.0, 0.0, 0),  # IoU 55/145 = 0.38: a miss and a false box
])
def test_shifted_boxes_score_what_their_iou_says(tmp_path, shift, ap, ap50, tp):
    gt = write_gt(tmp_path / "gt.json", [(1, "0001.jpg")], [(1, 1, [100, 50, 200, 150])])
    moved = [100 + shift, 50, 200 + shift, 150]
    run = write_run(tmp_path / "run", [{"key": "0001", "entities": [DOG], "boxes": [_box(_half(moved))]}])
    result = score_run(run, gt)
    assert result["AP"] == pytest.approx(ap, abs=1e-6) and result["AP50"] == pytest.approx(ap50, abs=1e-6)
    assert (result["tp"], result["fp"], result["fn"]) == (tp, 1 - tp, 1 - tp)


def test_rejected_samples_count_as_misses_and_images_the_run_never_read_are_left_out(tmp_path):
    gt = write_gt(tmp_path / "gt.json", [(1, "0001.jpg"), (2, "0002.jpg"), (3, "0003.jpg")],
                  [*GT_BOXES, (3, 1, [0, 0, 50, 50])])
    run = write_run(tmp_path / "run", [
        {"key": "0001", "entities": [DOG, SOFA],
         "boxes": [_box(_half([20, 20, 220, 180]), 0), _box(_half([240, 40, 380, 160]), 1)]},
        {"key": "0002", "status": "rejected"},
    ])
    result = score_run(run, gt)
    assert result["images"] == {"gt": 3, "scored": 2, "ok": 1, "rejected": 1, "failed": 0, "not_in_run": 1}
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 1)  # image 3's box is not a miss
    assert result["recall"] == pytest.approx(2 / 3) and result["precision"] == 1.0


def test_a_box_over_a_crowd_region_is_neither_right_nor_wrong(tmp_path):
    gt = write_gt(tmp_path / "gt.json", [(1, "0001.jpg")], [(1, 1, [0, 0, 100, 100])],
                  crowd=[(1, 1, [200, 0, 400, 200])])
    run = write_run(tmp_path / "run", [{"key": "0001", "entities": [DOG], "boxes": [
        _box(_half([0, 0, 100, 100])), _box(_half([210, 10, 390, 190]), score=0.8),
        _box(_half([100, 100, 200, 200]), score=0.7)]}])
    result = score_run(run, gt)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)


def test_images_match_by_key_original_key_file_or_url_without_suffixes(tmp_path):
    names = [(1, "a/b/0001.jpg"), (2, "x.png"), (3, "y.jpeg"), (4, "z.jpg")]
    gt = write_gt(tmp_path / "gt.json", names, [(i, 1, [0, 0, 100, 100]) for i, _ in names])
    hit = {"entities": [DOG], "boxes": [_box(_half([0, 0, 100, 100]))]}
    run = write_run(tmp_path / "run", [
        {"key": "0001", **hit},
        {"key": "k2", "meta": json.dumps({"original_key": "x"}), **hit},
        {"key": "k3", "meta": json.dumps({"file": "photos/y.jpeg"}), **hit},
        {"key": "k4", "meta": json.dumps({"url": "https://host/img/z.jpg?sig=1"}), **hit},
        {"key": "unrelated", **hit},
    ])
    result = score_run(run, gt)
    assert result["images"]["scored"] == 4 and result["recall"] == 1.0 and result["precision"] == 1.0


def test_labels_map_by_category_phrase_synonym_wordnet_parent_or_stay_outside():
    labels = LabelMap(CATEGORIES, {"sofa": ["settee", "Couches"]}, wordnet=_FakeWordNet())
    assert labels({"category": "Dogs", "phrase": "x"}) == (1, "category")
    assert labels({"category": "seat", "phrase": "the red sofa"}) == (None, "outside_gt")  # adjective kept
    assert labels({"category": "seat", "phrase": "a sofa"}) == (2, "phrase")
    assert labels({"category": "couch", "phrase": "x"}) == (2, "synonym")
    assert labels({"category": "puppy", "phrase": "x"}) == (1, "wordnet")
    assert labels({"category": "thing", "phrase": "x", "parent_category": "sofa"}) == (2, "parent")
    assert labels({"category": "tree", "phrase": "a tree", "parent_category": "plant"}) == (None, "outside_gt")
    assert normalize_label("  The   Red  Sofas ") == "red sofa"


def test_synonyms_must_name_gt_categories():
    with pytest.raises(QualityError, match="'cat'"):
        LabelMap(CATEGORIES, {"cat": ["kitten"]})


class _Synset:
    def __init__(self, names, parents=()):
        self.names, self.parents = names, list(parents)

    def lemma_names(self):
        return self.names

    def hypernyms(self):
        return self.parents

    def instance_hypernyms(self):
        return []


class _FakeWordNet:
    """Two levels of WordNet's noun graph, shaped as NLTK's reader answers (synsets, lemma_names, hypernyms)."""

    def __init__(self):
        canine = _Synset(["canine"], [_Synset(["animal"])])
        self.graph = {"puppy": [_Synset(["puppy"], [_Synset(["dog", "domestic_dog"], [canine])])]}

    def synsets(self, word, pos):
        return self.graph.get(word, [])


def test_the_installed_wordnet_places_a_hyponym_under_its_gt_name(tmp_path):
    from engine.quality import installed_wordnet

    wordnet = installed_wordnet()
    if wordnet is None:
        pytest.skip("WordNet not installed (granucap nltk-data install)")
    labels = LabelMap([{"id": 1, "name": "dog"}, {"id": 2, "name": "animal"}, {"id": 3, "name": "furniture"}],
                      wordnet=wordnet)
    assert labels({"category": "puppy"}) == (1, "wordnet")  # dog is nearer than animal
    assert labels({"category": "couch"}) == (3, "wordnet")
    assert labels({"category": "cloud"}) == (None, "outside_gt")


def test_nothing_matching_is_a_clear_error_and_the_cli_says_so(tmp_path, capsys):
    from engine.cli import main

    gt = write_gt(tmp_path / "gt.json", [(1, "0001.jpg")], [(1, 1, [0, 0, 10, 10])])
    run = write_run(tmp_path / "run", [{"key": "other", "entities": [DOG], "boxes": []}])
    with pytest.raises(QualityError, match=r"0001\.jpg.*other"):
        score_run(run, gt)
    assert main(["eval", "--run", run, "--coco", gt]) == 2
    assert "no image of" in capsys.readouterr().err


def test_eval_run_prints_the_table_and_writes_json(tmp_path, capsys):
    from engine.cli import main

    gt = write_gt(tmp_path / "gt.json", [(1, "0001.jpg"), (2, "0002.jpg")], GT_BOXES)
    run = write_run(tmp_path / "run", [
        {"key": "0001", "entities": [DOG, {"phrase": "a tree", "category": "tree", "parent_category": "plant"}],
         "boxes": [_box(_half([20, 20, 220, 180]), 0), _box(_half([0, 0, 10, 10]), 1)]},
        {"key": "0002", "entities": [DOG], "boxes": [_box(_half([100, 50, 300, 150]), 0)]},
    ])
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"sofa": ["couch"]}))
    out = tmp_path / "scores.json"
    assert main(["eval", "--run", run, "--coco", gt, "--synonyms", str(synonyms), "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 outside the GT's categories (e.g. tree)" in printed
    saved = json.loads(out.read_text())
    assert (saved["tp"], saved["fp"], saved["fn"]) == (2, 0, 1)
    assert saved["run_boxes"]["by_rule"] == {"category": 2, "outside_gt": 1}
    sofa = next(r for r in saved["categories"] if r["name"] == "sofa")
    assert (sofa["recall"], sofa["boxes"]) == (0.0, 0)
    assert main(["eval", "--run", run, "--model", "tiny:grounding-dino", "--coco", gt]) == 2


# ---------------------------------------------------------------- sweep

STAGES = {"ground": {"model": "tiny:grounding-dino", "box_threshold": 0.3, "keep_candidates": 0.3},
          "filter": {"nms_iou": 0.5, "min_boxes": 1}}
TWO_DOGS = [(1, 1, [20, 20, 120, 120]), (1, 1, [200, 20, 300, 120])]
CANDIDATES = [  # GT pixels; the run holds them at half scale
    _box(_half([20, 20, 120, 120]), 0, 0.9),  # dog A
    _box(_half([204, 20, 300, 120]), 1, 0.4, "phrase"),  # dog B
    _box(_half([330, 150, 390, 190]), 0, 0.6),  # nothing there
    _box(_half([24, 22, 122, 118]), 0, 0.5, "phrase"),  # dog A again: the filter's NMS folds it into the first
]
OTHER_DOG = {"phrase": "another dog", "category": "dog", "parent_category": "animal"}


def _sweep_run(tmp_path, **stages):
    tmp_path.mkdir(parents=True, exist_ok=True)
    gt = write_gt(tmp_path / "gt.json", [(1, "0001.jpg")], TWO_DOGS)
    config = {k: {**v, **stages.get(k, {})} for k, v in STAGES.items()}
    run = write_run(tmp_path / "run", [{"key": "0001", "entities": [DOG, OTHER_DOG], "boxes": CANDIDATES[:3],
                                        "candidates": CANDIDATES}], stages=config)
    return run, gt


def test_the_sweep_replays_thresholds_and_the_filter_on_the_candidates(tmp_path):
    from engine.quality import sweep

    run, gt = _sweep_run(tmp_path)
    result = sweep(run, gt, thresholds=[0.3, 0.45, 0.55, 0.7, 0.95], min_precision=0.9)
    # By hand: over 0.3 A, C, B (A again is NMS'd): 2 right, 1 wrong; over 0.45 and 0.55 A, C; over 0.7 A;
    # over 0.95 nothing, and the filter (min_boxes 1) rejects the image: both dogs missed.
    assert [(r["tp"], r["fp"], r["fn"], r["ok"]) for r in result["table"]] == [
        (2, 1, 0, 1), (1, 1, 1, 1), (1, 1, 1, 1), (1, 0, 1, 1), (0, 0, 2, 0)]
    assert result["best_f1"]["threshold"] == 0.3 and result["best_f1"]["f1"] == pytest.approx(0.8)
    assert result["best_at_min_precision"]["threshold"] == 0.7
    assert result["best_at_min_precision"]["f1"] == pytest.approx(2 / 3)
    # phrase boxes (B, and A's twin) judged with category boxes held at 0.7: B in up to 0.3 only
    phrase = result["fields"]["phrase"]
    assert phrase["with_other_at"] == 0.7 and phrase["best"]["threshold"] == 0.3 and phrase["best"]["tp"] == 2


def test_the_sweep_at_the_runs_own_threshold_scores_what_eval_scores(tmp_path):
    from engine.quality import score_run, sweep

    run, gt = _sweep_run(tmp_path)
    at_own = sweep(run, gt, thresholds=[0.3])["table"][0]
    scored = score_run(run, gt)
    assert (at_own["tp"], at_own["fp"], at_own["fn"]) == (scored["tp"], scored["fp"], scored["fn"])


def test_a_sweep_needs_candidates_and_stays_over_their_floor(tmp_path):
    from engine.quality import sweep

    run, gt = _sweep_run(tmp_path, ground={"keep_candidates": None})
    with pytest.raises(QualityError, match="keep_candidates"):
        sweep(run, gt)
    run, gt = _sweep_run(tmp_path / "b")
    with pytest.raises(QualityError, match=r"\[0.1\] are under the run's candidate floor 0.3"):
        sweep(run, gt, thresholds=[0.1, 0.5])


def test_eval_sweep_prints_the_table_and_the_choice(tmp_path, capsys):
    from engine.cli import main

    run, gt = _sweep_run(tmp_path)
    assert main(["eval", "--run", run, "--coco", gt, "--sweep", "--thresholds", "0.3,0.7",
                 "--min-precision", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "best F1: 0.800 at box_threshold 0.30" in printed
    assert "best F1 at precision >= 0.90: 0.667 at box_threshold 0.70" in printed


def test_keep_candidates_is_a_floor_under_the_thresholds_and_not_with_rescore():
    from engine.config import GroundSpec

    GroundSpec(model="m", box_threshold=0.3, phrase_threshold=0.2, keep_candidates=0.2)
    with pytest.raises(ValueError, match="must not exceed the thresholds"):
        GroundSpec(model="m", box_threshold=0.3, phrase_threshold=0.2, keep_candidates=0.25)
    with pytest.raises(ValueError, match="cannot be combined with rescore"):
        GroundSpec(model="m", keep_candidates=0.05, rescore={"enabled": True})


def test_inspect_with_gt_scores_the_run_and_draws_its_precision_recall_curve(tmp_path, capsys):
    from PIL import Image

    from engine.cli import main

    run, gt = _sweep_run(tmp_path)
    page = tmp_path / "page"
    assert main(["inspect", run, "--coco", gt, "--html", str(page), "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)["label_quality"]
    # The run as written (its threshold 0.3): A and C right, B wrong, both dogs found.
    assert (quality["score"]["precision"], quality["score"]["recall"]) == (pytest.approx(2 / 3), 1.0)
    curve = {round(r["threshold"], 2): (r["precision"], r["recall"]) for r in quality["curve"]}
    assert min(curve) == 0.3  # from the candidates' floor up
    assert curve[0.3] == (pytest.approx(2 / 3), 1.0) and curve[0.7] == (1.0, 0.5) and curve[0.95] == (0.0, 0.0)
    text = (page / "index.html").read_text()
    assert 'id="quality"' in text and 'id="sweep"' in text and "plots/precision_recall.png" in text
    with Image.open(page / "plots" / "precision_recall.png") as image:
        assert image.format == "PNG" and image.width > 100


def test_inspect_with_gt_on_a_run_without_candidates_scores_it_and_says_how_to_get_the_curve(tmp_path, capsys):
    from engine.cli import main

    run, gt = _sweep_run(tmp_path, ground={"keep_candidates": None})
    page = tmp_path / "page"
    assert main(["inspect", run, "--coco", gt, "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    assert "label quality against" in printed and "keep_candidates" in printed
    text = (page / "index.html").read_text()
    assert 'id="quality"' in text and 'id="sweep"' not in text and "keep_candidates=0.05" in text
    assert (page / "plots" / "precision_recall.png").is_file()
