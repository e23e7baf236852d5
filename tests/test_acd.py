import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from captum_interactions import (
    AgglomerativeContextualDecomposition,
    ContextualDecomposition,
    Hierarchy,
)

VOCAB = ["<pad>", "the", "movie", "was", "plot", "is", "not", "good", "great", "fun",
         "bad", "boring", "awful", "very"]
WORD = {w: i for i, w in enumerate(VOCAB)}
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "boring", "awful"]


def sentences(n, generator):
    """'the movie was [not] [very] ADJ' variants, length 6; label 1 = positive."""
    subjects = [["the", "movie", "was"], ["the", "plot", "is"]]
    ids, labels = [], []
    for _ in range(n):
        subject = subjects[int(torch.randint(2, (1,), generator=generator))]
        negated = bool(torch.randint(2, (1,), generator=generator))
        very = bool(torch.randint(2, (1,), generator=generator))
        positive = bool(torch.randint(2, (1,), generator=generator))
        adjectives = POSITIVE if positive else NEGATIVE
        adjective = adjectives[int(torch.randint(3, (1,), generator=generator))]
        words = subject + (["not"] if negated else []) + (["very"] if very else []) + [adjective]
        words = ["<pad>"] * (6 - len(words)) + words
        ids.append([WORD[w] for w in words])
        labels.append(int(positive != negated))
    return torch.tensor(ids), torch.tensor(labels)


class SentimentLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


@pytest.fixture(scope="module")
def sentiment_model():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids, labels = sentences(512, gen)
    model = SentimentLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(ids), labels)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        test_ids, test_labels = sentences(256, torch.Generator().manual_seed(1))
        accuracy = (model(test_ids).argmax(1) == test_labels).double().mean().item()
    assert accuracy > 0.95
    return model


@pytest.fixture(scope="module")
def digits_model():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1200]), y[:1200]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1200:]).argmax(1) == y[1200:]).double().mean().item()
    assert accuracy > 0.85
    return model, x[1200:], y[1200:]


def check_structure(hierarchy, output):
    """Parents contain their children, groups are connected, the top is the output."""
    assert isinstance(hierarchy, Hierarchy)
    levels = hierarchy.levels
    assert len(levels[0].groups) == hierarchy.num_units
    for k in range(len(levels) - 1):
        parent_labels = hierarchy.unit_labels(k + 1)
        for group, parent in zip(levels[k].groups, levels[k].parents.tolist()):
            if k == 0 and parent == -1:
                continue
            assert (parent_labels[group] == parent).all()
        assert len(levels[k + 1].groups) == len(levels[k + 1].scores)
    for k in range(1, len(levels)):
        for group in levels[k].groups:
            if hierarchy.kind == "sequence":
                assert torch.equal(group, torch.arange(group[0], group[-1] + 1))
    top = levels[-1]
    assert len(top.groups) == 1 and top.groups[0].numel() == hierarchy.num_units
    torch.testing.assert_close(top.scores[0], output, rtol=1e-5, atol=1e-5)


def test_acd_on_sentiment_lstm_with_negation(sentiment_model):
    ids = torch.tensor([[WORD[w] for w in ["the", "movie", "was", "not", "very", "good"]]])
    with torch.no_grad():
        logits = sentiment_model(ids)[0]
    assert logits.argmax() == 0  # negated positive -> negative
    acd = AgglomerativeContextualDecomposition(sentiment_model)
    hierarchy = acd.attribute(ids, target=0, percentile=60.0)
    check_structure(hierarchy, logits[0])
    # level 0 = CD of every token, as ContextualDecomposition.attribute gives it
    tokens = ContextualDecomposition(sentiment_model).attribute(ids, target=0)
    torch.testing.assert_close(hierarchy.levels[0].scores, tokens[0])
    # negation is an interaction: CD("not" + "very good") exceeds the sum of the
    # parts' scores for the predicted (negative) class, and the phrase carries
    # most of the logit; likewise "not bad" for the positive class
    cd = ContextualDecomposition(sentiment_model)
    inter = cd.interactions(ids, feature_mask=torch.tensor([0, 0, 0, 1, 2, 2]), target=0)[0]
    assert inter[1, 2] > 1.0
    assert inter[1, 1] + inter[2, 2] + inter[1, 2] > 0.5 * logits[0]
    not_bad = torch.tensor([[WORD[w] for w in ["<pad>", "the", "movie", "was", "not", "bad"]]])
    assert sentiment_model(not_bad)[0].argmax() == 1
    inter = cd.interactions(not_bad, feature_mask=torch.tensor([0, 0, 0, 0, 1, 2]), target=1)[0]
    assert inter[1, 2] > 1.0
    fig, ax = hierarchy.plot(["the", "movie", "was", "not", "very", "good"])
    assert ax.get_xticklabels()[3].get_text() == "not"
    # Captum's colours: the box of the most positive score is green, the most negative red
    boxes = [(float(t.get_text()), patch.get_facecolor()) for t, patch in
             zip(ax.texts, ax.patches) if t.get_text().lstrip("-").replace(".", "").isdigit()]
    assert boxes and max(boxes)[0] > 0
    top, bottom = max(boxes)[1], min(boxes)[1]
    if max(boxes)[0] > 0:
        assert top[1] > top[0] and top[1] > top[2]
    if min(boxes)[0] < 0:
        assert bottom[0] > bottom[1] and bottom[0] > bottom[2]
    plt.close(fig)


def test_acd_on_digit_cnn(digits_model):
    model, x, y = digits_model
    image = x[:2]
    with torch.no_grad():
        logits = model(image)
    predicted = logits.argmax(1)
    acd = AgglomerativeContextualDecomposition(model)
    hierarchies = acd.attribute(image, target=predicted, percentile=70.0)
    assert isinstance(hierarchies, list) and len(hierarchies) == 2
    for n, hierarchy in enumerate(hierarchies):
        check_structure(hierarchy, logits[n, predicted[n]])
        assert hierarchy.kind == "image" and hierarchy.unit_map.shape == (8, 8)
        # image groups are 4-connected: every group of >1 block touches another block of it
        for group in hierarchy.levels[1].groups:
            if group.numel() > 1:
                r, c = group // 8, group % 8
                dist = (r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()
                assert ((dist == 1).any(1)).all()
    fig, axes = hierarchies[0].plot(image[0], levels=[0, 1, 2])
    assert axes.size >= 3
    plt.close(fig)
    # 2 x 2 blocks
    coarse = acd.attribute(image[:1], target=int(predicted[0]), block_size=2)
    assert coarse.num_units == 16 and coarse.unit_map.shape == (8, 8)
    check_structure(coarse, logits[0, predicted[0]])


def test_acd_rescoring_and_max_levels_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(1, 5)
    acd = AgglomerativeContextualDecomposition(model)
    hierarchy = acd.attribute(x, structure="sequence", max_levels=1)
    assert len(hierarchy.levels) == 2
    # level 1 groups are scored by CD of the group
    cd = ContextualDecomposition(model)
    for group, score in zip(hierarchy.levels[1].groups, hierarchy.levels[1].scores):
        mask = torch.zeros(5)
        mask[group] = 1
        rel, _ = cd.decompose(x, mask)
        torch.testing.assert_close(score, rel[0, 0])
    with pytest.raises(ValueError, match="structure"):
        acd.attribute(x)
    with pytest.raises(ValueError, match="percentile"):
        acd.attribute(x, structure="sequence", percentile=100)
    with pytest.raises(ValueError, match="block_size"):
        acd.attribute(x, structure="sequence", block_size=0)


def test_acd_hierarchy_is_the_same_with_both_parts_carried():
    # ACD's CD passes run on the shared-total path; carrying both parts of every
    # mask gives the same scores (float64, round-off) and so the same hierarchy
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3),
    ).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    shared = AgglomerativeContextualDecomposition(model)
    two_streams = AgglomerativeContextualDecomposition(model)
    two_streams.cd._shared_total = False
    first = shared.attribute(x, target=1)
    second = two_streams.attribute(x, target=1)
    assert len(first.levels) == len(second.levels) > 3
    for a, b in zip(first.levels, second.levels):
        assert [g.tolist() for g in a.groups] == [g.tolist() for g in b.groups]
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-12)
        assert torch.equal(a.parents, b.parents)
