"""Retrieval metrics and continual summaries against hand-computed values (DESIGN §7)."""
import math

import pytest
import torch

from cbd_fast.eval.metrics import (Matches, average_precision, best_positive_ranks, continual_summary,
                                   median_rank, query_metrics, retrieval_metrics)
from cbd_fast.eval.report import format_number

# Six captions, two per image (captions 2q and 2q+1 describe image q), three images.
SCORES = torch.tensor([
    [0.9, 0.1, 0.5],  # caption 0 -> image 0: first
    [0.3, 0.5, 0.1],  # caption 1 -> image 0: 0.5 above it, second
    [0.2, 0.2, 0.1],  # caption 2 -> image 1: ties with image 0, which counts against it: second
    [0.1, 0.8, 0.0],  # caption 3 -> image 1: first
    [0.7, 0.6, 0.5],  # caption 4 -> image 2: third
    [0.0, 0.0, 0.4],  # caption 5 -> image 2: first
])
IMAGE_OF_CAPTION = torch.tensor([0, 0, 1, 1, 2, 2])
POSITIVE = IMAGE_OF_CAPTION[:, None] == torch.arange(3)[None, :]


def test_text_to_image_ranks_each_caption_with_ties_against_it():
    assert best_positive_ranks(SCORES, POSITIVE).tolist() == [1, 2, 2, 1, 3, 1]


def test_image_to_text_ranks_the_best_placed_caption():
    # image 0: its captions score 0.9 and 0.3 -> 0.9 is first. Image 1: 0.2 and 0.8 -> 0.8 first.
    # image 2: 0.5 and 0.4 -> 0.5, tied with caption 0 (another image's caption): second
    assert best_positive_ranks(SCORES.t(), POSITIVE.t()).tolist() == [1, 1, 2]


def test_retrieval_metrics_by_hand():
    m = retrieval_metrics(SCORES, POSITIVE)
    assert m["t2i_R@1"] == pytest.approx(100 * 3 / 6)
    assert m["t2i_R@5"] == m["t2i_R@10"] == pytest.approx(100.0)
    # ranks 1 1 1 2 2 3: floor of the mean of the two middle ones (VSE++/SCAN), not their mean 1.5
    assert m["t2i_MedR"] == 1.0
    assert m["t2i_MRR"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 2 + 1 + 1 / 3 + 1) / 6)
    assert m["i2t_R@1"] == pytest.approx(100 * 2 / 3)
    assert m["i2t_MedR"] == pytest.approx(1.0)
    assert m["i2t_MRR"] == pytest.approx(100 * (1 + 1 + 1 / 2) / 3)
    assert m["rsum"] == pytest.approx(50 + 100 + 100 + 200 / 3 + 100 + 100)
    assert m["mean_R@1"] == pytest.approx(0.5 * (50 + 200 / 3))
    assert "t2i_mAP" not in m  # no labels given


def test_median_rank_floors_the_mean_of_the_two_middle_ranks():
    # caption q's image is column q; caption 0 is first, caption 1 has 3 other images above it: ranks 1 and 4.
    # VSE++/SCAN: floor(median of 0-based ranks 0, 3) + 1 = floor(1.5) + 1 = 2 (the plain median would be 2.5)
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.8, 0.5, 0.7, 0.6]])
    positive = torch.tensor([[True, False, False, False], [False, True, False, False]])
    assert best_positive_ranks(scores, positive).tolist() == [1, 4]
    assert query_metrics(scores, positive)["MedR"] == 2.0
    assert median_rank(torch.tensor([7, 2, 5])) == 5.0  # odd count: the middle rank
    assert median_rank(torch.tensor([3])) == 3.0 and median_rank(torch.tensor([2, 3, 9, 10])) == 6.0


def test_duplicate_positives_rank_the_best_one():
    # the same image twice in the gallery (columns 0 and 2) and two identical captions (rows 0 and 1)
    scores = torch.tensor([[0.2, 0.5, 0.6, 0.1], [0.2, 0.5, 0.6, 0.1], [0.3, 0.9, 0.3, 0.2]])
    positive = torch.tensor([[True, False, True, False], [True, False, True, False],
                             [False, True, False, False]])
    assert best_positive_ranks(scores, positive).tolist() == [1, 1, 1]
    # image->text, columns 0-2: column 0's captions (0.2 each) rank below caption 2 (0.3, not its caption)
    assert best_positive_ranks(scores[:, :3].t(), positive[:, :3].t()).tolist() == [2, 1, 1]


def test_a_caption_whose_image_is_in_another_task():
    # two tasks of two images, one caption each; caption 1 (task A) looks like task B's image 2
    scores = torch.tensor([[0.9, 0.2, 0.1, 0.3],
                           [0.1, 0.4, 0.7, 0.2],
                           [0.2, 0.3, 0.8, 0.1],
                           [0.5, 0.1, 0.2, 0.6]])
    positive = torch.eye(4, dtype=torch.bool)
    task_a = retrieval_metrics(scores[:2, :2], positive[:2, :2])
    assert task_a["t2i_R@1"] == 100.0  # within its own task, caption 1 finds image 1 first
    union = query_metrics(scores[:2], positive[:2])  # task A's captions in the gallery of both tasks
    assert union["R@1"] == 50.0 and best_positive_ranks(scores[:2], positive[:2]).tolist() == [1, 2]
    # the caption's image missing from the gallery is an error, not a miss or a hit
    with pytest.raises(ValueError, match=r"task A: query 1 has no positive"):
        best_positive_ranks(scores[:2, [0, 2, 3]], positive[:2, [0, 2, 3]], where="task A")


def test_constant_scores_rank_last_never_first():
    # a collapsed model: every score equal. With G=8 gallery items and one positive, the pessimistic rank is 8:
    # R@k = 0 for k < 8 (chance would be k/8), MRR = 1/8.
    scores, positive = torch.full((8, 8), 0.3), torch.eye(8, dtype=torch.bool)
    m = retrieval_metrics(scores, positive)
    for direction in ("t2i", "i2t"):
        assert m[f"{direction}_R@1"] == m[f"{direction}_R@5"] == 0.0
        assert m[f"{direction}_R@10"] == 100.0  # 10 >= 8: every item is in the top 10
        assert m[f"{direction}_MedR"] == 8.0
        assert m[f"{direction}_MRR"] == pytest.approx(100 / 8)
    # two positives per query: rank 1 + 6 negatives = 7
    positive2 = positive | positive.roll(1, dims=1)
    assert best_positive_ranks(scores, positive2).tolist() == [7] * 8


def test_a_gallery_where_everything_is_equal_is_at_most_chance():
    gen = torch.Generator().manual_seed(0)
    queries, gallery = 4000, 50
    positive = torch.zeros(queries, gallery, dtype=torch.bool)
    positive[torch.arange(queries), torch.randint(0, gallery, (queries,), generator=gen)] = True
    labels_q = torch.randint(0, 5, (queries,), generator=gen)
    labels_g = torch.randint(0, 5, (gallery,), generator=gen)
    labels_g[:5] = torch.arange(5)  # every class present
    chance = {k: 100 * k / gallery for k in (1, 5, 10)}
    # random scores: chance level (R@k = k/G in expectation; 5 standard errors)
    random = query_metrics(torch.rand(queries, gallery, generator=gen), positive, labels_q, labels_g)
    for k, expected in chance.items():
        error = 100 * math.sqrt(expected / 100 * (1 - expected / 100) / queries)
        assert abs(random[f"R@{k}"] - expected) < 5 * error
    # all equal: never above chance, and mAP at its pessimistic floor (every non-relevant item first)
    constant = query_metrics(torch.zeros(queries, gallery), positive, labels_q, labels_g)
    for k, expected in chance.items():
        assert constant[f"R@{k}"] <= expected
    assert constant["R@1"] == 0.0
    relevant = (labels_q[:, None] == labels_g[None, :]).sum(1).double()
    floor = torch.stack([sum(i / (gallery - r + i) for i in range(1, int(r) + 1)) / r for r in relevant])
    assert constant["mAP"] == pytest.approx(100 * floor.mean().item())
    assert constant["mAP"] < random["mAP"]


def test_average_precision_orders_ties_against_the_query():
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.1]])
    relevant = torch.tensor([[False, True, False, True]])
    # pessimistic order: 0 (no), 2 (no, tied with 1), 1 (yes), 3 (yes) -> AP = (1/3 + 2/4) / 2
    assert average_precision(scores, relevant).item() == pytest.approx((1 / 3 + 2 / 4) / 2)
    # no ties: order 0, 1, 2, 3 -> hits at 2 and 4
    assert average_precision(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), relevant).item() == pytest.approx(
        (1 / 2 + 2 / 4) / 2)


def test_class_map_by_hand_in_both_directions():
    # caption q describes image q; classes 0, 1, 0
    scores = torch.tensor([[0.9, 0.5, 0.4], [0.2, 0.3, 0.6], [0.8, 0.1, 0.7]])
    labels = torch.tensor([0, 1, 0])
    m = retrieval_metrics(scores, torch.eye(3, dtype=torch.bool), labels, labels)
    # caption 0: images 0 (yes), 1 (no), 2 (yes) -> (1 + 2/3) / 2; caption 1: 2 (no), 1 (yes) -> 1/2;
    # caption 2: 0 (yes), 2 (yes) -> 1
    assert m["t2i_mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 2 + 1) / 3)
    # image 0: captions 0 (yes), 2 (yes) -> 1; image 1: 0 (no), 1 (yes) -> 1/2; image 2: 2 (yes), 1 (no), 0 (yes)
    assert m["i2t_mAP"] == pytest.approx(100 * (1 + 1 / 2 + (1 + 2 / 3) / 2) / 3)


def test_unknown_labels_leave_map_out():
    m = retrieval_metrics(SCORES, POSITIVE, torch.tensor([0, 0, 1, 1, -1, 2]), torch.tensor([0, 1, 2]))
    assert "t2i_mAP" not in m and "i2t_mAP" not in m


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_an_error_naming_where(bad):
    scores = SCORES.clone()
    scores[3, 1] = bad
    with pytest.raises(ValueError, match=r"synthetic/task1 .*1 of 18 retrieval scores are NaN or infinite"):
        retrieval_metrics(scores, POSITIVE, where="synthetic/task1 (per-task gallery)")


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="positive must be a bool matrix"):
        best_positive_ranks(SCORES, POSITIVE[:, :2])
    with pytest.raises(ValueError, match=r"\[queries, gallery\]"):
        best_positive_ranks(SCORES[0], POSITIVE[0])
    with pytest.raises(ValueError, match="empty score matrix"):
        best_positive_ranks(SCORES[:0], POSITIVE[:0])


def test_chunked_ranking_matches_one_pass(monkeypatch):
    import cbd_fast.eval.metrics as metrics

    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (40, 30), generator=gen).float()  # many ties
    positive = torch.rand(40, 30, generator=gen) < 0.1
    positive[torch.arange(40), torch.arange(40) % 30] = True
    labels_q, labels_g = torch.arange(40) % 4, torch.arange(30) % 4
    whole = query_metrics(scores, positive, labels_q, labels_g)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 64)  # 2 rows per chunk
    assert query_metrics(scores, positive, labels_q, labels_g) == whole



def _random_gallery(seed: int):
    """Scores with many ties of captions (1-4 per image, some repeated) against a gallery of those images in
    which some images appear twice; the positives as ids and as the dense mask."""
    gen = torch.Generator().manual_seed(seed)
    num_images = 9
    caption_image = torch.arange(num_images).repeat_interleave(torch.randint(1, 5, (num_images,), generator=gen))
    gallery_ids = torch.cat([torch.arange(num_images), torch.randint(0, num_images, (3,), generator=gen)])
    scores = torch.randint(0, 4, (len(caption_image), len(gallery_ids)), generator=gen).float()
    repeated = torch.randint(0, len(caption_image), (3,), generator=gen)  # duplicate captions: same image, scores
    caption_image = torch.cat([caption_image, caption_image[repeated]])
    scores = torch.cat([scores, scores[repeated]])
    classes = torch.randint(0, 3, (num_images,), generator=gen)
    return scores, caption_image, gallery_ids, classes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_rows", [None, 5, 1])
def test_matches_built_by_chunk_equal_the_dense_mask(seed, chunk_rows, monkeypatch):
    import cbd_fast.eval.metrics as metrics

    scores, caption_image, gallery_ids, classes = _random_gallery(seed)
    dense = caption_image[:, None] == gallery_ids[None, :]
    text_labels, image_labels = classes[caption_image], classes[gallery_ids]
    expected = retrieval_metrics(scores, dense, text_labels, image_labels)  # one chunk: the dense path
    if chunk_rows is not None:  # chunks of chunk_rows rows text→image (fewer image→text, whose rows are longer)
        monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", chunk_rows * scores.shape[1])
    matches = Matches(caption_image, gallery_ids)
    assert retrieval_metrics(scores, matches, text_labels, image_labels) == expected
    for s, positive, dense_positive in ((scores, matches, dense), (scores.t(), matches.t(), dense.t())):
        assert torch.equal(best_positive_ranks(s, positive), best_positive_ranks(s, dense_positive))
    relevant = Matches(text_labels, image_labels)
    assert torch.equal(average_precision(scores, relevant), average_precision(scores, text_labels[:, None] ==
                                                                               image_labels[None, :]))


@pytest.mark.parametrize("seed", range(3))
def test_matches_with_a_caption_whose_image_is_in_another_task(seed):
    scores, caption_image, gallery_ids, _ = _random_gallery(seed)
    # task A: images 0-4 (their first gallery columns) and its captions, plus one caption of image 7 (task B)
    own = (caption_image < 5).nonzero().flatten()
    stray = int((caption_image == 7).nonzero()[0])
    rows, cols = torch.cat([own, torch.tensor([stray])]), torch.arange(5)
    matches, dense = Matches(caption_image[rows], gallery_ids[cols]), caption_image[rows, None] == gallery_ids[cols]
    message = rf"task A: query {len(own)} has no positive item in the gallery of 5"
    for positive in (matches, dense):
        with pytest.raises(ValueError, match=message):
            best_positive_ranks(scores[rows][:, cols], positive, where="task A")
    # in the gallery of both tasks it is ranked, the same way by both
    union = Matches(caption_image[rows], gallery_ids)
    assert torch.equal(best_positive_ranks(scores[rows], union),
                       best_positive_ranks(scores[rows], caption_image[rows, None] == gallery_ids))


def test_matches_with_bad_ids_are_errors():
    with pytest.raises(ValueError, match=r"positive ids must be integer vectors of \[queries\] and \[gallery\]"):
        best_positive_ranks(SCORES, Matches(IMAGE_OF_CAPTION, torch.arange(4)))  # 4 gallery ids for 3 columns
    with pytest.raises(ValueError, match="positive ids must be integer vectors"):
        best_positive_ranks(SCORES, Matches(IMAGE_OF_CAPTION.float(), torch.arange(3.0)))
    with pytest.raises(ValueError, match="relevant ids must be integer vectors"):
        average_precision(SCORES, Matches(IMAGE_OF_CAPTION[:, None], torch.arange(3)))


# ------------------------------------------------------------------------------------------------ summaries

# a[i][j]: rows 0 (before training) .. 3, tasks 1..3
MATRIX = [[10.0, 20.0, 30.0],
          [60.0, 25.0, 35.0],
          [50.0, 70.0, 40.0],
          [40.0, 65.0, 80.0]]


def test_continual_summary_by_hand():
    s = continual_summary(MATRIX)
    assert s["final_average"] == pytest.approx((40 + 65 + 80) / 3)
    assert s["learning_accuracy"] == pytest.approx((60 + 70 + 80) / 3)
    assert s["forgetting"] == pytest.approx(((60 - 40) + (70 - 65)) / 2)  # best row from the task's own on
    assert s["backward_transfer"] == pytest.approx(((40 - 60) + (65 - 70)) / 2)
    assert s["forward_transfer"] == pytest.approx(((25 - 20) + (40 - 30)) / 2)  # a[j-1][j] - a[0][j]
    assert s["transfer"] == pytest.approx((25 + (35 + 40) / 2) / 2)  # MTIL: rows 1..j-1 of column j
    assert s["mtil_average"] == pytest.approx(((60 + 50 + 40) / 3 + (25 + 70 + 65) / 3 + (35 + 40 + 80) / 3) / 3)
    assert s["initial_average"] == pytest.approx(20.0)


def test_continual_summary_of_a_partial_run():
    s = continual_summary(MATRIX[:3])  # after task 2 of 3: tasks 1..2 only
    assert s["final_average"] == pytest.approx(60.0)
    assert s["forgetting"] == pytest.approx(10.0)
    assert s["backward_transfer"] == pytest.approx(-10.0)
    assert s["forward_transfer"] == pytest.approx(5.0)
    assert s["transfer"] == pytest.approx(25.0)
    assert s["learning_accuracy"] == pytest.approx(65.0)
    one = continual_summary(MATRIX[:2])
    assert one["final_average"] == 60.0 and one["initial_average"] == 10.0
    assert one["forgetting"] is None and one["forward_transfer"] is None and one["transfer"] is None
    assert all(v is None for v in continual_summary(MATRIX[:1]).values())


def test_forgetting_ignores_rows_before_the_task_was_trained():
    # a zero-shot score above everything learned later must not count as forgetting
    s = continual_summary([[90.0, 10.0], [50.0, 20.0], [50.0, 60.0]])
    assert s["forgetting"] == 0.0 and s["backward_transfer"] == 0.0


def test_continual_summary_with_a_missing_entry():
    matrix = [row[:] for row in MATRIX]
    matrix[1][0] = None
    s = continual_summary(matrix)
    assert s["learning_accuracy"] is None and s["forgetting"] is None and s["mtil_average"] is None
    assert s["final_average"] == pytest.approx((40 + 65 + 80) / 3)  # does not need the missing entry
    with pytest.raises(ValueError, match="pre-training row"):
        continual_summary([])


def test_format_number_never_prints_negative_zero():
    assert format_number(-0.001) == "0.00" and format_number(-0.0) == "0.00"
    assert format_number(-0.006) == "-0.01" and format_number(12.3456) == "12.35"
    assert format_number(None) == "" and format_number(float("nan")) == ""
