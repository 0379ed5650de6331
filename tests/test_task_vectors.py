"""Task-vector merging (pleas.task_vectors): hand-computed results, identities and errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pleas.merged import load_merged, save_merged
from pleas.models import build_model
from pleas.pipeline import MergeError, ModelSide
from pleas.task_vectors import (TaskVectorError, dam, dare, merge_with_base, sens_coefficients,
                                sens_merging, task_arithmetic, ties_merging, weight_average)

torch.set_num_threads(1)


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> global mean -> Linear: a trunk with BatchNorm and a head."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.mid = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.mid(x)).mean((2, 3)))


def _base(seed: int = 0, num_classes: int = 3) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny(num_classes)
    with torch.no_grad():  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.num_batches_tracked.fill_(7)
    return m.eval()


def _finetune(base: nn.Module, seed: int, num_classes: int | None = None,
              scale: float = 0.2) -> Tiny:
    """base + a random task vector (a new random head when the class count changes)."""
    g = torch.Generator().manual_seed(seed)
    n = num_classes or base.fc.out_features
    torch.manual_seed(seed)
    m = Tiny(n)
    new = {}
    for k, v in base.state_dict().items():
        own = m.state_dict()[k]
        if v.shape != own.shape:
            new[k] = own
        elif v.is_floating_point():
            t = v + scale * torch.randn(v.shape, generator=g)
            new[k] = t.abs() if k.endswith("running_var") else t
        else:
            new[k] = v.clone()
    m.load_state_dict(new)
    return m.eval()


X = torch.randn(48, 1, 6, 6, generator=torch.Generator().manual_seed(5))


def _outputs(model, x=X):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, dict) else {"shared": y}


# ------------------------------------------------------------------ hand-computed, tiny tensors
T1 = torch.tensor([[4.0, -1.0, 0.5], [-3.0, 2.0, -0.2]])
T2 = torch.tensor([[-2.0, -3.0, 1.0], [-0.9, 0.1, 0.3]])
ZERO = {"w": torch.zeros(2, 3)}


def test_ties_sign_election_and_disjoint_mean():
    # density 1: no trimming.  Sums [[2,-4,1.5],[-3.9,2.1,0.1]] elect signs [[+,-,+],[-,+,+]];
    # the mean runs over the agreeing entries only.
    out = ties_merging(ZERO, [{"w": T1}, {"w": T2}], density=1.0, lam=1.0)["w"]
    want = torch.tensor([[4.0, -2.0, 0.75], [-1.95, 1.05, 0.3]])
    torch.testing.assert_close(out, want)
    # density 0.5 keeps ceil(0.5 * 6) = 3 entries of each task vector:
    # T1 -> [[4,0,0],[-3,2,0]], T2 -> [[-2,-3,1],[0,0,0]]; sums [[2,-3,1],[-3,2,0]]
    out = ties_merging(ZERO, [{"w": T1}, {"w": T2}], density=0.5, lam=1.0)["w"]
    torch.testing.assert_close(out, torch.tensor([[4.0, -3.0, 1.0], [-3.0, 2.0, 0.0]]))
    # lambda scales the merged task vector, added to the base
    base = {"w": torch.ones(2, 3)}
    out = ties_merging(base, [{"w": 1 + T1}, {"w": 1 + T2}], density=0.5, lam=0.5)["w"]
    torch.testing.assert_close(out, 1 + 0.5 * torch.tensor([[4.0, -3.0, 1.0], [-3.0, 2.0, 0.0]]))


def test_ties_statistics_are_averaged_not_trimmed():
    base = {"bn.running_mean": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(3)}
    n = "bn.num_batches_tracked"
    a = {"bn.running_mean": torch.tensor([1.0, 2.0, -4.0]), n: torch.tensor(9)}
    b = {"bn.running_mean": torch.tensor([3.0, -2.0, 0.0]), n: torch.tensor(5)}
    out = ties_merging(base, [a, b], density=0.2, lam=1.0)
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([2.0, 0.0, -2.0]))
    assert int(out["bn.num_batches_tracked"]) == 9  # integer buffers come from the first model


def test_task_arithmetic_with_lambda():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    a = {"w": torch.tensor([2.0, 2.0, 0.0])}  # tau_a = [1, 0, -3]
    b = {"w": torch.tensor([1.0, 4.0, 4.0])}  # tau_b = [0, 2, 1]
    for lam in (0.0, 0.3, 0.5, 1.0):
        out = task_arithmetic(base, [a, b], lam=lam)["w"]
        torch.testing.assert_close(out, torch.tensor([1.0 + lam, 2.0 + 2 * lam, 3.0 - 2 * lam]))
    # lambda = 1/2 is the weight average
    torch.testing.assert_close(task_arithmetic(base, [a, b], lam=0.5)["w"],
                               weight_average([a, b])["w"])
    torch.testing.assert_close(weight_average([a, b], [0.25, 0.75])["w"],
                               torch.tensor([1.25, 3.5, 3.0]))


def test_dare_rescaling_in_expectation():
    base = {"w": torch.zeros(400)}
    tau = torch.linspace(-1, 1, 400)
    p = 0.7
    runs = torch.stack([dare(base, [{"w": tau}], p=p, seed=s, lam=1.0)["w"] for s in range(300)])
    # every entry is either dropped (0) or rescaled by 1 / (1 - p)
    kept = runs != 0
    torch.testing.assert_close(runs[kept], (tau / (1 - p)).expand_as(runs)[kept])
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    # unbiased: the mean over seeds approaches tau (standard error ~ |tau| * 0.088)
    assert (runs.mean(0) - tau).abs().max() < 0.45
    assert (runs.mean(0) - tau).abs().mean() < 0.06
    # seeded: same seed, same result; another seed, another mask
    torch.testing.assert_close(dare(base, [{"w": tau}], p=p, seed=3)["w"],
                               dare(base, [{"w": tau}], p=p, seed=3)["w"])
    assert not torch.equal(dare(base, [{"w": tau}], p=p, seed=3)["w"],
                           dare(base, [{"w": tau}], p=p, seed=4)["w"])


def test_dare_without_dropping_is_its_combination():
    states = [{"w": T1}, {"w": T2}]
    torch.testing.assert_close(dare(ZERO, states, p=0.0, combine="ties", lam=1.0)["w"],
                               ties_merging(ZERO, states, density=1.0, lam=1.0)["w"])
    torch.testing.assert_close(dare(ZERO, states, p=0.0, combine="sum", lam=0.3)["w"],
                               task_arithmetic(ZERO, states, lam=0.3)["w"])


def test_sens_coefficients_by_hand():
    sens = {"l1": [1.0, 3.0], "l2": [2.0, 2.0]}
    # alpha_a = [1, 2] / 1.5, alpha_b = [3, 2] / 2.5; sigma = 2 softmax over the models
    sig = sens_coefficients(sens, temperature=1.0)
    for layer, (aa, ab) in {"l1": (2 / 3, 1.2), "l2": (4 / 3, 0.8)}.items():
        ea, eb = math.exp(aa), math.exp(ab)
        assert sig[layer] == pytest.approx([2 * ea / (ea + eb), 2 * eb / (ea + eb)])
    # equal sensitivities: sigma = 1 (plain task arithmetic); beta tilts towards a model
    assert sens_coefficients({"l": [5.0, 5.0]})["l"] == pytest.approx([1.0, 1.0])
    sig = sens_coefficients({"l": [1.0, 1.0]}, beta=[1.0, 0.5], temperature=0.5)
    e1, e2 = math.exp(2.0), math.exp(1.0)
    assert sig["l"] == pytest.approx([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)])


def test_sens_sensitivity_is_gradient_times_task_vector():
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    models = []
    for s in (1, 2):
        m = nn.Linear(3, 2)
        with torch.no_grad():
            m.weight.copy_(base.weight + 0.3 * torch.randn(2, 3))
            m.bias.copy_(base.bias + 0.3 * torch.randn(2))
        models.append(m)
    x = torch.randn(10, 3)
    ys = [torch.randint(0, 2, (10,)), torch.randint(0, 2, (10,))]
    _, det = sens_merging(base, models, [[(x, ys[0])], [(x, ys[1])]], lam=0.5)
    for i, m in enumerate(models):
        with torch.no_grad():  # cross-entropy gradient by hand: (softmax - onehot)^T x / N
            r = torch.softmax(m(x), 1) - F.one_hot(ys[i], 2).float()
            gw, gb = r.T @ x / 10, r.mean(0)
            want = float(((gw * (m.weight - base.weight)).abs().sum()
                          + (gb * (m.bias - base.bias)).abs().sum()))
        # a bare Linear's tensors are top-level keys: each is its own layer
        got = det["sensitivity"]["weight"][i] + det["sensitivity"]["bias"][i]
        assert got == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------ whole models
MODELS_ARGS = [
    ("task_arithmetic", {"lam": 0.5}),
    ("ties", {"density": 1.0, "lam": 1.0}),
    ("dare", {"p": 0.0, "combine": "sum", "lam": 0.5}),
    ("dare", {"p": 0.0, "combine": "ties", "lam": 1.0}),
    ("sens", {"lam": 0.5}),
    ("dam", {"steps": 15}),
    ("weight_average", {}),
]


def _labelled(n_a=3, n_b=3):
    g = torch.Generator().manual_seed(1)
    return [[(X[:24], torch.randint(0, n_a, (24,), generator=g))],
            [(X[24:], torch.randint(0, n_b, (24,), generator=g))]]


@pytest.mark.parametrize("heads", ["separate", "shared"])
@pytest.mark.parametrize("method,params", MODELS_ARGS)
def test_a_equals_b_returns_that_model(method, params, heads):
    base = _base()
    a = _finetune(base, 1)
    b = _finetune(base, 1)
    merged, report = merge_with_base(method, a, b, base, data=X, labelled=_labelled(),
                                     heads=heads, recalibrate=False, progress=False, **params)
    want = _outputs(a)["shared"]
    for y in _outputs(merged).values():
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert report["shared_base"] is True and report["method"] == method


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lam": 0.0}), ("ties", {"lam": 0.0}), ("dare", {"lam": 0.0}),
    ("dare", {"lam": 0.0, "combine": "ties"}), ("sens", {"lam": 0.0}),
    ("dam", {"init": 0.0, "steps": 0})])
def test_lambda_zero_returns_the_base(method, params):
    base = _base()
    a, b = _finetune(base, 1), _finetune(base, 2)
    # separate heads: the trunk is the base's, each head its model's own
    merged, _ = merge_with_base(method, a, b, base, data=X, labelled=_labelled(),
                                recalibrate=False, progress=False, **params)
    state = merged.net.state_dict()
    for k, v in base.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(state[k], v)
    torch.testing.assert_close(state["fc.weight"], torch.cat([a.fc.weight, b.fc.weight]))
    # shared head: the whole model is the base
    merged, _ = merge_with_base(method, a, b, base, data=X, labelled=_labelled(),
                                heads="shared", recalibrate=False, progress=False, **params)
    torch.testing.assert_close(_outputs(merged)["shared"], _outputs(base)["shared"])


def test_separate_heads_layout_and_names():
    base = _base()
    a, b = _finetune(base, 1), _finetune(base, 2, num_classes=5)
    merged, report = merge_with_base("task_arithmetic", ModelSide(a, "A", task="left"),
                                     ModelSide(b, "B", task="right"), base, data=X,
                                     progress=False)
    assert [(h.task, h.start, h.stop) for h in merged.heads] == [("left", 0, 3), ("right", 3, 8)]
    out = merged(X[:4])
    assert out["left"].shape == (4, 3) and out["right"].shape == (4, 5)
    assert report["recalibrated"] is True and report["heads"] == "separate"
    assert report["params"] == {"lam": 0.3}
    assert set(report["head_tensors"]) == {"fc.weight", "fc.bias"}
    # the heads are the models' own; the BN statistics were recomputed on the data
    torch.testing.assert_close(merged.net.fc.weight[3:], b.fc.weight)
    merged.net.train()
    with torch.no_grad():
        h = merged.net.conv(X)
    torch.testing.assert_close(merged.net.bn.running_mean, h.mean((0, 2, 3)), atol=1e-5,
                               rtol=1e-5)


def test_dam_lowers_its_objective():
    base = _base()
    a, b = _finetune(base, 1, scale=0.4), _finetune(base, 2, num_classes=4, scale=0.4)
    data = [[X[:16], X[16:32]], [X[32:], X[:16]]]
    for per in ("layer", "channel"):
        state, det = dam(base.state_dict() | {}, [a, b], data, steps=40, lr=0.05, per=per,
                         keys=[k for k in base.state_dict() if not k.startswith("fc.")],
                         progress=False)
        obj = det["objective"]
        assert obj["final"] < obj["initial"] * 0.98, obj
        assert len(det["curve"]) == 40 and "fc.weight" not in state
    # seeded: the same call gives the same result
    s1, _ = dam(base, [a, _finetune(base, 2)], data, steps=5, seed=3, progress=False)
    s2, _ = dam(base, [a, _finetune(base, 2)], data, steps=5, seed=3, progress=False)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k])


def test_different_bases_are_reported():
    base = _base(0)
    a = _finetune(base, 1)
    b = _finetune(_base(9), 2)  # fine-tuned from another initialisation
    _, report = merge_with_base("task_arithmetic", a, b, base, data=X, progress=False)
    assert report["shared_base"] is False
    assert "do not appear to share this base" in report["warnings"][0]
    assert report["base_check"]["median_cosine_to_base"]["b"] < 0.5


def test_save_and_load_the_merged_model(tmp_path):
    cfg = {"in_features": 36, "hidden": [8], "num_classes": 3}
    torch.manual_seed(0)
    base = build_model("mlp", **cfg).eval()
    a, b = build_model("mlp", **cfg).eval(), build_model("mlp", **cfg).eval()
    with torch.no_grad():
        for m in (a, b):
            for p, q in zip(m.parameters(), base.parameters()):
                p.copy_(q + 0.1 * torch.randn_like(q))
    merged, _ = merge_with_base("ties", ModelSide(a, "a", task="t1", arch="mlp", config=cfg),
                                ModelSide(b, "b", task="t2", arch="mlp", config=cfg), base,
                                data=X, progress=False)
    save_merged(merged, tmp_path / "m")
    back = load_merged(tmp_path / "m")
    for k, y in _outputs(merged).items():
        torch.testing.assert_close(_outputs(back)[k], y)


# ------------------------------------------------------------------ errors
def test_errors():
    base = _base()
    a, b = _finetune(base, 1), _finetune(base, 2)
    kw = {"data": X, "progress": False}
    with pytest.raises(TaskVectorError, match="drop probability"):
        merge_with_base("dare", a, b, base, p=1.0, **kw)
    with pytest.raises(TaskVectorError, match="drop probability"):
        dare(ZERO, [{"w": T1}], p=-0.1)
    for bad in (0.0, 1.5):
        with pytest.raises(TaskVectorError, match="density"):
            ties_merging(ZERO, [{"w": T1}], density=bad)
    with pytest.raises(TaskVectorError, match="density"):
        merge_with_base("ties", a, b, base, density=0, **kw)
    with pytest.raises(TaskVectorError, match="unknown task-vector method"):
        merge_with_base("slerp", a, b, base, **kw)
    with pytest.raises(TaskVectorError, match="unknown parameter"):
        merge_with_base("ties", a, b, base, p=0.3, **kw)
    with pytest.raises(TaskVectorError, match="needs the common base"):
        merge_with_base("task_arithmetic", a, b, None, **kw)
    # NaN parameters
    nan = _finetune(base, 3)
    with torch.no_grad():
        nan.mid.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(TaskVectorError, match="NaN"):
        merge_with_base("task_arithmetic", a, nan, base, **kw)
    with pytest.raises(TaskVectorError, match="NaN"):
        task_arithmetic(base.state_dict(), [a.state_dict(), nan.state_dict()])
    # architectures: another trunk shape, other keys
    other = Tiny()
    other.mid = nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(TaskVectorError, match="mismatched architectures"):
        merge_with_base("task_arithmetic", a, other, base, **kw)
    with pytest.raises(TaskVectorError, match="mismatched architectures"):
        merge_with_base("task_arithmetic", a, nn.Sequential(nn.Flatten(), nn.Linear(36, 3)),
                        base, **kw)
    with pytest.raises(TaskVectorError, match="mismatched architectures"):
        task_arithmetic({"w": torch.zeros(2)}, [{"w": torch.zeros(3)}])
    # a base of another architecture
    with pytest.raises(TaskVectorError, match="base is not the models' architecture"):
        merge_with_base("task_arithmetic", a, b, other, **kw)
    # heads
    b5 = _finetune(base, 2, num_classes=5)
    with pytest.raises(TaskVectorError, match="3 classes and model B 5"):
        merge_with_base("task_arithmetic", a, b5, base, heads="shared", **kw)
    with pytest.raises(TaskVectorError, match="base's head"):
        merge_with_base("task_arithmetic", b5, _finetune(base, 4, num_classes=5), base,
                        heads="shared", **kw)
    with pytest.raises(TaskVectorError, match="labelled"):
        merge_with_base("sens", a, b, base, **kw)
    with pytest.raises(TaskVectorError, match="unlabeled data"):
        merge_with_base("dam", a, b, base, example_shape=(2, 1, 6, 6), progress=False)
    assert issubclass(TaskVectorError, MergeError)  # the CLI's error handling applies
