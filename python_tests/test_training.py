"""Training wrappers, loss recipes, trainer resume and checkpoints (drs_ext/train/,
drs_ext/io/checkpoint.py, drs_ext/models.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import drs_ext
from drs_ext.io.checkpoint import (
    BranchSpec,
    check_drs_pair,
    check_sigma,
    load_branch,
    load_checkpoint,
    save_checkpoint,
)
from drs_ext.io.data import TensorDataset
from drs_ext.models import build_model
from drs_ext.train import (
    RECIPES,
    Macer,
    NoisyBranch,
    SmoothAdv,
    TrainConfig,
    Trainer,
    finetune_branches,
    make_recipe,
    training_seed,
)

SIZE = 8


def tiny_model(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "digits_cnn", num_classes=num_classes, in_channels=1, arch_kwargs={"width": 4}
    )


def tiny_batch(n: int = 16, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(n) % num_classes
    # Class c lights up the c-th horizontal band: learnable in a few steps, even through noise.
    x = 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=gen)
    for c in range(num_classes):
        x[y == c, :, c * 2 : c * 2 + 3, :] += 0.8
    return x.clamp(0, 1), y


def tiny_spec(**changes) -> BranchSpec:
    spec = BranchSpec(
        arch="digits_cnn",
        num_classes=3,
        input_shape=(1, SIZE, SIZE),
        sigma=0.25,
        arch_kwargs={"width": 4},
    )
    return dataclasses.replace(spec, **changes)


# -- NoisyBranch -----------------------------------------------------------------------------


@pytest.mark.parametrize("fill", drs_ext.ops.FILLS)
@pytest.mark.parametrize("branch", [0, 1])
def test_noisy_branch_views_are_the_certification_views(fill, branch):
    x, _ = tiny_batch(4)
    noisy = NoisyBranch(tiny_model(), 0.3, partition="diag", branch=branch, fill=fill, seed=5)
    got = noisy.views(x, num=2)
    want = drs_ext.noisy_views(
        x,
        [0.3, 0.3],
        num=2,
        seed=noisy.seed,
        offset=0,
        stream=torch.arange(4),
        partition="diag",
        fill=fill,
    )[:, branch]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert noisy.noise_offset == 2


def test_noisy_branch_draws_fresh_noise_each_step_and_replays_an_offset():
    x, _ = tiny_batch(4)
    noisy = NoisyBranch(tiny_model(), 0.3, partition="none")
    first, second = noisy.views(x), noisy.views(x)
    assert not torch.equal(first, second)
    torch.testing.assert_close(noisy.views(x, offset=0), first, rtol=0, atol=0)
    assert noisy(x).shape == (4, 3)
    assert noisy.logits(x, 5).shape == (4, 5, 3)


def test_training_noise_key_is_not_a_certification_seed():
    keys = {training_seed(s) for s in range(100)}
    assert len(keys) == 100 and all(k >= 2**32 for k in keys) and max(keys) < 2**63
    assert training_seed(0, "eval") != training_seed(0)


def test_noisy_branch_rejects_missing_branch():
    with pytest.raises(ValueError, match="branch 1"):
        NoisyBranch(tiny_model(), 0.3, partition="none", branch=1)


# -- recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("partition, branch", [("none", 0), ("diag", 1)])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_finite_trains_and_reaches_every_parameter(name, partition, branch):
    x, y = tiny_batch()
    model = tiny_model()
    noisy = NoisyBranch(model, 0.25, partition=partition, branch=branch)
    recipe = make_recipe(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(25):
        loss, logits = recipe(noisy, x, y)
        assert torch.isfinite(loss) and logits.shape[:1] == (16,) and logits.shape[-1] == 3
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for pname, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert any(p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_consistency_matches_jeong_and_shin_formula():
    x, y = tiny_batch(6)
    noisy = NoisyBranch(tiny_model(), 0.25)
    recipe = make_recipe("consistency", m=3, lam=2.0, eta=0.7)
    loss, logits = recipe(noisy, x, y)
    # Their train_consistency.py, written out: per-copy CE and KL(mean ∥ copy), entropy of mean.
    copies = logits.unbind(dim=1)
    ce = sum(F.cross_entropy(c, y) for c in copies) / 3
    mean = sum(F.softmax(c, dim=1) for c in copies) / 3
    kl = sum((mean * (mean.log() - F.log_softmax(c, dim=1))).sum(1) for c in copies) / 3
    ent = -(mean * mean.log()).sum(1)
    torch.testing.assert_close(loss, ce + 2.0 * kl.mean() + 0.7 * ent.mean())


def test_smoothadv_attack_goes_through_noisy_views_and_stays_in_budget():
    x, y = tiny_batch(8)
    noisy = NoisyBranch(tiny_model(), 0.25, partition="diag", branch=0, fill="neighbors")
    recipe = SmoothAdv(m=4, epsilon=0.5, steps=3)
    offset = noisy.reserve(4)

    def soft_loss(inp: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(noisy.logits(inp, 4, offset), dim=-1).mean(1)
        return F.nll_loss(prob.log(), y, reduction="none")

    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft_loss(x_req).sum(), [x_req])
    assert grad.abs().sum() > 0  # the gradient reaches the input through noisy_views
    noisy.eval()
    x_adv = recipe.attack(noisy, x, y, offset, 0.5)
    delta = (x_adv - x).flatten(1).norm(dim=1)
    assert (delta <= 0.5 + 1e-5).all() and (delta > 0).any()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert soft_loss(x_adv).mean() > soft_loss(x).mean()


def test_smoothadv_warms_epsilon_up():
    recipe = SmoothAdv(epsilon=1.0, warmup=4)
    recipe.start_epoch(0)
    assert recipe.current_epsilon == pytest.approx(0.25)
    recipe.start_epoch(9)
    assert recipe.current_epsilon == 1.0
    assert "current_epsilon" not in recipe.to_dict()


def test_macer_stays_finite_when_the_softmax_saturates():
    class Confident(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, v):  # huge logits: Φ⁻¹(1) = inf for the top class
            return self.scale * 1e4 * torch.stack([v.mean((1, 2, 3)), -v.mean((1, 2, 3))], 1)

    x, _ = tiny_batch(4)
    noisy = NoisyBranch(Confident(), 0.25)
    loss, _ = Macer(m=4)(noisy, x, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(noisy.model.scale.grad)


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown recipe"):
        make_recipe("mixup")
    with pytest.raises(
        ValueError, match=r"no parameter \['lamda'\]; it takes \['eta', 'lam', 'm'\]"
    ):
        make_recipe("consistency", lamda=1.0)


# -- trainer ---------------------------------------------------------------------------------


def _trainer(tmp_path, epochs, name="model.pt", **spec_changes):
    x, y = tiny_batch(24)
    config = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, progress=False, milestones=[1])
    return Trainer(
        tiny_model(),
        tiny_spec(**spec_changes),
        make_recipe("gaussian"),
        TensorDataset(x, y),
        config,
        tmp_path / name,
        eval_data=TensorDataset(x[:6], y[:6]),
    )


def test_trainer_resume_equals_an_uninterrupted_run(tmp_path):
    straight = _trainer(tmp_path / "a", epochs=3)
    straight.fit()
    first = _trainer(tmp_path / "b", epochs=1)
    first.fit()
    resumed = _trainer(tmp_path / "b", epochs=3)
    resumed.fit(resume=True)
    for p, q in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed.branch.noise_offset == straight.branch.noise_offset
    log = (tmp_path / "b" / "model.log.csv").read_text().splitlines()
    assert log[0].split(",")[:3] == ["epoch", "loss", "noisy_acc"] and len(log) == 4
    assert [r["epoch"] for r in resumed.log] == [1, 2, 3]
    assert resumed.log[1]["lr"] == pytest.approx(0.005)  # the scheduler state came back too


def test_trainer_refuses_to_clobber_or_resume_a_different_run(tmp_path):
    _trainer(tmp_path, epochs=1).fit()
    with pytest.raises(FileExistsError, match="resume"):
        _trainer(tmp_path, epochs=1).fit()
    with pytest.raises(ValueError, match="cannot resume"):
        _trainer(tmp_path, epochs=2, sigma=0.5).fit(resume=True)


def test_finetune_branches_copies_the_pretrained_model_into_two_branches(tmp_path):
    x, y = tiny_batch(24)
    pretrained = tiny_model()
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, optimizer="adam", progress=False)
    left, right = finetune_branches(
        pretrained,
        tiny_spec(),
        make_recipe("consistency"),
        TensorDataset(x, y),
        config,
        tmp_path,
        sigma=0.2,
        fill="pair",
    )
    for k, v in pretrained.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    specs = []
    for branch, model in enumerate((left, right)):
        loaded, spec = load_branch(tmp_path / f"branch{branch}.pt")
        specs.append(spec)
        assert (spec.partition, spec.branch, spec.fill, spec.sigma) == ("diag", branch, "pair", 0.2)
        assert spec.recipe["name"] == "consistency" and spec.recipe["lam"] == 10.0
        torch.testing.assert_close(loaded(x), model(x))
    assert not torch.equal(left.state_dict()["0.weight"], right.state_dict()["0.weight"])
    assert check_drs_pair(specs[1], specs[0]) == (1, 0)


# -- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_the_model_without_flags(tmp_path):
    model = build_model(
        "cifar_resnet",
        num_classes=4,
        in_channels=3,
        arch_kwargs={"depth": 8},
        normalization={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
    ).eval()
    spec = BranchSpec(
        arch="cifar_resnet",
        num_classes=4,
        input_shape=(3, 8, 8),
        sigma=0.5,
        partition="diag",
        branch=1,
        fill="bilinear",
        recipe={"name": "gaussian"},
        arch_kwargs={"depth": 8},
        normalization={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
    )
    save_checkpoint(tmp_path / "m.pt", model, spec)
    loaded, loaded_spec = load_branch(tmp_path / "m.pt")
    assert loaded_spec == spec and not loaded.training
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    raw = load_checkpoint(tmp_path / "m.pt")
    assert raw["format"] == "drs_ext.branch" and raw["format_version"] == 1
    assert "train_state" not in raw and not (tmp_path / "m.pt.tmp").exists()


def test_checkpoint_errors_are_clear(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_branch(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable drs_ext checkpoint"):
        load_branch(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save(tiny_model().state_dict(), foreign)
    with pytest.raises(ValueError, match="not a drs_ext checkpoint"):
        load_branch(foreign)
    good = tmp_path / "good.pt"
    save_checkpoint(good, tiny_model(), tiny_spec())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_branch(truncated)
    wrong_arch = load_checkpoint(good)
    wrong_arch["arch_kwargs"] = {"width": 8}
    torch.save(wrong_arch, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_branch(tmp_path / "wrong.pt")


def test_drs_pair_and_sigma_checks():
    left = tiny_spec(partition="diag", branch=0)
    right = tiny_spec(partition="diag", branch=1)
    assert check_drs_pair(left, right) == (0, 1)
    with pytest.raises(ValueError, match="fill"):
        check_drs_pair(left, dataclasses.replace(right, fill="zeros"))
    with pytest.raises(ValueError, match="sigma"):
        check_drs_pair(left, dataclasses.replace(right, sigma=0.5))
    with pytest.raises(ValueError, match="branch-0 and one branch-1"):
        check_drs_pair(left, left)
    with pytest.raises(ValueError, match="RS model"):
        check_drs_pair(tiny_spec(), right)
    assert check_sigma(left, None) == 0.25 and check_sigma(left, 0.25) == 0.25
    with pytest.raises(ValueError, match="--sigma 0.5 does not match"):
        check_sigma(left, 0.5)
    with pytest.raises(ValueError, match="even width"):
        tiny_spec(partition="diag", input_shape=(1, 8, 7))
