"""8-bit Adam: quantization error bounds and agreement with float32 Adam."""
import torch

from sparsebench.pruners.adam8bit import Adam8bit, dequantize_log, dequantize_signed, quantize_log, quantize_signed


def test_signed_quantization_bound():
    x = torch.randn(5000) * torch.logspace(-4, 0, 5000)
    q, scale = quantize_signed(x, block=1024)
    err = (dequantize_signed(q, scale, x) - x).abs().view(-1)
    blocks = torch.cat([x, x.new_zeros((-x.numel()) % 1024)]).view(-1, 1024).abs().amax(1)
    bound = (blocks / 254).repeat_interleave(1024)[: x.numel()]
    assert (err <= bound + 1e-12).all() and q.dtype == torch.int8


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
    state_bytes = sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
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
    torch.testing.assert_close(m, oa.state[a]["exp_avg"], rtol=0, atol=float(m.abs().max()) / 254 + 1e-9)
    torch.testing.assert_close(v, oa.state[a]["exp_avg_sq"], rtol=0.05, atol=0)
