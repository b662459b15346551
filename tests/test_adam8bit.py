"""8-bit Adam: quantization error bounds and agreement with float32 Adam."""

import torch

from sparsebench.engine.adam8bit import (
    Adam8bit,
    dequantize_log,
    dequantize_signed,
    quantize_log,
    quantize_signed,
)


def test_signed_quantization_bound():
    x = torch.randn(5000) * torch.logspace(-4, 0, 5000)
    q, scale = quantize_signed(x, block=1024)
    assert q.shape == (5, 1000)  # 5000 values: five equal blocks of at most 1024
    err = (dequantize_signed(q, scale, x) - x).abs().view(-1)
    blocks = x.view(-1, 1000).abs().amax(1)
    bound = (blocks / 254).repeat_interleave(1000)
    assert (err <= bound + 1e-12).all() and q.dtype == torch.int8


def test_blocks_never_straddle_rows_so_a_row_shard_quantizes_as_the_whole():
    x = torch.randn(12, 1536)  # SmolLM2's widest input: one block of 1536 per row
    v = x.pow(2)
    q, scale = quantize_signed(x, block=2048)
    qv, lohi = quantize_log(v, block=2048)
    assert q.shape == (12, 1536)
    for rows in (slice(0, 5), slice(5, 12)):  # two ranks' rows under FSDP2
        q2, s2 = quantize_signed(x[rows], block=2048)
        assert torch.equal(q2, q[rows]) and torch.equal(s2, scale[rows])
        qv2, lohi2 = quantize_log(v[rows], block=2048)
        assert torch.equal(qv2, qv[rows]) and torch.equal(lohi2, lohi[rows])
    y = torch.randn(6, 4096)  # 4096 columns: two blocks of 2048 per row, as a flat cut would make
    qy, _ = quantize_signed(y, block=2048)
    assert qy.shape == (12, 2048)
    assert torch.allclose(
        dequantize_signed(*quantize_signed(y, 2048), y), y, atol=float(y.abs().max()) / 254 + 1e-6
    )


def test_log_quantization_relative_bound_and_zeros():
    torch.manual_seed(5)  # this seed draws subnormal float32 values (~1e-41), once mis-coded
    v = torch.rand(4096).pow(8) * 1e-3  # second moments spanning many decades
    v[::7] = 0
    v[3] = 5e-44  # a subnormal float32, always present
    q, lohi = quantize_log(v, block=2048)
    back = dequantize_log(q, lohi, v)
    assert (back[v == 0] == 0).all() and (back[v > 0] > 0).all()
    span = (lohi[:, 1] - lohi[:, 0]).max()
    rel = (back[v > 0] / v[v > 0]).log().abs()
    assert (rel <= span / 254 / 2 + 1e-5).all()  # half a code step in log space


def test_tracks_float32_adam():
    torch.manual_seed(0)
    target = torch.randn(64, 64)
    a = torch.nn.Parameter(torch.zeros(64, 64))
    b = torch.nn.Parameter(torch.zeros(64, 64))
    oa = torch.optim.Adam([a], lr=1e-2, betas=(0.9, 0.95))
    ob = Adam8bit([b], lr=1e-2, betas=(0.9, 0.95), block=256)
    for _ in range(300):
        for p, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((p - target) ** 2).sum().backward()
            o.step()
    assert (a - target).norm() < 0.05 * target.norm()
    assert (b - target).norm() < 0.05 * target.norm()
    assert (a - b).norm() < 0.05 * target.norm()
    st = ob.state[b]
    state_bytes = sum(
        t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor)
    )
    assert state_bytes / b.numel() < 2.2  # 1 + 1 byte per value plus per-block scales


def test_first_step_moments_match():
    g = torch.randn(32, 32)
    a, b = torch.nn.Parameter(torch.zeros(32, 32)), torch.nn.Parameter(torch.zeros(32, 32))
    oa, ob = torch.optim.Adam([a], betas=(0.9, 0.95)), Adam8bit([b], betas=(0.9, 0.95))
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    torch.testing.assert_close(b, a)  # the step itself uses float32 moments
    m, v = ob.moments(b)
    torch.testing.assert_close(
        m, oa.state[a]["exp_avg"], rtol=0, atol=float(m.abs().max()) / 254 + 1e-9
    )
    torch.testing.assert_close(v, oa.state[a]["exp_avg_sq"], rtol=0.05, atol=0)
