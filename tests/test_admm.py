"""The ADMM engine: a toy problem with a known sparse optimum, the update rules, FP8 state."""

import pytest
import torch
from torch import nn

from sparsebench.engine.admm import ADMM, FP8_MAX, LambdaSchedule, Stored
from sparsebench.errors import SparsebenchError
from sparsebench.sparsity import Pattern, Ramp


def _least_squares(seed=0, rows=4, cols=32, nnz=32):
    g = torch.Generator().manual_seed(seed)
    wstar = torch.randn(rows, cols, generator=g) * 2
    support = torch.zeros(rows * cols, dtype=torch.bool)
    support[torch.randperm(rows * cols, generator=g)[:nnz]] = True
    wstar = wstar * support.view(rows, cols)
    x = torch.randn(512, cols, generator=g)
    return wstar, x, x @ wstar.t()


@pytest.mark.parametrize("projection", ["objective", "magnitude"])
@pytest.mark.parametrize(
    "fmt", [("float32", "float32", True), ("fp8", "bfloat16", True), ("fp8", "bfloat16", False)]
)
def test_admm_recovers_known_sparse_optimum(projection, fmt):
    _solve_toy(projection, fmt)


def _solve_toy(projection, fmt):
    wstar, x, y = _least_squares()
    torch.manual_seed(0)
    lin = nn.Linear(32, 4, bias=False)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, betas=(0.9, 0.95))
    steps = 400
    admm = ADMM(
        {"w": lin.weight},
        opt,
        0.75,
        Pattern(),
        steps,
        interval=10,
        lam=LambdaSchedule("constant", 0, 1.0),
        projection=projection,
        z_format=fmt[0],
        u_format=fmt[1],
        residual=fmt[2],
    )
    dists = []
    for step in range(steps):
        opt.zero_grad()
        ((lin(x) - y) ** 2).mean().backward()
        admm.add_penalty(step)
        opt.step()
        admm.after_step(step)
        dists.append(admm.distance())
    kept, support = admm.finalize()["w"], wstar != 0
    plain_fp8 = fmt[0] == "fp8" and not fmt[2]
    if plain_fp8:
        # A plain FP8 z rounds each kept value by up to 2^-4 of it and pulls w onto that grid,
        # so an entry of w* below the grid's step at the largest weight (2^-4 max|w*|; this
        # draw has one, 0.063 against 0.235) can trade places with an off-support entry by the
        # CPU's last bits. Every entry above it is found, and the count is exact.
        resolvable = support & (wstar.abs() >= 2**-4 * wstar.abs().max())
        assert kept[resolvable].all() and kept.sum() == support.sum()
        checked = ~(support & ~resolvable)
    else:
        assert torch.equal(kept, support)  # the support is found
        checked = torch.ones_like(support)
    # w converges to the feasible set; a plain FP8 z stops at its rounding (~2^-5 relative)
    floor = 0.5 if plain_fp8 else 0.1
    assert dists[-1] < floor * dists[0]
    torch.testing.assert_close(lin.weight.detach()[checked], wstar[checked], atol=0.05, rtol=0.05)
    return lin.weight.detach()


def test_fp8_residual_coding_removes_the_grid_pull():
    """With a plain FP8 z the kept weights converge onto the FP8 grid; with the residual
    riding in u they converge to the float32 engine's solution."""
    full = _solve_toy("magnitude", ("float32", "float32", True))
    coded = _solve_toy("magnitude", ("fp8", "bfloat16", True))
    plain = _solve_toy("magnitude", ("fp8", "bfloat16", False))
    err_coded, err_plain = (coded - full).abs().max(), (plain - full).abs().max()
    assert err_coded < 0.2 * err_plain, (err_coded, err_plain)


def test_fp8_residual_coding_tracks_exact_admm():
    """Same weight trajectory: z and u read back from an FP8 z equal float32 ADMM's. (u in float32
    here, so that bfloat16's own rounding of u cannot flip near-ties of the projection.)"""
    torch.manual_seed(0)
    w_full = nn.Parameter(torch.randn(16, 32))
    w_fp8 = nn.Parameter(w_full.detach().clone())
    kw = dict(
        sparsity=0.75,
        pattern=Pattern(),
        total_steps=40,
        interval=4,
        projection="magnitude",
        lam=LambdaSchedule("constant", 0, 0.5),
    )
    exact = ADMM({"w": w_full}, torch.optim.SGD([w_full], lr=0.05), **kw)
    coded = ADMM(
        {"w": w_fp8}, torch.optim.SGD([w_fp8], lr=0.05), z_format="fp8", u_format="float32", **kw
    )
    for step in range(40):
        g = torch.randn(16, 32)
        for p, admm in ((w_full, exact), (w_fp8, coded)):
            p.grad = g.clone()
            admm.add_penalty(step)
            p.data.sub_(0.05 * p.grad)
            admm.after_step(step)
        w_fp8.data.copy_(w_full.data)  # identical trajectories: only the storage differs
        z, u = exact.z["w"].get(), exact.u["w"].get()
        assert torch.equal(coded.keep("w"), z != 0)
        assert ((z * u) == 0).all()  # exact ADMM: disjoint supports, the slot the residual uses
        assert (coded.z["w"].get() != z).any()  # the FP8 z itself is rounded ...
        torch.testing.assert_close(
            coded.z_value("w"), z, atol=1e-5, rtol=1e-5
        )  # ... the value read back is not
        assert (coded.u_value("w")[z != 0] == 0).all()
        torch.testing.assert_close(coded.u_value("w"), u, atol=1e-5, rtol=1e-5)
    assert coded.state_bytes()["z"] == 16 * 32 + 4


def test_updates_follow_the_equations():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    admm = ADMM(
        {"w": lin.weight},
        opt,
        0.5,
        Pattern(),
        10,
        interval=3,
        lam=LambdaSchedule("constant", 0, 0.3),
        projection="magnitude",
    )
    w0 = lin.weight.detach().clone()
    z0 = admm.z["w"].get()
    assert int((z0 == 0).sum()) == 16 and torch.equal(
        z0, w0 * (w0.abs() >= w0.abs().flatten().kthvalue(17).values)
    )
    assert torch.equal(admm.u["w"].get(), torch.zeros(4, 8))
    g = torch.randn(4, 8)
    lin.weight.grad = g.clone()
    admm.add_penalty(0)
    torch.testing.assert_close(lin.weight.grad, g + 0.3 * (w0 - z0))
    opt.step()
    w1 = lin.weight.detach().clone()
    assert admm.after_step(0)  # step 0 updates
    z1, u1 = admm.z["w"].get(), admm.u["w"].get()
    keep = w1.abs() >= w1.abs().flatten().kthvalue(17).values
    torch.testing.assert_close(z1, w1 * keep)
    torch.testing.assert_close(u1, w1 - z1)
    assert not admm.after_step(1) and not admm.after_step(2) and admm.after_step(3)


def test_objective_projection_uses_adam_second_moment():
    lin = nn.Linear(2, 1, bias=False)
    lin.weight.data = torch.tensor([[1.0, 2.0]])
    opt = torch.optim.Adam(lin.parameters())
    admm = ADMM({"w": lin.weight}, opt, 0.5, Pattern(), 10, interval=1, projection="objective")
    opt.state[lin.weight]["exp_avg_sq"] = torch.tensor([[100.0, 1.0]])  # curvature favours column 0
    admm.after_step(0)
    assert admm.keep("w").tolist() == [[True, False]]  # magnitude would keep column 1
    assert admm.churn == 1.0  # both entries flipped from the magnitude init


def test_nm_projection_and_ramp():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4, bias=False)
    opt = torch.optim.Adam(lin.parameters())
    admm = ADMM({"w": lin.weight}, opt, 0.5, Pattern(2, 4), 10, interval=1, projection="magnitude")
    assert (admm.z["w"].get().view(4, 4, 4) != 0).sum(-1).le(2).all()
    ramped = ADMM({"w": lin.weight}, opt, 0.75, Pattern(), 100, ramp=Ramp("cubic", 0.25, 0.0, 0.5))
    assert int((ramped.z["w"].get() == 0).sum()) == 16  # starts at 25%
    ramped.after_step(0)
    ramped.after_step(60 - 60 % 32 + 32)  # past the ramp end
    assert int((~ramped.keep("w")).sum()) == 48


def test_lambda_schedules():
    assert LambdaSchedule("constant", 0, 0.01).at(5, 10) == 0.01
    lin = LambdaSchedule("linear", 0.0, 1.0)
    assert lin.at(0, 11) == 0.0 and lin.at(5, 11) == pytest.approx(0.5) and lin.at(10, 11) == 1.0
    cos = LambdaSchedule("cosine", 0.0, 1.0)
    assert (
        cos.at(0, 11) == pytest.approx(0.0)
        and cos.at(5, 11) == pytest.approx(0.5)
        and cos.at(10, 11) == pytest.approx(1.0)
    )
    exp = LambdaSchedule("exponential", 0.01, 1.0)
    assert exp.at(5, 11) == pytest.approx(0.1)
    with pytest.raises(SparsebenchError, match="valid: constant, linear"):
        LambdaSchedule("step")


def test_fp8_round_trip_error_bound():
    torch.manual_seed(0)
    x = torch.randn(64, 64) * torch.logspace(-3, 1, 64)  # many magnitudes
    x[x.abs() < 0.01] = 0  # sparse, like z
    s = Stored(x, "fp8")
    assert s.data.dtype == torch.float8_e4m3fn and s.data.element_size() == 1
    scale = float(s.scale)
    assert scale == pytest.approx(float(x.abs().max()) / FP8_MAX * 1.05)
    err = (s.get() - x).abs()
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values; subnormal
    # spacing 2^-9 * scale -> absolute error <= 2^-10 * scale.
    bound = torch.maximum(x.abs() * 2**-4, torch.full_like(x, scale * 2**-10))
    assert (err <= bound + 1e-12).all()
    assert (s.get()[x == 0] == 0).all()  # zeros stay exact
    assert torch.isfinite(s.get()).all()
    b = Stored(x, "bfloat16")
    assert ((b.get() - x).abs() <= x.abs() * 2**-8 + 1e-30).all()


def test_state_bytes_are_measured():
    lin = nn.Linear(64, 32, bias=False)
    opt = torch.optim.Adam(lin.parameters())
    lin.weight.grad = torch.zeros_like(lin.weight)
    opt.step()
    full = ADMM({"w": lin.weight}, opt, 0.5, Pattern(), 10).state_bytes()
    light = ADMM(
        {"w": lin.weight}, opt, 0.5, Pattern(), 10, z_format="fp8", u_format="bfloat16"
    ).state_bytes()
    n = 64 * 32
    assert full["z"] == 4 * n and full["u"] == 4 * n and full["optimizer"] >= 8 * n
    assert light["z"] == n + 4 and light["u"] == 2 * n and light["params"] == n


def test_u_is_rescaled_when_lambda_changes():
    """Scaled-form ADMM: u = y / lam. With the weights held still (no optimizer steps),
    the second z/u update sees lam go 0.5 -> 1.0 and must use u * 0.5 before the u-step."""
    w = nn.Parameter(torch.tensor([[3.0, -1.0, 0.5, 2.0]]))
    admm = ADMM(
        {"w": w},
        torch.optim.SGD([w], lr=0.0),
        0.5,
        Pattern(),
        total_steps=3,
        interval=1,
        lam=LambdaSchedule("linear", 0.5, 1.0),
        projection="magnitude",
    )
    # z0 = Proj(w) = [3, 0, 0, 2], u0 = 0; update at step 0 (lam 0.5): z = [3,0,0,2], u = w - z
    admm.after_step(0)
    u1 = admm.u["w"].get().clone()
    torch.testing.assert_close(u1, torch.tensor([[0.0, -1.0, 0.5, 0.0]]))
    admm.after_step(2)  # lam(2) = 1.0: u is halved first, then u + w - z
    scaled = u1 * 0.5
    z = (w.detach() + scaled) * torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(admm.u["w"].get(), scaled + w.detach() - z)
    assert admm.lam_at_update == 1.0


def test_dual_carries_over_a_lambda_ramp():
    """f(w) = 0.5 ||w - a||^2 under a lambda ramp (u rescaled at each change): the run ends
    at the KKT point of the final lambda, lam * u = a on the pruned entries."""
    a = torch.tensor([[4.0, -0.3, 2.5, 0.2, -3.0, 0.1]])
    w = nn.Parameter(a.clone())
    steps = 3000
    admm = ADMM(
        {"w": w},
        torch.optim.SGD([w], lr=0.05),
        0.5,
        Pattern(),
        steps,
        interval=5,
        lam=LambdaSchedule("exponential", 0.05, 2.0),
        projection="magnitude",
    )
    for step in range(steps):
        w.grad = w.detach() - a
        admm.add_penalty(step)
        w.data.sub_(0.05 * w.grad)
        admm.after_step(step)
    pruned = ~admm.keep("w")
    assert pruned.tolist() == [[False, True, False, True, False, True]]
    lam = admm.lam.at(steps - 1, steps)
    torch.testing.assert_close(lam * admm.u["w"].get()[pruned], a[pruned], atol=2e-3, rtol=1e-2)


def test_update_offset_moves_the_z_u_steps():
    w = nn.Parameter(torch.randn(2, 8))
    admm = ADMM({"w": w}, torch.optim.SGD([w], lr=0.1), 0.5, Pattern(), 100, interval=4, offset=1)
    ran = [step for step in range(12) if admm.after_step(step)]
    assert ran == [3, 7, 11]  # the released SAFE code: (step + 1) % interval == 0
