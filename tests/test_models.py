import dataclasses

import pytest
import torch
from torch import nn

from sort_fast.data import SyntheticIntrospect, collate_groups
from sort_fast.data.group import lstm_packing
from sort_fast.heads import BranchSum
from sort_fast.models import PythiaConfig, PythiaVQA, pythia_sizes


@pytest.fixture(scope="module")
def data():
    ds = SyntheticIntrospect(seed=3, split="val", num_groups=12)
    return ds, collate_groups(list(ds))


def _model(ds, **kw) -> PythiaVQA:
    cfg = PythiaConfig(len(ds.vocab), ds.num_answers, embed_dim=16, text_hidden=24,
                       attention_hidden=20, joint_dim=32, classifier_text_hidden=12,
                       classifier_image_hidden=20, **kw)
    return PythiaVQA(cfg)


def test_shapes_and_scores_are_classifier_of_joint(data):
    ds, batch = data
    model = _model(ds).eval()
    out = model(batch)
    t, r = batch.num_questions, batch.image_features.shape[1]
    assert out.scores.shape == (t, ds.num_answers)
    assert out.joint.shape == (t, 32)
    assert out.attention.shape == (t, r)
    torch.testing.assert_close(out.scores, model.classifier(out.joint))
    # attention: a distribution over each question's real regions only
    torch.testing.assert_close(out.attention.sum(1), torch.ones(t))
    assert bool((out.attention[~batch.image_mask[batch.image_index]] == 0).all())


def test_classifier_structure_is_pythia_logit_classifier(data):
    model = _model(data[0], classifier_dropout=0.3)
    assert isinstance(model.classifier, BranchSum)
    assert len(model.classifier.branches) == 2
    for branch in model.classifier.branches:
        kinds = (nn.Linear, nn.ReLU, nn.Dropout, nn.Linear)
        assert len(branch) == 4 and all(isinstance(m, k) for m, k in zip(branch, kinds))
        assert branch[2].p == 0.3
        assert hasattr(branch[0].parametrizations, "weight")  # weight norm on the first Linear
        assert branch[0].parametrizations.weight.original0.numel() == 1  # dim=None: one scalar g


def test_image_side_runs_once_per_image(data):
    ds, batch = data
    assert len(batch.image_ids) < batch.num_groups < batch.num_questions
    model = _model(ds)
    seen = []
    model.image_projection.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    model(batch)
    assert seen == [batch.image_features.shape]


def test_question_side_runs_once_per_distinct_question(data):
    ds, batch = data
    texts = [tuple(t[:n].tolist()) for t, n in zip(batch.question_tokens,
                                                   batch.question_lengths)]
    assert len(set(texts)) < len(texts)  # the data repeat questions
    model = _model(ds)
    seen = []
    model.question_encoder.register_forward_hook(lambda m, inp, out: seen.append(out.shape[0]))
    model(batch)
    model(batch, share_questions=False)
    assert seen == [len(set(texts)), len(texts)]


@pytest.mark.parametrize("seed", range(3))
def test_distinct_questions_against_a_dictionary(seed):
    from sort_fast.models.pythia import _distinct_questions

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (40,), generator=g)
    tokens = torch.randint(2, 5, (40, 6), generator=g)
    tokens[torch.arange(6) >= lengths[:, None]] = 0      # 0-padded, prefixes of each other
    first, inverse = _distinct_questions(tokens, lengths)
    rows = [(tuple(t.tolist()), int(n)) for t, n in zip(tokens, lengths)]
    want = list(dict.fromkeys(rows))
    assert len(first) == len(want)
    assert sorted(rows[i] for i in first.tolist()) == sorted(want)
    for t, u in enumerate(inverse.tolist()):
        assert rows[first[u]] == rows[t] and first[u] <= t   # first occurrence of its question


def test_collate_finds_what_the_model_would(data):
    """The distinct questions and image slots recorded by collate_groups equal those the
    model finds on the device, and the model's output is the same bits with either."""
    from sort_fast.models.pythia import _distinct_questions, _slots

    ds, batch = data
    first, inverse = _distinct_questions(batch.question_tokens, batch.question_lengths)
    assert torch.equal(batch.question_first, first)
    assert torch.equal(batch.question_inverse, inverse)
    rows, batch_sizes = lstm_packing(batch.question_lengths[first].tolist(),
                                     batch.question_tokens.shape[1])
    assert batch.lstm_rows.tolist() == rows and batch.lstm_batch_sizes == batch_sizes
    slot, per_image = _slots(batch.image_index, batch.image_features.shape[0])
    assert torch.equal(batch.image_slot, slot) and batch.max_per_image == per_image
    model = _model(ds).eval()
    bare = dataclasses.replace(batch, question_first=None, question_inverse=None,
                               lstm_rows=None, lstm_batch_sizes=None, image_slot=None,
                               max_per_image=None)
    # a batch changed through PackedBatch.replace drops what it invalidates
    half = batch.replace(question_tokens=batch.question_tokens[:5],
                         question_lengths=batch.question_lengths[:5],
                         image_index=batch.image_index[:5])
    assert half.question_first is None and half.image_slot is None
    with pytest.raises(ValueError, match="stale"):
        dataclasses.replace(batch, question_tokens=batch.question_tokens[:5])
    with torch.no_grad():
        got, want = model(batch), model(bare)
    for name in ("scores", "joint", "attention"):
        assert torch.equal(getattr(got, name), getattr(want, name))


def test_shared_questions_match_per_row_values_and_gradients(data):
    """Sharing the question side changes neither the outputs nor any parameter gradient
    (float64, dropout off)."""
    ds, batch = data
    model = _model(ds).double().eval()
    batch = dataclasses.replace(batch, image_features=batch.image_features.double())
    params = list(model.parameters())
    results = []
    for share in (True, False):
        out = model(batch, share_questions=share)
        loss = (out.scores.sin().sum() + out.joint.square().sum() + out.attention.cos().sum())
        results.append((out, torch.autograd.grad(loss, params)))
    (shared, g_shared), (rows, g_rows) = results
    for name in ("scores", "joint", "attention"):
        torch.testing.assert_close(getattr(shared, name), getattr(rows, name))
    for (name, _), a, b in zip(model.named_parameters(), g_shared, g_rows):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("glimpses", [1, 2, 3])
def test_attention_matches_per_question_reference(data, glimpses):
    """The per-image factorised attention equals the naive per-question computation, one
    softmax over the regions per glimpse, the attended features concatenated."""
    ds, batch = data
    model = _model(ds, image_glimpses=glimpses).eval()
    out = model(batch)
    feats = batch.image_features[batch.image_index]                       # [T, R, F]
    q = model.question_encoder(batch.question_tokens, batch.question_lengths)
    h = model.image_projection(feats) * model.question_projection(q)[:, None]
    logits = model.attention_scorer(h)                                    # [T, R, G]
    logits = logits.masked_fill(~batch.image_mask[batch.image_index][:, :, None], float("-inf"))
    attention = logits.softmax(1)
    expected = attention[:, :, 0] if glimpses == 1 else attention.transpose(1, 2)
    torch.testing.assert_close(out.attention, expected)
    attended = torch.einsum("trg,trf->tgf", attention, feats).flatten(1)  # [T, G*F]
    joint = model.image_fusion(attended) * model.question_fusion(q)
    torch.testing.assert_close(out.joint, joint)


def test_region_gradcam_sums_over_glimpses(data):
    ds, batch = data
    model = _model(ds, image_glimpses=2).eval()
    out = model(batch)
    y = out.scores.gather(1, batch.classes[:, None]).sum()
    (grad,) = torch.autograd.grad(y, out.attention)
    cam = model.region_gradcam(batch)
    assert out.attention.shape[1] == 2 and cam.shape == out.attention[:, 0].shape
    torch.testing.assert_close(cam, (grad * out.attention).sum(1).detach())


def test_input_ablations_hide_one_input(data):
    ds, batch = data
    noisy = dataclasses.replace(batch, image_features=torch.randn_like(batch.image_features))
    reworded = dataclasses.replace(
        batch, question_tokens=batch.question_tokens.flip(0),
        question_lengths=batch.question_lengths.flip(0), question_first=None,
        question_inverse=None, lstm_rows=None, lstm_batch_sizes=None)
    for ablation, changed in (("text-only", noisy), ("image-only", reworded)):
        torch.manual_seed(0)
        model = _model(ds, input_ablation=ablation).eval()
        torch.testing.assert_close(model(changed).scores, model(batch).scores)
    torch.manual_seed(0)
    model = _model(ds).eval()  # without ablation both inputs matter
    for changed in (noisy, reworded):
        assert not torch.allclose(model(changed).scores, model(batch).scores)
    with pytest.raises(ValueError, match="input_ablation"):
        _model(ds, input_ablation="no-image")
    with pytest.raises(ValueError, match="image_glimpses"):
        _model(ds, image_glimpses=0)


def test_output_invariant_to_batch_composition(data):
    ds, batch = data
    model = _model(ds).eval()
    full = model(batch).scores
    first = collate_groups([ds[0]])
    n = int(batch.offsets[1])
    torch.testing.assert_close(model(first).scores, full[:n], atol=1e-5, rtol=1e-5)


def test_region_gradcam(data):
    ds, batch = data
    model = _model(ds).eval()
    cam = model.region_gradcam(batch)
    assert cam.shape == batch.image_mask[batch.image_index].shape
    assert not cam.requires_grad
    assert bool((cam[~batch.image_mask[batch.image_index]] == 0).all())
    assert cam.abs().sum() > 0
    # finite-difference check of d y_c / d attention for one question through the attended vector
    out = model(batch)
    t, c = 0, int(batch.classes[0])
    feats = batch.image_features[batch.image_index[t]]
    q = model.question_encoder(batch.question_tokens[:1], batch.question_lengths[:1])
    attention = out.attention[t].detach().requires_grad_(True)
    y = model.classifier(model.image_fusion(attention @ feats) * model.question_fusion(q))[0, c]
    (grad,) = torch.autograd.grad(y, attention)
    torch.testing.assert_close(cam[t], grad * attention.detach())
    with_graph = model.region_gradcam(batch, create_graph=True)
    assert with_graph.requires_grad


def test_backward_reaches_every_parameter(data):
    ds, batch = data
    model = _model(ds)
    out = model(batch)
    (out.scores.sum() + out.joint.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_bad_batches_are_refused(data):
    ds, batch = data
    model = _model(ds)
    with pytest.raises(TypeError, match="PackedBatch"):
        model(batch.image_features)
    wrong = PythiaVQA(PythiaConfig(len(ds.vocab), ds.num_answers, feature_dim=8))
    with pytest.raises(ValueError, match="64 dims"):
        wrong(batch)


def test_pythia_sizes():
    cfg = pythia_sizes(vocab_size=1000)
    assert (cfg.feature_dim, cfg.joint_dim, cfg.num_answers) == (2048, 5000, 3129)
    assert (cfg.classifier_text_hidden, cfg.classifier_image_hidden) == (300, 5000)
    with torch.device("meta"):  # build without allocating the ~100M parameters
        model = PythiaVQA(cfg)
    assert model.classifier.branches[1][3].out_features == 3129


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_lstm_is_pack_padded_sequence_bit_for_bit(seed):
    """The question encoder packs with the host-side plan of collate (no index tensor copied
    between host and device): the LSTM outputs and every gradient are the bits of
    ``pack_padded_sequence(enforce_sorted=False)`` / ``pad_packed_sequence`` (one CPU thread,
    as the trainer runs; ties in length included)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


    gen = torch.Generator().manual_seed(seed)
    lstm = nn.LSTM(12, 16, batch_first=True)
    width = 9
    lengths = torch.randint(1, width + 1, (40,), generator=gen)
    x = torch.randn(40, width, 12, generator=gen)
    upstream = torch.randn(40, width, 16, generator=gen)
    rows, batch_sizes = lstm_packing(lengths.tolist(), width)
    encoder = PythiaVQA(PythiaConfig(5, 3, embed_dim=12, text_hidden=16)).question_encoder
    encoder.lstm = lstm

    def run(packed: bool):
        leaf = x.clone().requires_grad_()
        if packed:
            hidden = encoder._packed_lstm(leaf, torch.tensor(rows), batch_sizes)
        else:
            sequence = pack_padded_sequence(leaf, lengths, batch_first=True, enforce_sorted=False)
            hidden = pad_packed_sequence(lstm(sequence)[0], batch_first=True,
                                         total_length=width)[0]
        return (hidden, *torch.autograd.grad((hidden * upstream).sum(),
                                             [leaf, *lstm.parameters()]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got, want = run(True), run(False)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="lengths must be in 1..9"):
        lstm_packing([3, 0], width)


class _BagOfWords(nn.Module):
    """A VQA model of another kind behind the interface: mean word embedding times mean
    region feature, a linear head, no region attention."""

    def __init__(self, vocab: int, answers: int, features: int, dim: int = 16) -> None:
        super().__init__()
        self.config = dataclasses.make_dataclass("BagConfig", [("dim", int)])(dim)
        self.embedding = nn.EmbeddingBag(vocab, dim)
        self.image = nn.Linear(features, dim)
        self.classifier = nn.Linear(dim, answers)

    def forward(self, batch, *, scores: bool = True):
        from sort_fast.models.pythia import PythiaOutput

        words = self.embedding(batch.question_tokens)
        mask = batch.image_mask[..., None].to(batch.image_features.dtype)
        regions = (batch.image_features * mask).sum(1) / mask.sum(1)
        joint = words * self.image(regions)[batch.image_index]
        return PythiaOutput(self.classifier(joint) if scores else None, joint, None)


def test_the_trainers_objectives_take_any_model_of_the_interface(data):
    """PythiaVQA is a VQAModel (and PythiaConfig builds it); a model of another kind behind
    the interface trains with SOrT's closed-form Grad-CAM (equal to the autograd reference in
    float64), and SQuINT refuses it in one line, for it has no region attention."""
    from sort_fast.models import VQAModel, VQAOutput
    from sort_fast.training import Objective

    ds, batch = data
    pythia = _model(ds)
    assert isinstance(pythia, VQAModel) and isinstance(pythia(batch), VQAOutput)
    assert type(pythia.config.build()) is PythiaVQA
    torch.manual_seed(0)
    other = _BagOfWords(len(ds.vocab), ds.num_answers, ds.feature_dim).double()
    assert isinstance(other, VQAModel)
    batch64 = batch.replace(image_features=batch.image_features.double(),
                            targets=batch.targets.double())
    kw = dict(lambda_reasoning=1.0, lambda_sub=1.0, lambda_irrelevant=0.5, margin=0.0,
              lambda_attention=1.0)
    results = []
    for naive in (False, True):
        loss, parts = Objective("sort", naive=naive, **kw)(other, batch64)
        grads = torch.autograd.grad(loss, list(other.parameters()))
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for fast, ref in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fast, ref)
    assert float(results[0][0]) > 0 and any(float(g.abs().sum()) > 0 for g in results[0][1])
    with pytest.raises(ValueError, match="--loss squint aligns region attention, which "
                                         "_BagOfWords does not give"):
        Objective("squint", naive=False, **kw)(other, batch64)
