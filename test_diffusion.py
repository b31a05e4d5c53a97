"""Tests of the f_rgbd diffusion core (issue 6): closed-form checks of the schedules, forward noising
and the DDIM update; exact sampling with an oracle denoiser; eta = 0 determinism; the guidance-scale
definitions; a tiny denoiser overfit to two synthetic scenes (class labels pick the scene); the
unet.UNet denoiser. (Its checkpoints: test_checkpoint.py; the metrics of its samples: test_evaluate.py.)
Run: python -m pytest -q test_diffusion.py"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusion as D


# -----------------------------------------------------------------------------
# helpers


class OracleDenoiser(nn.Module):
    """The exact v-prediction when the data is one fixed image x_star (a delta distribution):
    x0 = x_star for every x_t, so v = (sqrt(abar) x_t - x_star) / sqrt(1 - abar). Ignores labels."""

    def __init__(self, x_star, alphas_cumprod, null_class=0):
        super().__init__()
        self.x_star, self.abar, self.null_class = x_star, alphas_cumprod, null_class
        self.times = []

    def forward(self, x, time, class_labels):
        self.times.append(time.clone())
        t = time.round().long()
        assert torch.equal(t.double(), time.double()), "time must be an integer step"
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        return (a.sqrt() * x - self.x_star) / (1 - a).sqrt()


class LabelDenoiser(nn.Module):
    """v = table[label] (a constant image per label, the null class included); records labels seen."""

    def __init__(self, table, null_class):
        super().__init__()
        self.table, self.null_class, self.seen = table, null_class, []

    def forward(self, x, time, class_labels):
        self.seen.append(class_labels.clone())
        return self.table[class_labels].expand_as(x).clone()


class TinyDenoiser(nn.Module):
    """A small self-contained conditional denoiser for the overfit test: a learned per-pixel
    embedding (so it can memorise a layout), sinusoidal time + class embedding as FiLM."""

    def __init__(self, num_classes, size=16, ch=4, hidden=48, pos_ch=8):
        super().__init__()
        self.null_class = num_classes
        self.pos = nn.Parameter(torch.randn(1, pos_ch, size, size) * 0.5)
        self.time_mlp = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.cls = nn.Embedding(num_classes + 1, 2 * hidden)
        self.conv_in = nn.Conv2d(ch + pos_ch, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, ch, 3, padding=1)

    def forward(self, x, time, class_labels):
        freqs = torch.exp(-math.log(10000) * torch.arange(16, device=x.device) / 15)
        arg = time[:, None] * freqs[None]
        emb = self.time_mlp(torch.cat([arg.sin(), arg.cos()], 1)) + self.cls(class_labels)
        scale, shift = emb[:, :, None, None].chunk(2, 1)
        h = F.silu(self.conv_in(torch.cat([x, self.pos.expand(x.shape[0], -1, -1, -1)], 1)))
        h = F.silu(self.conv_mid(h * (1 + scale) + shift)) + h
        return self.conv_out(h)


def _rms(a, b):
    return float(((a - b) ** 2).mean().sqrt())


# -----------------------------------------------------------------------------
# model space and schedule


def test_rgbd_mapping_values_and_roundtrip():
    image = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    depth = torch.tensor([[4.0, 5.0], [6.0, 5.5]]).view(1, 1, 2, 2)
    x = D.rgbd_to_x(image, depth)
    assert x.shape == (1, 4, 2, 2)
    assert torch.allclose(x[0, :3, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(x[0, 3], torch.tensor([[-1.0, 0.0], [1.0, 0.5]]))
    im2, d2 = D.x_to_rgbd(x)
    assert torch.allclose(im2, image) and torch.allclose(d2, depth)
    im3, d3 = D.x_to_rgbd(torch.full((1, 4, 1, 1), 3.0))        # out of range -> clamped
    assert float(im3.max()) == 1.0 and float(d3.max()) == 6.0
    with pytest.raises(ValueError, match='x_to_rgbd'):
        D.x_to_rgbd(torch.zeros(1, 3, 2, 2))


def test_rgbd_mapping_is_the_old_formula_bit_for_bit():
    """(image - 0.5) / 0.5 and the depth map onto [-1, 1] give exactly the values 2 image - 1 gave, so
    f_rgbd trains and samples as before the rewrite."""
    torch.manual_seed(0)
    image, depth = torch.rand(4, 3, 8, 8), 4 + 2 * torch.rand(4, 1, 8, 8)
    x = D.rgbd_to_x(image, depth)
    assert torch.equal(x[:, :3], 2 * image - 1)
    assert torch.equal(x[:, 3:], 2 * ((depth - 4.0) / (6.0 - 4.0)) - 1)


def test_schedules_closed_form():
    a = D.cosine_schedule(1000)
    s, t = 0.008, torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    # unclipped steps: abar_t = f((t+1)/T) / f(0) exactly; the last step is clipped at beta = 0.999
    assert torch.allclose(a[:-1], f[1:-1] / f[0], rtol=1e-10, atol=0)
    assert torch.isclose(a[-1], a[-2] * 0.001, rtol=1e-10)
    assert bool((a[1:] < a[:-1]).all()) and 0 < float(a[-1]) < 1e-8 and float(a[0]) < 1
    lin = D.linear_schedule(1000)
    assert torch.allclose(lin, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
    assert torch.equal(D.make_schedule('linear'), lin)
    with pytest.raises(ValueError, match='schedule'):
        D.make_schedule('quadratic')


def test_q_sample_exact():
    abar = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x0 = torch.tensor([1.0, -0.5, 0.25]).view(3, 1, 1, 1)
    noise = torch.tensor([0.5, 2.0, -1.0]).view(3, 1, 1, 1)
    t = torch.tensor([2, 0, 1])              # a different step per element: checks the indexing
    xt = D.q_sample(x0, t, noise, abar)
    expect = [math.sqrt(0.1) * 1.0 + math.sqrt(0.9) * 0.5,
              math.sqrt(0.9) * -0.5 + math.sqrt(0.1) * 2.0,
              math.sqrt(0.5) * 0.25 + math.sqrt(0.5) * -1.0]
    assert torch.allclose(xt.flatten(), torch.tensor(expect), atol=1e-6)
    # default schedule = cosine; step 999 is essentially pure noise
    x0 = torch.randn(2, 4, 3, 3)
    n = torch.randn(2, 4, 3, 3)
    assert torch.allclose(D.q_sample(x0, torch.tensor([999, 999]), n), n, atol=5e-4)


# -----------------------------------------------------------------------------
# DDIM


def test_ddim_step_closed_form():
    x_t, eps, z = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([-0.3])
    a_t, a_p = 0.1, 0.9
    x0 = (1.0 - math.sqrt(0.9) * 0.5) / math.sqrt(0.1)          # = 2.2553
    # eta = 0: x_prev = sqrt(a_p) x0 + sqrt(1 - a_p) eps
    x_prev, x0_hat = D.ddim_step(x_t, eps, a_t, a_p, eta=0.0, clip_x0=False)
    assert math.isclose(float(x0_hat), x0, rel_tol=1e-6)
    assert math.isclose(float(x_prev), math.sqrt(0.9) * x0 + math.sqrt(0.1) * 0.5, rel_tol=1e-6)
    # eta = 0.5: sigma = 0.5 sqrt((1 - 0.9)/(1 - 0.1)) sqrt(1 - 0.1/0.9) = 0.5 * (1/3) * sqrt(8/9)
    sigma = 0.5 * (1 / 3) * math.sqrt(8 / 9)
    x_prev, _ = D.ddim_step(x_t, eps, a_t, a_p, eta=0.5, noise=z, clip_x0=False)
    expect = math.sqrt(0.9) * x0 + math.sqrt(0.1 - sigma ** 2) * 0.5 + sigma * -0.3
    assert math.isclose(float(x_prev), expect, rel_tol=1e-6)
    # clip_x0: x0 clamped to 1 and eps re-derived from it, so x_prev stays on the same DDIM path
    x_prev, x0_hat = D.ddim_step(x_t, eps, a_t, a_p, eta=0.0, clip_x0=True)
    eps_c = (1.0 - math.sqrt(0.1) * 1.0) / math.sqrt(0.9)
    assert float(x0_hat) == 1.0
    assert math.isclose(float(x_prev), math.sqrt(0.9) + math.sqrt(0.1) * eps_c, rel_tol=1e-6)
    # final step (abar_prev = 1) returns x0
    x_prev, x0_hat = D.ddim_step(x_t, eps, a_t, 1.0, eta=1.0, noise=z, clip_x0=False)
    assert torch.equal(x_prev, x0_hat)


def test_ddim_eta1_consecutive_is_ddpm_posterior():
    """eta = 1 between consecutive steps is DDPM's q(x_{t-1} | x_t, x0): mean and variance."""
    abar = D.cosine_schedule()
    t = 500
    a_t, a_p = float(abar[t]), float(abar[t - 1])
    beta = 1 - a_t / a_p
    x_t, x0 = torch.tensor([0.7]), torch.tensor([-0.4])
    eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    mean, _ = D.ddim_step(x_t, eps, a_t, a_p, eta=1.0, noise=torch.zeros(1), clip_x0=False)
    one, _ = D.ddim_step(x_t, eps, a_t, a_p, eta=1.0, noise=torch.ones(1), clip_x0=False)
    mu = math.sqrt(a_p) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x_t
    var = (1 - a_p) / (1 - a_t) * beta
    assert torch.allclose(mean, mu.float(), atol=1e-6)
    assert math.isclose(float(one - mean) ** 2, var, rel_tol=1e-4)


@pytest.mark.parametrize('schedule,steps,eta', [('cosine', 50, 0.0), ('cosine', 7, 1.0), ('linear', 20, 0.0)])
def test_ddim_sample_recovers_delta_data_with_oracle(schedule, steps, eta):
    """With the exact denoiser of a one-image data set, every x0 estimate is that image, so the sampler
    must return it exactly -- only if x_t, t and abar_t stay consistent through the whole loop."""
    abar = D.make_schedule(schedule)
    x_star = torch.rand(1, 4, 5, 5) * 1.6 - 0.8
    oracle = OracleDenoiser(x_star, abar)
    g = torch.Generator().manual_seed(0)
    x = D.ddim_sample(oracle, (3, 4, 5, 5), torch.zeros(3, dtype=torch.long), steps=steps, eta=eta,
                      guidance_scale=1.0, generator=g, alphas_cumprod=abar, clip_x0=False)
    assert torch.allclose(x, x_star.expand(3, -1, -1, -1), atol=1e-4)
    ts = [int(t[0]) for t in oracle.times]
    assert ts == D.ddim_timesteps(steps) and ts[0] == 999 and ts[-1] == 0


def test_ddim_eta0_is_deterministic():
    torch.manual_seed(0)
    net = TinyDenoiser(num_classes=3, size=8)
    labels = torch.tensor([0, 2])
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append(D.ddim_sample(net, (2, 4, 8, 8), labels, steps=10, eta=0.0, guidance_scale=2.0,
                                  generator=g))
        # eta = 0 draws no noise after x_T: the generator moved by exactly one randn of the shape
        ref = torch.Generator().manual_seed(123)
        torch.randn((2, 4, 8, 8), generator=ref)
        assert torch.equal(g.get_state(), ref.get_state())
    assert torch.equal(runs[0], runs[1])
    stoch = D.ddim_sample(net, (2, 4, 8, 8), labels, steps=10, eta=1.0, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(123))
    assert not torch.allclose(stoch, runs[0], atol=1e-3)


def test_guidance_scale_definitions():
    """eps = eps_uncond + s (eps_cond - eps_uncond): s = 0 is exactly the unconditional model, s = 1
    exactly the conditional one, other s extrapolate linearly in eps."""
    torch.manual_seed(0)
    null = 2
    table = torch.randn(3, 4, 1, 1) * 0.5                   # v for labels 0, 1 and the null class
    labels = torch.tensor([0, 1])
    shape = (2, 4, 3, 3)

    def run(den, s, steps=5, clip=True):
        return D.ddim_sample(den, shape, labels, steps=steps, guidance_scale=s, clip_x0=clip,
                             generator=torch.Generator().manual_seed(7))

    guided = LabelDenoiser(table, null)
    only_uncond = LabelDenoiser(table[[null, null, null]], null)    # every label -> the null output
    only_cond = LabelDenoiser(table, null)
    assert torch.equal(run(guided, 0.0), run(only_uncond, 1.0))
    assert all(bool((l == null).all()) for l in guided.seen)         # s = 0 never asks for real labels
    guided.seen.clear()
    assert torch.equal(run(guided, 1.0), run(only_cond, 1.0))
    assert all(torch.equal(l, labels) for l in guided.seen)          # s = 1 never asks for the null class
    # s = 3, one step from t = T-1 straight to x0: compare with the formula by hand
    s, abar = 3.0, float(D.cosine_schedule()[-1])
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    eps_c = math.sqrt(1 - abar) * x_T + math.sqrt(abar) * table[labels]
    eps_u = math.sqrt(1 - abar) * x_T + math.sqrt(abar) * table[null]
    eps = eps_u + s * (eps_c - eps_u)
    x0 = (x_T - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    assert torch.allclose(run(guided, s, steps=1, clip=False), x0, rtol=1e-4, atol=1e-3)
    # unconditional sampling (labels None) only ever uses the null class
    guided.seen.clear()
    D.ddim_sample(guided, shape, None, steps=3, generator=torch.Generator().manual_seed(7))
    assert all(bool((l == null).all()) for l in guided.seen)


# -----------------------------------------------------------------------------
# training loss


def test_loss_is_zero_for_the_oracle_and_drops_classes():
    abar = D.cosine_schedule()
    x_star = torch.rand(1, 4, 4, 4) * 2 - 1
    oracle = OracleDenoiser(x_star, abar)
    loss = D.diffusion_loss(oracle, x_star.expand(64, -1, -1, -1), torch.zeros(64, dtype=torch.long),
                            generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-8                   # v target, q_sample and the time passed agree
    wrong = D.diffusion_loss(oracle, -x_star.expand(64, -1, -1, -1), torch.zeros(64, dtype=torch.long))
    assert float(wrong) > 0.1

    den = LabelDenoiser(torch.zeros(11, 4, 1, 1), null_class=10)
    labels = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(1))
    x0 = torch.zeros(4000, 4, 1, 1)
    for p, lo, hi in [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.1, 0.08, 0.12)]:
        den.seen.clear()
        D.diffusion_loss(den, x0, labels, p_uncond=p, generator=torch.Generator().manual_seed(2))
        seen = den.seen[0]
        dropped = seen == 10
        assert lo <= float(dropped.float().mean()) <= hi
        assert torch.equal(seen[~dropped], labels[~dropped])        # kept labels are untouched
    den.seen.clear()
    D.diffusion_loss(den, x0[:8], None)
    assert bool((den.seen[0] == 10).all())
    with pytest.raises(ValueError, match='null_class'):
        D.diffusion_loss(lambda x, t, y: x, x0[:2], labels[:2])


def _synthetic_pair(size=16):
    """Scene 0 of scenes.SyntheticScenes and the first scene of another class: (x (2, 4, S, S), labels)."""
    from scenes import SyntheticScenes
    ds = SyntheticScenes(16, image_size=size, seed=0)
    first = ds[0]
    other = next(ds[i] for i in range(1, len(ds)) if ds[i]['label'] != first['label'])
    image = torch.stack([first['image'], other['image']])         # (2, 3, S, S)
    depth = torch.stack([first['depth'], other['depth']])         # (2, 1, S, S)
    x = D.rgbd_to_x(image, depth)
    return x, torch.tensor([first['label'], other['label']]), ds.num_classes


def test_tiny_denoiser_overfits_and_class_labels_change_samples():
    """Train a tiny denoiser on two 16 x 16 synthetic RGB-D scenes of two classes; sampling class k
    must give back scene k (so class labels change the samples)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # tiny ops: one thread is several times faster on a busy CPU
    try:
        torch.manual_seed(0)
        scenes, labels, num_classes = _synthetic_pair(16)        # (2, 4, 16, 16), (2,)
        assert _rms(scenes[0], scenes[1]) > 0.3
        net = TinyDenoiser(num_classes=num_classes, size=16, hidden=48)
        steps = 800
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
        g = torch.Generator().manual_seed(0)
        idx = torch.arange(16) % 2
        for _ in range(steps):
            loss = D.diffusion_loss(net, scenes[idx], labels[idx], p_uncond=0.1, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        x = D.ddim_sample(net, (4, 4, 16, 16), labels[[0, 1, 0, 1]], steps=25, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(threads)
    for i in range(4):
        k = i % 2
        assert _rms(x[i], scenes[k]) < 0.1, (i, _rms(x[i], scenes[k]))
        assert _rms(x[i], scenes[1 - k]) > 0.25
    _, depth = D.x_to_rgbd(x)                                    # scene units
    _, true_depth = D.x_to_rgbd(scenes[[0, 1, 0, 1]])
    assert float((depth - true_depth).abs().mean()) < 0.1


# -----------------------------------------------------------------------------
# the f_rgbd denoiser built from unet.UNet


def test_make_denoiser_is_a_conditional_4_channel_unet():
    from unet import UNet
    torch.manual_seed(0)
    net = D.make_denoiser(5, size='small', image_size=16)
    assert isinstance(net, UNet) and net.null_class == 5 and net.image_size == 16
    assert net.class_emb.num_embeddings == 6                     # 5 classes + the null class
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([10.0, 900.0])
    out = net(x, t, torch.tensor([0, 1]))
    assert out.shape == (2, 4, 16, 16)
    # time and class both reach the output (the null row included)
    assert not torch.allclose(out, net(x, t.flip(0), torch.tensor([0, 1])))
    assert not torch.allclose(out, net(x, t, torch.tensor([5, 5])))
    loss = D.diffusion_loss(net, x.clamp(-1, 1), torch.tensor([3, 4]))
    loss.backward()
    assert net.class_emb.weight.grad is not None and bool(torch.isfinite(loss))
    s = D.ddim_sample(net, (2, 4, 16, 16), torch.tensor([0, 4]), steps=3, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 4, 16, 16) and float(s.abs().max()) <= 1.0 + 1e-6     # clipped x0 at t=0
    with pytest.raises(ValueError, match='huge'):
        D.make_denoiser(5, size='huge')
